"""The one atomic write and the one cleaner of dead writers' temp files (src/files.py), and how a
stopped or taken-over trial is told (src/recovery.py, src/trials.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from src.files import host, remove_dead_temps, temp_path, write_atomic, write_json_atomic
from src.recovery import requeue_interrupted, worker_id
from src.trials import taken_over


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "entry.json"
    write_json_atomic(target, {"v": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"v": 2')  # half written
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_text() == '{\n "v": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.json"]


def test_a_folder_is_written_atomically_too(tmp_path):
    target = tmp_path / "demo"
    write_atomic(target, lambda tmp: (tmp.mkdir(), (tmp / "a.png").write_bytes(b"x")))
    assert (target / "a.png").read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_temp_names_keep_the_suffix_and_name_their_writer(tmp_path):
    tmp = temp_path(tmp_path / "abc.npy")
    assert tmp.name.startswith(f".abc.{host()}.{os.getpid()}.") and tmp.name.endswith(".tmp.npy")


def test_the_cleaner_knows_new_and_old_temp_names_and_keeps_live_or_foreign_ones(tmp_path):
    dead = _dead_pid()
    gone = [tmp_path / f".abc.{host()}.{dead}.1234abcd.tmp.npy",   # now, and cache entries before
            tmp_path / f".split.json.{dead}.tmp",                   # a json file before
            tmp_path / f".demo-digits.{dead}.tmp"]                  # the demo folder before
    kept = [tmp_path / f".abc.{host()}.{os.getpid()}.1234abcd.tmp.npy",  # a live writer
            tmp_path / f".abc.elsewhere.{dead}.1234abcd.tmp.npy",       # another host's
            tmp_path / f".notes.{dead}.txt"]                             # not a temp name
    for p in gone[:2] + kept:
        p.write_bytes(b"half")
    gone[2].mkdir()
    (gone[2] / "3").mkdir()
    assert remove_dead_temps(tmp_path, "split.json") == 1 and not gone[1].exists()  # its own only
    assert remove_dead_temps(tmp_path) == 2
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


def test_this_workers_interrupted_trials_are_queued_again_once():
    """Read from Optuna's record, so a second Ctrl-C during the bookkeeping cannot lose one."""
    study = optuna.create_study(direction="maximize")
    dist = {"head_lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for worker, kind in ((worker_id(), "interrupted"), ({**worker_id(), "pid": 1}, "interrupted"),
                         (worker_id(), "diverged")):
        trial = study.ask(dist)
        trial.set_user_attr("tlsweep.worker", worker)
        trial.set_user_attr("tlsweep.fail_kind", kind)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert requeue_interrupted(study) == [0]          # not another worker's, not a fault
    retry = study.trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["retry_history"] == [0]
    assert retry.params == study.trials[0].params
    assert requeue_interrupted(study) == [] and len(study.trials) == 4  # once


def test_a_trial_finished_by_another_worker_is_told_apart_from_other_errors():
    assert taken_over(ValueError("Cannot tell a FAIL trial."))
    assert taken_over(optuna.exceptions.UpdateFinishedTrialError("finished"))
    assert not taken_over(ValueError("something else"))
