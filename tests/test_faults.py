"""Fault injection, for real: a sweep killed with SIGKILL mid-trial and resumed, SIGINT, a loss
driven to NaN, out of memory, truncated JPEGs, half-written cache and split files, a test file
changed after the split, and every bad input a user can give. Each test checks what was kept
(trials, runs, artifacts) and what the user was told."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import sweep_args as _args
from conftest import write_images
from src import final_test, sweep
from src import splits as S
from src import cache as C
from src.files import remove_dead_temps
from src.data import SPLIT_FILE, cache_dir, find_splits
from src.pipeline import Pipeline
from src.recovery import worker_id, worker_gone
from src.study import derive_seed

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname().replace(".", "-")  # as cache temp names spell it
ALIVE = optuna.trial.TrialState.RUNNING
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _study(tmp_path):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")


def _client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def _runs(client, role):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, f"tags.`tlsweep.role` = '{role}'", max_results=1000)


def _artifacts(client, run_id, path):
    return sorted(Path(a.path).name for a in client.list_artifacts(run_id, path))


# -- killed and interrupted sweeps (real subprocesses) ------------------------------------------

# Each epoch sleeps a little in the child, so the test can catch it in the middle of a trial.
_SLOW_CHILD = ("import sys, time; import src.train as T; f = T.train_epoch; "
               "T.train_epoch = lambda *a, **k: (time.sleep(0.4), f(*a, **k))[1]; "
               "from src.sweep import main; sys.exit(main(sys.argv[1:]))")


def _launch(tmp_path, args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # TLSWEEP_CACHE/TORCH_HOME from conftest included
    return subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_mid_trial(tmp_path, proc, number: int, timeout_s: float = 180):
    """Until trial `number` is running and has reported an epoch (the child is mid-trial)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            trials = _study(tmp_path).trials
        except Exception:  # the child has not created the study yet
            trials = []
        if len(trials) > number and trials[number].state == ALIVE and trials[number].intermediate_values:
            return trials[number]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"trial {number} never got going: {proc.communicate()}")


