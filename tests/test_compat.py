"""What the code before the trial-path redesign (issue 11) left on disk keeps working with the code
now: its cache entries are found, its checkpoint is scored, and its study (whose epochs are one
global count across both phases, not phase-aligned steps) is refused with a clear message
instead of being mixed with new step numbers. The old code is taken from git history and run
for real in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import sweep_args
from src import final_test, sweep

REPO = Path(__file__).resolve().parents[1]
BEFORE = "041d290339778d2074b10fe2203792467a570e63"  # main before the redesign


def _old_code(target: Path, commit: str = BEFORE) -> Path:
    """src/ and sweeps/ as they were at `commit`, or a skip where history is not at hand."""
    try:
        blob = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src", "sweeps"],
                              capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the code at {commit} is not in this checkout's history ({exc})")
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(target, filter="data")
    return target


def _entries(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.npy")}


@pytest.mark.slow
def test_a_study_cache_and_checkpoint_made_before_the_redesign_still_work(in_tmp, flat_folder, capsys):
    old = _old_code(in_tmp / "old")
    four = ("--sweep", str(old / "sweeps" / "default.toml"))  # the four original parameters
    args = sweep_args(in_tmp, flat_folder, 1, *four)
    child = subprocess.run([sys.executable, "-m", "src.sweep", *args], cwd=old, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(old)}, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    cache = Path(os.environ["TLSWEEP_CACHE"])
    made_before = _entries(cache)
    assert any(k.startswith("images/") for k in made_before) and any(k.startswith("features/") for k in made_before)
    first = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").trials[0]

    # Its study is refused (old step numbers), saying what to do; nothing is added to it.
    assert sweep.main(sweep_args(in_tmp, flat_folder, 2, *four)) == 2
    assert "new --study-name" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").trials) == 1

    # The same parameters in a new study: the trial needs exactly the entries the old code made.
    args = sweep_args(in_tmp, flat_folder, 1, *four)
    args[args.index("--study-name") + 1] = "s2"
    study = optuna.create_study(study_name="s2", storage=f"sqlite:///{in_tmp}/optuna.db", direction="maximize")
    study.enqueue_trial(first.params)
    result = sweep.run_sweep(sweep.parse_args(args))
    study = optuna.load_study(study_name="s2", storage=f"sqlite:///{in_tmp}/optuna.db")
    assert result.n_finished == 1 and study.trials[0].params == first.params
    assert study.trials[0].value == first.value  # the same training, whatever the steps are called
    assert _entries(cache) == made_before  # every entry found, none rebuilt, none added
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")

    # The old trial's checkpoint, scored by the code now
    old_run = first.user_attrs["mlflow_run_id"]
    assert client.get_run(old_run).data.tags["optuna.state"] == "COMPLETE"
    code = final_test.main(["--run-id", old_run, "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db"])
    assert code == 0
    assert client.get_run(old_run).data.metrics["test/acc"] >= 0.0


@pytest.mark.slow
def test_the_same_sweep_trains_the_same_trials_as_before_the_redesign(in_tmp, flat_folder):
    """Same seed, same CPU: the old and the new code sample the same parameters and reach the same
    phase-1 validation accuracies (behaviour unchanged, not merely compatible) with a sweep file
    of the four original parameters; the steps are numbered phase-aligned now (phase-2 epoch e at
    step max_epochs_phase1 + e = 2 + e; before, right after phase 1's last epoch). Phase 2 now
    trains on seeded views shared by trials (other draws of the same augmentation: the frozen
    prefix's cache, docs/speed.md), so its accuracies are not the old ones; a level without
    randomness ("none") still gives the same ones."""
    old = _old_code(in_tmp / "old")
    runs, steps = {}, {}
    for name in ("before", "after"):
        args = sweep_args(in_tmp / name, flat_folder, 3, "--sweep", str(old / "sweeps" / "default.toml"))
        (in_tmp / name).mkdir()
        if name == "before":
            child = subprocess.run([sys.executable, "-m", "src.sweep", *args], cwd=in_tmp / name, capture_output=True,
                                   text=True, env={**os.environ, "PYTHONPATH": str(old)}, timeout=600)
            assert child.returncode == 0, child.stderr[-3000:]
        else:
            os.chdir(in_tmp / name)
            assert sweep.main(args) == 0
        trials = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp / name}/optuna.db").trials
        runs[name] = [(t.state, t.params, [v for _, v in sorted(t.intermediate_values.items())]) for t in trials]
        steps[name] = [sorted(t.intermediate_values) for t in trials]
    assert len(runs["before"]) == len(runs["after"]) == 3
    for old_steps, new_steps, before, after in zip(steps["before"], steps["after"], runs["before"], runs["after"]):
        phase1 = [s for s in new_steps if s <= 2]
        assert old_steps == list(range(1, len(old_steps) + 1))  # one global count
        assert new_steps == phase1 + [2 + e for e in range(1, len(new_steps) - len(phase1) + 1)]
        assert after[:2] == before[:2] and after[2][:len(phase1)] == before[2][:len(phase1)]
        if after[1]["aug_strength"] == "none":  # no draw to differ: phase 2 as before too
            assert after[2] == before[2]
