"""What the code before the trial-path redesign (issue 11) left on disk keeps working with the code
now: its study resumes, its cache entries are found, its checkpoint is scored. The old code is
taken from git history and run for real in a subprocess."""
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


def _old_code(target: Path) -> Path:
    """src/ and sweeps/ as they were at BEFORE, or a skip where history is not at hand."""
    try:
        blob = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE, "src", "sweeps"],
                              capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the code before the redesign is not in this checkout's history ({exc})")
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(target, filter="data")
    return target


def _entries(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.npy")}


@pytest.mark.slow
def test_a_study_cache_and_checkpoint_made_before_the_redesign_still_work(in_tmp, flat_folder):
    old = _old_code(in_tmp / "old")
    args = sweep_args(in_tmp, flat_folder, 1)
    child = subprocess.run([sys.executable, "-m", "src.sweep", *args], cwd=old, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(old)}, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    cache = Path(os.environ["TLSWEEP_CACHE"])
    made_before = _entries(cache)
    assert any(k.startswith("images/") for k in made_before) and any(k.startswith("features/") for k in made_before)
    first = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").trials[0]

    # The same parameters again: the resumed trial needs exactly the entries the old code made.
    optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").enqueue_trial(first.params)
    result = sweep.run_sweep(sweep.parse_args(sweep_args(in_tmp, flat_folder, 2)))  # resumes: one more trial
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    assert result.n_finished == 2 and len(study.trials) == 2
    assert study.trials[0].params == first.params and study.trials[0].value == first.value
    assert _entries(cache) == made_before  # every entry found, none rebuilt, none added
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    parents = {client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"] for t in study.trials}
    assert parents == {result.parent_run_id}  # the old parent run, reused

    # The old trial's checkpoint, scored by the code now
    old_run = first.user_attrs["mlflow_run_id"]
    assert client.get_run(old_run).data.tags["optuna.state"] == "COMPLETE"
    code = final_test.main(["--run-id", old_run, "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db"])
    assert code == 0
    assert client.get_run(old_run).data.metrics["test/acc"] >= 0.0


@pytest.mark.slow
def test_the_same_sweep_trains_the_same_trials_as_before_the_redesign(in_tmp, flat_folder):
    """Same seed, same CPU: the old and the new code sample the same parameters and reach the same
    per-epoch validation accuracies (behaviour unchanged, not merely compatible)."""
    old = _old_code(in_tmp / "old")
    runs = {}
    for name in ("before", "after"):
        args = sweep_args(in_tmp / name, flat_folder, 3)
        (in_tmp / name).mkdir()
        if name == "before":
            child = subprocess.run([sys.executable, "-m", "src.sweep", *args], cwd=in_tmp / name, capture_output=True,
                                   text=True, env={**os.environ, "PYTHONPATH": str(old)}, timeout=600)
            assert child.returncode == 0, child.stderr[-3000:]
        else:
            os.chdir(in_tmp / name)
            assert sweep.main(args) == 0
        trials = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp / name}/optuna.db").trials
        runs[name] = [(t.state, t.params, t.intermediate_values, t.value) for t in trials]
    assert len(runs["before"]) == 3 and runs["after"] == runs["before"]