@pytest.mark.slow
def test_kill_9_mid_trial_then_the_same_command_resumes(in_tmp, flat_folder):
    args = _args(in_tmp, flat_folder, 3)
    proc = _launch(in_tmp, args)
    lost = _wait_until_mid_trial(in_tmp, proc, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client = _client(in_tmp)
    lost_run = lost.user_attrs["mlflow_run_id"]
    assert client.get_run(lost_run).info.status == "RUNNING"  # what a kill leaves behind

    assert sweep.main(args) == 0  # the same command
    study = _study(in_tmp)
    assert len([t for t in study.trials if t.state in FINISHED]) == 3  # 3 in total, not 3 more
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE  # finished before the kill: kept
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == lost.params and retry.state in FINISHED
    # MLflow: the lost run is closed, the retry says what it stands for and trains the same seed
    run = client.get_run(lost_run)
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
    assert "stopped" in run.data.tags["optuna.fail_reason"]
    again = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert again.data.tags["optuna.retry_of"] == "1"
    assert again.data.params["seed"] == run.data.params["seed"] == str(derive_seed(0, 1))
    parents = _runs(client, "parent")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # reused, not duplicated
    children = _runs(client, "trial")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [t.number for t in study.trials]
    assert not [r for r in children if r.info.status == "RUNNING"]
    for r in children:
        if r.data.tags["optuna.state"] == "COMPLETE":
            assert "phase2_best.pt" in _artifacts(client, r.info.run_id, "checkpoints")
    assert not list(cache_dir().rglob("*.tmp*"))  # no half-written cache file left


@pytest.mark.slow
def test_ctrl_c_closes_runs_prints_the_summary_and_the_trial_is_retried(in_tmp, flat_folder):
    args = _args(in_tmp, flat_folder, 2)
    proc = _launch(in_tmp, args)
    stopped = _wait_until_mid_trial(in_tmp, proc, 1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "re-run the same command" in err
    assert "study 's': 1 finished trials" in out  # the summary is still printed
    study = _study(in_tmp)
    trial = study.trials[1]
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["tlsweep.fail_kind"] == "interrupted"
    client = _client(in_tmp)
    run = client.get_run(stopped.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "INTERRUPTED"
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"
    assert study.trials[2].state == optuna.trial.TrialState.WAITING  # queued again by its own worker

    assert sweep.main(args) == 0
    study = _study(in_tmp)
    retry = study.trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == trial.params
    assert len([t for t in study.trials if t.state in FINISHED]) == 2


@pytest.mark.slow
def test_a_trial_left_running_by_a_dead_process_is_failed_and_queued_at_once(in_tmp, flat_folder):
    """No need to wait for the heartbeat's grace period when the worker was on this host."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db", direction="maximize")
    trial = study.ask({"head_lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    trial.set_user_attr("tlsweep.worker", {**worker_id(), "pid": dead.pid, "start": None})
    assert sweep.main(_args(in_tmp, flat_folder, 1)) == 0
    study = _study(in_tmp)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert study.trials[1].system_attrs["failed_trial"] == 0  # queued again, then run


# -- faults inside a trial ----------------------------------------------------------------------

def _poison(monkeypatch, trial_number: int, how):
    """Pipeline.model for one trial goes through `how(model)`; returns weakrefs to every model."""
    models, build = [], Pipeline.model
    target_seed = derive_seed(0, trial_number)

    def model(self, trial_seed):
        assert all(ref() is None for ref in models), "an earlier trial's model is still alive"
        m = build(self, trial_seed)
        if trial_seed == target_seed:
            how(m)
        models.append(weakref.ref(m))
        return m

    monkeypatch.setattr(Pipeline, "model", model)
    return models


@pytest.mark.slow
def test_nan_loss_fails_that_trial_only_with_the_reason(in_tmp, flat_folder, monkeypatch, capsys):
    _poison(monkeypatch, 1, lambda m: torch.nn.init.constant_(m.fc.weight, float("nan")))
    assert sweep.main(_args(in_tmp, flat_folder, 2)) == 0
    study = _study(in_tmp)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # 2 finished: --trials 2
    assert study.trials[1].user_attrs["tlsweep.fail_kind"] == "diverged"
    run = _client(in_tmp).get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "training loss became nan in phase 1, epoch 1" in run.data.tags["optuna.fail_reason"]
    assert "failed (diverged): training loss became nan" in capsys.readouterr().out


@pytest.mark.slow
def test_out_of_memory_fails_the_trial_and_frees_its_memory(in_tmp, flat_folder, monkeypatch):
    def oom_in_phase2(model):
        def hook(module, args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        model.register_forward_pre_hook(hook)  # the whole model runs in phase 2 only (phase 1: cached features)

    models = _poison(monkeypatch, 0, oom_in_phase2)
    assert sweep.main(_args(in_tmp, flat_folder, 1)) == 0
    assert len(models) == 2 and all(ref() is None for ref in models[:1])  # freed before trial 1 began
    study = _study(in_tmp)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[0].user_attrs["tlsweep.fail_kind"] == "out_of_memory"
    reason = _client(in_tmp).get_run(study.trials[0].user_attrs["mlflow_run_id"]).data.tags["optuna.fail_reason"]
    assert "out of memory on cpu at batch size 8" in reason and "--batch-size" in reason


@pytest.mark.slow
def test_failures_in_a_row_stop_the_sweep(in_tmp, flat_folder, monkeypatch, capsys):
    monkeypatch.setattr(Pipeline, "model", lambda self, seed: (_ for _ in ()).throw(RuntimeError("boom")))
    assert sweep.main(_args(in_tmp, flat_folder, 2)) == 1
    out, err = capsys.readouterr()
    assert "5 trials in a row failed" in err
    # Nothing to score, but where to look is still printed.
    assert "no trial completed yet" in out and "mlflow ui --port 5000" in out and "final_test" not in out
    assert [t.state.name for t in _study(in_tmp).trials] == ["FAIL"] * 5


def _truncated_jpeg(path: Path) -> None:
    """Overwrite an image with a JPEG cut off halfway (the name stays: the split is recorded)."""
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize("no_cache", [False, True])
def test_a_truncated_jpeg_is_skipped_counted_and_named(in_tmp, flat_folder, no_cache):
    victim = flat_folder / find_splits(flat_folder).train[3][0]
    _truncated_jpeg(victim)
    extra = ["--max-bad-fraction", "0.1"] + (["--no-cache"] if no_cache else [])
    assert sweep.main(_args(in_tmp, flat_folder, 2, *extra)) == 0
    client, study = _client(in_tmp), _study(in_tmp)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["data.skipped_images"] == "1"
        path = client.download_artifacts(run.info.run_id, "data/skipped_images.json", str(in_tmp / str(t.number)))
        skipped = json.loads(Path(path).read_text())["train"]
        assert list(skipped) == [str(victim.relative_to(flat_folder))] and "truncated" in skipped[list(skipped)[0]]
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["data.skipped_images"] == ("0" if no_cache else "1")  # decoded once: known up front


@pytest.mark.slow
def test_too_many_unreadable_images_decoded_once_stop_before_any_trial(in_tmp, flat_folder, capsys):
    victim = flat_folder / find_splits(flat_folder).train[3][0]
    _truncated_jpeg(victim)
    assert sweep.main(_args(in_tmp, flat_folder, 1)) == 2  # 1 of 21 > --max-bad-fraction 0.01
    err = capsys.readouterr().err
    assert str(victim) in err and "--max-bad-fraction" in err and "Traceback" not in err
    study = _study(in_tmp)
    assert study.trials == [] and "mlflow_parent_run_id" not in study.user_attrs


@pytest.mark.slow
def test_too_many_unreadable_images_mid_epoch_fail_the_trial(in_tmp, flat_folder, capsys):
    victim = flat_folder / find_splits(flat_folder).train[3][0]
    _truncated_jpeg(victim)
    assert sweep.main(_args(in_tmp, flat_folder, 1, "--no-cache")) == 1  # every trial meets it: 5 in a row
    study = _study(in_tmp)
    assert {t.user_attrs["tlsweep.fail_kind"] for t in study.trials} == {"bad_images"}
    run = _client(in_tmp).get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert str(victim) in run.data.tags["optuna.fail_reason"] and run.info.status == "FAILED"
    assert run.data.tags["data.skipped_images"] == "1"


# -- half-written files -------------------------------------------------------------------------

@pytest.mark.slow
def test_half_written_cache_files_are_rebuilt_and_change_nothing(in_tmp, flat_folder, caplog):
    first = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 1)))
    features = sorted((cache_dir() / "features").glob("*.npy"))
    images = sorted((cache_dir() / "images").glob("*.npy"))
    assert features and images
    for entry in features:  # as if the machine died mid-write (the json marker says complete)
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    for entry in images:  # same size, one byte changed: only the CRC can tell
        data = bytearray(entry.read_bytes())
        data[-7] ^= 0x5A
        entry.write_bytes(bytes(data))
    C._verified.clear()  # as a new process: this one already checked these entries
    planted = cache_dir() / "images" / f".x.{HOST}.999999999.abcd.tmp.npy"
    planted.write_bytes(b"\x93NUMPY half")  # a temp file a killed writer left
    second = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 1, "--study-name", "s2")))
    assert "corrupt or partial; rebuilding it" in caplog.text
    assert all(f"{entry} is corrupt" in caplog.text for entry in images)  # the CRC caught the flip
    assert not planted.exists()
    client = _client(in_tmp)
    history = [[m.value for m in client.get_metric_history(r.best_run_id, "valid/acc")] for r in (first, second)]
    assert history[0] == history[1]  # same seed, same data: the rebuilt cache changed nothing


def test_remove_dead_temps_keeps_a_live_writers_file(tmp_path):
    live = tmp_path / f".e.{HOST}.{os.getpid()}.ab.tmp.npy"
    dead = tmp_path / f".e.{HOST}.999999999.cd.tmp.npy"
    other_host = tmp_path / ".e.elsewhere.999999999.ef.tmp.npy"
    for f in (live, dead, other_host):
        f.write_bytes(b"x")
    assert remove_dead_temps(tmp_path) == 1
    assert live.exists() and not dead.exists() and other_host.exists()


def test_a_damaged_split_file_is_an_error_never_a_new_split(tmp_path):
    root = write_images(tmp_path / "flat", per_class=10)
    first = find_splits(root, seed=1)
    (root / SPLIT_FILE).write_text('{"seed": 1, "train": [["cat/cat_0')  # half-written by hand
    with pytest.raises(S.DataError, match="is damaged") as info:
        find_splits(root, seed=2)
    assert str(root / SPLIT_FILE) in str(info.value) and "dataset/split.json" in str(info.value)
    (root / SPLIT_FILE).unlink()  # deleted, and another seed: the cache dir's copy holds the split
    again = find_splits(root, seed=2)
    assert again.test == first.test and again.train == first.train
    assert (root / SPLIT_FILE).is_file()  # the copy is written back


# -- the sealed test split ----------------------------------------------------------------------

@pytest.mark.slow
def test_final_test_refuses_a_test_file_changed_after_the_split(in_tmp, flat_folder, capsys):
    result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 1)))
    victim = flat_folder / find_splits(flat_folder).test[0][0]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # same name, same size, other bytes
    victim.write_bytes(bytes(data))
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and str(victim.relative_to(flat_folder)) in err and "Traceback" not in err
    assert "final_test.count" not in _client(in_tmp).get_run(result.parent_run_id).data.tags  # nothing scored


# -- reproducibility ----------------------------------------------------------------------------

@pytest.mark.slow
def test_same_seed_same_data_same_trials_and_metrics(in_tmp, flat_folder):
    runs = []
    for name in ("a", "b"):
        args = _args(in_tmp, flat_folder, 3, "--storage", f"sqlite:///{in_tmp}/{name}.db",
                     "--tracking-uri", f"sqlite:///{in_tmp}/{name}-mlflow.db")
        result = sweep.run_sweep(sweep.parse_args(args))
        study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/{name}.db")
        client = MlflowClient(f"sqlite:///{in_tmp}/{name}-mlflow.db")
        runs.append([(t.params, client.get_run(t.user_attrs["mlflow_run_id"]).data.params["seed"],
                      [m.value for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "valid/loss")])
                     for t in study.trials])
        assert result.n_finished == 3
    assert runs[0] == runs[1]
    assert [seed for _, seed, _ in runs[0]] == [str(derive_seed(0, n)) for n in range(3)]


# -- bad input: a clear message, exit 2, no traceback, nothing started --------------------------

def _bad_data(tmp_path, kind):
    root = tmp_path / kind
    if kind == "layout":  # train/ without valid/ and test/
        write_images(root / "train")
    elif kind == "empty_class":
        write_images(root)
        (root / "zebra").mkdir()
        (root / "zebra" / "notes.txt").write_text("no images here")
    return root


@pytest.mark.parametrize("case, words", [
    ("layout", ["lacks", "valid"]),
    ("empty_class", ["zebra", "has no images"]),
    ("backbone", ["unknown backbone 'resnet19'"]),
    ("typo", ["unknown key(s) ['head_lrr']", "[search]"]),
    ("range", ["head_lr", "impossible range"]),
    ("storage", ["cannot open Optuna storage", "postgresql://"]),
    ("tracking", ["--tracking-uri http://127.0.0.1:9"]),
    ("fraction", ["--max-bad-fraction 1.5"]),
])
def test_bad_input_is_a_clear_error_and_starts_nothing(in_tmp, flat_folder, capsys, case, words):
    args = _args(in_tmp, flat_folder, 1)
    sweep_file = in_tmp / "bad.toml"
    good = (REPO / "sweeps" / "default.toml").read_text()
    if case in ("layout", "empty_class"):
        args[1] = str(_bad_data(in_tmp, case))
    elif case == "backbone":
        args += ["--backbone", "resnet19"]
    elif case == "typo":
        sweep_file.write_text(good.replace("head_lr = {", "head_lrr = {"))
        args += ["--sweep", str(sweep_file)]
    elif case == "range":
        sweep_file.write_text(good.replace("head_lr = { low = 1e-4, high = 1e-2", "head_lr = { low = 1e-2, high = 1e-4"))
        args += ["--sweep", str(sweep_file)]
    elif case == "storage":
        args[args.index("--storage") + 1] = "postgresql://nobody@127.0.0.1:9/none"
    elif case == "tracking":
        args[args.index("--tracking-uri") + 1] = "http://127.0.0.1:9"
    elif case == "fraction":
        args += ["--max-bad-fraction", "1.5"]
    try:
        code = sweep.main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert all(w in err for w in words), err
    assert "Traceback" not in err
    if (in_tmp / "optuna.db").exists():
        assert optuna.get_all_study_names(f"sqlite:///{in_tmp}/optuna.db") in ([], ["s"])
        if optuna.get_all_study_names(f"sqlite:///{in_tmp}/optuna.db"):
            assert _study(in_tmp).trials == []


@pytest.mark.parametrize("trials", ["0", "-3"])
def test_trials_below_one_is_refused(trials, capsys):
    with pytest.raises(SystemExit) as info:
        sweep.parse_args(["--trials", trials])
    assert info.value.code == 2 and f"--trials {trials}: give at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_non_image_files_and_small_images_are_counted_and_said(in_tmp, tmp_path, caplog):
    root = write_images(tmp_path / "small", per_class=9, size=6)  # 6 px images, 16 px crops
    (root / "cat" / "README.txt").write_text("not an image")
    (root / "dog" / "Thumbs.db").write_bytes(b"\0\0")
    result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, root, 1)))
    assert "2 non-image file(s)" in caplog.text
    assert "are smaller than the 18 px square" in caplog.text and "upscaled" in caplog.text
    client = _client(in_tmp)
    path = client.download_artifacts(result.parent_run_id, "dataset/summary.json", str(in_tmp))
    assert json.loads(Path(path).read_text())["ignored_non_image_files"] == 2


@pytest.mark.slow
def test_an_unreadable_test_image_is_skipped_and_recorded_by_final_test(in_tmp, split_folder, capsys):
    victim = sorted((split_folder / "test" / "cat").iterdir())[0]
    _truncated_jpeg(victim)  # unreadable from the start: the sweep hashes it as it is
    result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, split_folder, 1)))
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri]) == 2  # 1 of 9 > 0.01
    assert str(victim) in capsys.readouterr().err
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri, "--max-bad-fraction", "0.2"]) == 0
    out, err = capsys.readouterr()
    assert "1 unreadable test image(s) not scored" in err and "test/cat/" in err
    assert "(8 images)" in out
    tags = _client(in_tmp).get_run(result.parent_run_id).data.tags
    assert tags["final_test.skipped_images"] == "1" and tags["final_test.count"] == "1"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask by hand, as a worker would
def test_a_silent_worker_on_another_host_loses_its_trial_after_the_grace_period(in_tmp, monkeypatch):
    """Optuna's heartbeat path: the trial is failed, queued again, and its MLflow run closed."""
    from src import study as study_mod
    from src.recovery import LostTrials, recover
    from src.tracking import Tracker

    monkeypatch.setattr(study_mod, "GRACE_PERIOD_S", 1)
    tracker = Tracker(f"sqlite:///{in_tmp}/mlflow.db")
    study = study_mod.open_study("s", f"sqlite:///{in_tmp}/optuna.db", 0, on_lost=LostTrials(tracker))
    parent = tracker.create_parent(tracker.experiment_id("e"), "s", {})
    trial = study.ask({"head_lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    trial.set_user_attr("tlsweep.worker", {"host": "elsewhere", "pid": 1, "start": None})
    run_id = tracker.start_trial(parent, trial.number, {"head_lr": trial.params["head_lr"]})
    trial.set_user_attr("mlflow_run_id", run_id)
    study._storage.record_heartbeat(trial._trial_id)  # then silence
    recover(study, tracker, parent)
    assert study.trials[0].state == ALIVE  # within the grace period: still its worker's
    time.sleep(2.1)
    recover(study, tracker, parent)
    trials = study.trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert trials[1].state == optuna.trial.TrialState.WAITING and trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == 0
    run = tracker.client.get_run(run_id)
    assert run.info.status == "KILLED" and "stopped" in run.data.tags["optuna.fail_reason"]


@pytest.mark.slow
def test_a_stop_request_python_dropped_still_stops_the_sweep(in_tmp, flat_folder, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a garbage-collector callback (SQLAlchemy has
    such callbacks); the request stays set and the sweep stops at the next check (here: right
    after the epoch whose logging the Ctrl-C hit)."""
    from src.stopping import STOP
    from src.tracking import Tracker

    real_log_epoch = Tracker.log_epoch

    def log_epoch_under_dropped_ctrl_c(self, run_id, record):
        real_log_epoch(self, run_id, record)
        STOP.set()  # as if a Ctrl-C's exception had been dropped

    monkeypatch.setattr(Tracker, "log_epoch", log_epoch_under_dropped_ctrl_c)
    try:
        result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 3)))
    finally:
        STOP.clear()
    assert result.interrupted
    trials = _study(in_tmp).trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # stopped, and queued again
    assert trials[0].user_attrs["tlsweep.fail_kind"] == "interrupted" and len(trials[0].intermediate_values) == 1
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params


# Kills at the unlucky moments: after Optuna recorded a trial and before its run was closed.
_DIE_BEFORE_CLOSING = ("import os, sys; from src.record import TrialRecord; "
                       "TrialRecord.close_as_recorded = lambda self, study, trial: os._exit(137); "
                       "from src.sweep import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
def test_a_kill_after_optuna_recorded_the_trial_closes_its_run_as_recorded(in_tmp, flat_folder):
    args = _args(in_tmp, flat_folder, 2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", _DIE_BEFORE_CLOSING, *args], cwd=in_tmp, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 137, child.stderr
    first = _study(in_tmp).trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    client = _client(in_tmp)
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "RUNNING"
    assert sweep.main(args) == 0
    run = client.get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"  # as Optuna recorded
    study = _study(in_tmp)
    assert not [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]  # not retried
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_ctrl_c_while_optuna_records_a_trial_waits_for_the_record(in_tmp, flat_folder, monkeypatch, capsys, caplog):
    from optuna.study import _optimize

    real_tell, calls = _optimize._tell_with_warning, []

    def tell_under_ctrl_c(*args, **kwargs):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # lands in the middle of the bookkeeping
        calls.append(1)
        return real_tell(*args, **kwargs)

    monkeypatch.setattr(_optimize, "_tell_with_warning", tell_under_ctrl_c)
    assert sweep.main(_args(in_tmp, flat_folder, 3)) == 130
    assert "Traceback" not in capsys.readouterr().err and "re-run the same command" in caplog.text
    study = _study(in_tmp)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # recorded whole, then stopped
    run = _client(in_tmp).get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"


def test_a_worker_in_another_pid_namespace_is_never_declared_dead(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = {**worker_id(), "pid": dead.pid}
    assert worker_gone(here)
    assert not worker_gone({**here, "pidns": -1})     # a container with the same hostname
    assert not worker_gone({**here, "boot": "other"})  # another boot (or machine)
    assert not worker_gone({**here, "host": "elsewhere"})
    assert not worker_gone(worker_id())                # this very process


@pytest.mark.slow
def test_a_damaged_split_record_on_the_parent_is_logged_again_on_resume(in_tmp, flat_folder, capsys):
    args = _args(in_tmp, flat_folder, 1)
    result = sweep.run_sweep(sweep.parse_args(args))
    client = _client(in_tmp)
    local = Path(client.get_run(result.parent_run_id).info.artifact_uri.removeprefix("file://")) / "dataset" / "split.json"
    local.write_text(local.read_text()[:100])  # a kill while MLflow copied it
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "dataset/split.json" in err and "is damaged" in err and "Traceback" not in err
    assert sweep.main(args) == 0  # resuming logs it again
    assert json.loads(local.read_text())["test_fingerprint"]
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri]) == 0


def test_a_corrupt_header_of_any_kind_is_an_unreadable_image(tmp_path):
    from src.data import BadImage, ImageList, build_transform

    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (0x7FFF0000).to_bytes(4, "big") * 2  # IHDR width and height: a "decompression bomb"
    path.write_bytes(bytes(data))
    item = ImageList(tmp_path, [("bomb.png", 0)], build_transform("none", 8, [0.5] * 3, [0.5] * 3, False),
                     skip_bad=True)[0]
    assert isinstance(item, BadImage) and item.path == "bomb.png" and "Error" in item.reason
