"""Is the sweep's winner better than the seed recipe, and for how much compute? Measured side by
side on one image folder, through the product's own commands.

    python benchmarks/bench_quality.py --data ~/data/openclipart --backbone mobilenet_v2 \\
        --image-size 128 --max-epochs 15 --trials 30 --seeds 0 1 2 --out ~/quality

Arms: `sweeps/seed-recipe.toml` (1 trial: the recipe) and the sweep file under test (`--sweep`,
default `sweeps/default.toml`, `--trials` trials), each over `--seeds` study seeds, each on its
own SQLite stores under `--out`. Every winner is scored once by `src.final_test` on the folder's
one test split (the split is sealed in the folder, so every arm and seed shares it). Each arm's
result is appended to `--out/results.jsonl` as it ends, and a rerun skips what is there: a
cut-off session loses at most the trial that was running: the arm's study resumes.

Selection rules are compared on the same trials: the arm `<name>/single-or-soup` runs each
finished sweep again with `--ensemble-top 0` (the winner chosen between the best trial and the
soup only, src/winner.py), and `--confirm K F` adds the arm `<name>+confirm` (again, with
`--confirm-top K --confirm-folds F`: the confirmation runs, then the winner is chosen). Only what
follows the trials runs, and the winner is scored again (recorded as forced: the arms share their
trials, so the difference is the rule's alone); such an arm's wall time is the sweep's plus its
own. All `<name>` arms run first, so a new study seed's sweep is scored once, by the default rule,
before any other rule sees its test split.

Prints per arm: test accuracy and macro-F1 (mean, min, max), wall time; a paired bootstrap 95%
interval of the test-accuracy gap (per test image, each arm's correctness averaged over its
seeds; images resampled); and the machine-readable lines
    quality sweep_minus_recipe_test_pt <x>   mean test accuracy, sweep - recipe, in points
    quality sweep_vs_recipe_compute <x>      mean wall time, sweep / recipe
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from src.final_test import run_final_test  # noqa: E402

TICK_S = 15


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


RULES = {"": [], "/single-or-soup": ["--ensemble-top", "0"]}  # arm suffix: extra sweep flags


def run_arm(name: str, sweep_file: str, trials: int, seed: int, args, suffix: str = "",
            extra: list[str] | None = None) -> dict:
    """One sweep (or, with a `suffix`, the same sweep again with `extra` flags: its study is
    complete, so only what follows the trials runs), its winner scored (again, with a suffix: a
    forced scoring, to compare the selection rules on one set of trials)."""
    out = Path(args.out) / f"{name}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out}/mlflow.db"
    cmd = [sys.executable, "-m", "src.sweep", "--data", str(args.data), "--sweep", sweep_file,
           "--trials", str(trials), "--seed", str(seed), "--backbone", args.backbone,
           "--image-size", str(args.image_size), "--max-epochs", str(args.max_epochs),
           "--storage", f"sqlite:///{out}/optuna.db", "--tracking-uri", uri, "--study-name", name,
           "--experiment", f"quality-{name}", *args.sweep_flags, *(extra or [])]
    if suffix:
        out = out / ("confirm" if suffix == "+confirm" else suffix.strip("/+"))
        out.mkdir(exist_ok=True)
    # An arm cut off mid-way resumes its study (the sweep runs only the trials still missing); its
    # wall time is the sum over attempts, kept in `wall_s` by a ticker (a kill loses < TICK_S).
    spent = out / "wall_s"
    before = float(spent.read_text()) if spent.is_file() else 0.0
    start = time.time()
    stop = threading.Event()

    def tick():
        while not stop.wait(TICK_S):
            _write_atomic(spent, f"{before + time.time() - start:.1f}")

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    offset = (out / "sweep.log").stat().st_size if (out / "sweep.log").is_file() else 0
    with open(out / "sweep.log", "a") as log:
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    stop.set()
    wall = before + time.time() - start
    _write_atomic(spent, f"{wall:.1f}")
    text = (out / "sweep.log").read_bytes()[offset:].decode(errors="replace")  # this attempt's output
    parents = re.findall(r"parent run (?:\(the whole sweep[^)]*\): )?([0-9a-f]{32})", text)  # before and after the label
    if code != 0 or not parents:
        raise SystemExit(f"{name} seed {seed}: the sweep failed (exit {code}); see {out / 'sweep.log'}")
    r = run_final_test(parents[-1], uri, force=bool(suffix) or _scored(uri, parents[-1]))
    epochs = sum(int(m) for m in re.findall(r"epochs spent: (\d+)", text)[-1:])
    best = re.findall(r"best: trial \d+, valid_acc ([0-9.]+)", text)
    kind = re.findall(r"winner: (a soup|an ensemble)", text)
    return {"arm": name + suffix, "seed": seed, "wall_s": wall, "test_acc": r.acc, "macro_f1": r.macro_f1,
            "winner": r.trial_run_id, "winner_kind": kind[-1] if kind else "trial", "epochs": epochs,
            "best_valid": float(best[-1]) if best else None,
            "correct": [int(p == t) for p, t in zip(r.preds, r.targets)]}


def _scored(uri: str, parent_id: str) -> bool:
    """Whether the sweep was scored before (a study of the previous rule, scored by it)."""
    from src.tracking import Tracker
    return int(Tracker(uri).get_run(parent_id).data.tags.get("final_test.count", "0")) > 0


def _stats(values) -> str:
    return f"{np.mean(values):.4f} (min {np.min(values):.4f}, max {np.max(values):.4f})"


def report(rows: list[dict], sweep_arms: list[str]) -> None:
    """Each arm's figures, then each of `sweep_arms` against the recipe; the quality lines are
    the first one's (the arm under test, `--name`)."""
    arms = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    for arm, got in arms.items():
        print(f"{arm:>16}: {len(got)} seed(s), test acc {_stats([g['test_acc'] for g in got])}, macro-F1 "
              f"{_stats([g['macro_f1'] for g in got])}, wall {np.mean([g['wall_s'] for g in got]):.0f} s, "
              f"epochs {np.mean([g['epochs'] for g in got]):.0f}")
    for sweep_arm in [a for a in sweep_arms if a in arms and "recipe" in arms]:
        rec, swp = arms["recipe"], arms[sweep_arm]
        a = np.mean([g["correct"] for g in swp], axis=0)  # per test image, over seeds
        b = np.mean([g["correct"] for g in rec], axis=0)
        rng = np.random.default_rng(0)
        boots = [np.mean((a - b)[idx]) for idx in rng.integers(0, len(a), size=(2000, len(a)))]
        low, high = np.percentile(boots, [2.5, 97.5]) * 100
        gap = (np.mean([g["test_acc"] for g in swp]) - np.mean([g["test_acc"] for g in rec])) * 100
        beats = sum(g["test_acc"] > np.mean([r["test_acc"] for r in rec]) for g in swp)
        compute = np.mean([g["wall_s"] for g in swp]) / np.mean([g["wall_s"] for g in rec])
        print(f"{sweep_arm} vs recipe, paired bootstrap over {len(a)} test images: gap {gap:+.2f} points, 95% "
              f"interval [{low:+.2f}, {high:+.2f}]; {beats} of {len(swp)} winners beat the recipe's mean; "
              f"compute {compute:.2f}x")
        if sweep_arm == sweep_arms[0]:
            print(f"quality sweep_minus_recipe_test_pt {gap:.2f}")
            print(f"quality sweep_vs_recipe_compute {compute:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--sweep", default="sweeps/default.toml", help="the sweep file under test")
    p.add_argument("--name", default="sweep", help="its arm's name (results of several files can share --out)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-epochs", type=int, default=15)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("quality-out"))
    p.add_argument("--confirm", type=int, nargs=2, metavar=("K", "F"),
                   help="also the arm <name>+confirm: each sweep again with --confirm-top K --confirm-folds F")
    p.add_argument("--sweep-flags", nargs=argparse.REMAINDER, default=[], help="passed to every src.sweep")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["arm"], r["seed"]) for r in rows}
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # The recipe's seeds first (quick), then every seed's sweep (scored by the default rule), then
    # the other rules on the same trials.
    runs = [("recipe", "sweeps/seed-recipe.toml", 1, "", [], seed) for seed in args.seeds]
    rules = {**RULES, **({"+confirm": ["--confirm-top", str(args.confirm[0]), "--confirm-folds",
                                       str(args.confirm[1])]} if args.confirm else {})}
    runs += [(args.name, args.sweep, args.trials, suffix, extra, seed)
             for suffix, extra in rules.items() for seed in args.seeds]
    for name, sweep_file, trials, suffix, extra, seed in runs:
        if (name + suffix, seed) in done:
            continue
        row = run_arm(name, sweep_file, trials, seed, args, suffix, extra)
        if suffix:  # its compute: the sweep's, then its own
            row["wall_s"] += next(r["wall_s"] for r in rows if (r["arm"], r["seed"]) == (name, seed))
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['arm']} seed {seed}: test acc {row['test_acc']:.4f} ({row['winner_kind']}), "
              f"wall {row['wall_s']:.0f} s", flush=True)
    report(rows, [args.name + suffix for suffix in rules])
    return 0


if __name__ == "__main__":
    sys.exit(main())
