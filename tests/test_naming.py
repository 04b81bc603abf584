"""Default names (src/naming.py): an experiment per data set, a study per sweep file, data,
backbone and size, the fixed settings as the parent's params, and studies started under the
names before this scheme still resumed by the same command (the old code run for real)."""
from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import sweep_args
from test_compat import _old_code
from src import sweep

BEFORE = "83a5cb7d6e9bd037f923152adc1953412f0b8818"  # main before src/naming.py: study `<sweep>-<data>`, experiment = the sweep file's name


def _unnamed(tmp, data, trials, *extra):
    """sweep_args without --study-name: the default names."""
    args = sweep_args(tmp, data, trials, *extra)
    i = args.index("--study-name")
    return args[:i] + args[i + 2:]


def _studies(tmp) -> dict[str, int]:
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{tmp}/optuna.db")}


def test_default_names_keep_sweeps_of_other_backbones_and_sizes_apart(in_tmp, flat_folder, capsys):
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    first = sweep.run_sweep(sweep.parse_args(_unnamed(in_tmp, flat_folder, 1)))
    out = capsys.readouterr().out
    assert f"parent run (the whole sweep; final_test --run-id takes this one): {first.parent_run_id}" in out
    assert f"best trial's run (one trial's, under the parent): {first.best_run_id}" in out
    # another size and another backbone: new studies, not a refused resume
    second = sweep.run_sweep(sweep.parse_args(_unnamed(in_tmp, flat_folder, 1, "--image-size", "24")))
    third = sweep.run_sweep(sweep.parse_args(_unnamed(in_tmp, flat_folder, 1, "--backbone", "mobilenet_v2",
                                                      "--image-size", "32")))
    assert _studies(in_tmp) == {"default-flat-resnet18-16px": 1, "default-flat-resnet18-24px": 1,
                                "default-flat-mobilenet_v2-32px": 1}
    parents = [client.get_run(r.parent_run_id) for r in (first, second, third)]
    assert {client.get_experiment(p.info.experiment_id).name for p in parents} == {"flat"}  # one per data set
    params = parents[2].data.params  # the runs table compares sweeps by the fixed settings
    assert params["backbone"] == "mobilenet_v2" and params["image_size"] == "32" and params["weights"] == "none"
    assert params["max_epochs_phase2"] == "2" and params["search_size"] == "0" and params["batch_size"] == "8"
    # the same command again resumes its own study
    again = sweep.run_sweep(sweep.parse_args(_unnamed(in_tmp, flat_folder, 2, "--image-size", "24")))
    assert again.parent_run_id == second.parent_run_id and _studies(in_tmp)["default-flat-resnet18-24px"] == 2


@pytest.mark.slow
def test_a_study_named_before_is_resumed_by_the_same_command(in_tmp, flat_folder):
    """A sweep started by the code before these names (study `default-flat`, experiment `default`),
    run again by the code now: the same study and parent run go on; with another image size the
    old study is left alone and a new one starts."""
    old = _old_code(in_tmp / "old", BEFORE)
    four = ("--sweep", str(old / "sweeps" / "default.toml"))  # its own default file, so settings agree
    child = subprocess.run([sys.executable, "-m", "src.sweep", *_unnamed(in_tmp, flat_folder, 1, *four)], cwd=in_tmp,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(old)}, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert _studies(in_tmp) == {"default-flat": 1}
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("default").experiment_id],
                                   "tags.`tlsweep.role` = 'parent'")
    resumed = sweep.run_sweep(sweep.parse_args(_unnamed(in_tmp, flat_folder, 2, *four)))
    assert resumed.parent_run_id == parent.info.run_id and _studies(in_tmp) == {"default-flat": 2}
    assert client.get_experiment_by_name("flat") is None  # no empty experiment made beside it
    other = sweep.run_sweep(sweep.parse_args(_unnamed(in_tmp, flat_folder, 1, *four, "--image-size", "24")))
    assert _studies(in_tmp) == {"default-flat": 2, "default-flat-resnet18-24px": 1}
    assert other.parent_run_id != parent.info.run_id
