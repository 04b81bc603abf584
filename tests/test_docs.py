"""The README and docs/ say what is true: the flag tables name exactly the flags `--help` has, with
its defaults; every link and every `src/`, `tests/`, `benchmarks/`, `sweeps/` path they name
exists; the demo's settings quoted on the first screen are the sweep file's."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from src import sweep
from src.config import load_sweep

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows whose first cell is a `--flag`: flag -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(--[a-z-]+)(?: [A-Z]+)?`", cells[0]) if line.startswith("|") else None
        if match:
            rows[match.group(1)] = cells[1:]
    return rows


def _flags() -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in sweep.build_parser()._actions if a.option_strings
            and a.option_strings[-1] != "--help"}


def test_docs_flag_table_names_every_flag_of_help_with_its_default():
    documented, actions = _table_rows((REPO / "docs" / "flags.md").read_text()), _flags()
    assert set(documented) == set(actions), (set(documented) ^ set(actions))
    for flag, action in actions.items():
        default = action.default
        if isinstance(default, bool) or default is None or isinstance(default, Path) or "://" in str(default):
            continue  # off/none flags, the sweep file's and path defaults are said in words
        assert documented[flag][0].startswith(f"{default}") or documented[flag][0].startswith(f"`{default}`"), \
            (flag, default, documented[flag][0])


def test_readme_everyday_flags_are_real_flags_and_the_demo_is_as_quoted():
    readme = (REPO / "README.md").read_text()
    everyday = _table_rows(readme)
    assert 8 <= len(everyday) <= 12 and set(everyday) <= set(_flags()), set(everyday) - set(_flags())
    assert everyday["--trials"][0] == str(_flags()["--trials"].default)
    demo = load_sweep(REPO / "sweeps" / "default.toml")
    assert demo.fixed.backbone == "resnet18" and f"`{demo.fixed.backbone}` at {demo.demo['image_size']} px" in readme
    assert f"{demo.demo['max_epochs_phase1']} + {demo.demo['max_epochs_phase2']} epochs per trial" in readme


def test_every_link_and_named_path_exists():
    missing = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http") and not (page.parent / target).exists():
                missing.append(f"{page.name}: link {target}")
        for path in set(re.findall(r"(?<![\w/.~-])((?:src|tests|benchmarks|sweeps|docs)/[\w/.-]+\.(?:py|toml|md|png))", text)):
            if not (REPO / path).exists():
                missing.append(f"{page.name}: {path}")
    assert missing == []
