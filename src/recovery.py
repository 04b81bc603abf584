"""Taking up what a killed, crashed or interrupted sweep left behind.

- Every trial records the worker running it (`tlsweep.worker`: host, pid, process start time),
  and RDB storages keep Optuna's heartbeat per running trial.
- A RUNNING trial whose worker is gone is failed and its parameters are queued again, as a
  WAITING trial carrying Optuna's retry attributes (`failed_trial`, `retry_history`, read by
  `RetryHeartbeatStaleTrialCallback.retried_trial_number`). Gone means: on this host, the process
  is dead (seen at once); elsewhere, no heartbeat for GRACE_PERIOD_S (Optuna checks that before
  each trial, so another worker picks the trial up mid-sweep).
- A trial stopped by Ctrl-C (`tlsweep.fail_kind` = interrupted) is queued again the same way.
- MLflow trial runs still RUNNING although their trial is over are closed as KILLED.
A retry keeps its original trial's seed, so it trains exactly what the lost trial would have.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from .tracking import Tracker

log = logging.getLogger("tlsweep")
HEARTBEAT_INTERVAL_S = 10    # how often a running trial says it is alive
GRACE_PERIOD_S = 60          # silence after which another worker may take the trial over
MAX_RETRIES = 3              # a trial whose workers keep dying is not queued forever
WORKER_ATTR = "tlsweep.worker"
FAIL_KIND_ATTR = "tlsweep.fail_kind"   # diverged | out_of_memory | bad_images | error | interrupted
FAIL_REASON_ATTR = "tlsweep.fail_reason"
LOST = ("the worker running this trial stopped (killed, crashed or lost) before it finished; "
        "its parameters were queued again")


def _process_start(pid: int) -> str | None:
    """Start time of a process (Linux), to tell a reused pid from the original process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def process_alive(pid: int) -> bool:
    """Whether a process of this host exists (someone else's counts). On Windows, signal 0 would
    be CTRL_C_EVENT: assume alive there and leave dead workers to the heartbeat."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_gone(worker: dict | None) -> bool:
    """True only when sure: the worker ran on this host and its process no longer exists."""
    if not worker or worker.get("host") != socket.gethostname():
        return False
    pid = int(worker["pid"])
    if pid == os.getpid():
        return False
    if not process_alive(pid):
        return True
    start = _process_start(pid)
    return bool(worker.get("start") and start and start != worker["start"])  # pid reused


def original_number(study: optuna.Study, trial) -> int:
    """The number of the trial a retry stands in for (its own number if it is not a retry)."""
    attrs = study._storage.get_trial_system_attrs(trial._trial_id)
    history = attrs.get("retry_history") or [trial.number]
    return int(history[0])


def queue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue the trial's parameters again (what Optuna's RetryHeartbeatStaleTrialCallback does,
    without copying the lost trial's user attributes: its run id and failure are not the retry's)."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        log.warning("trial %d was lost %d times; not queued again", history[0], len(history))
        return
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history}))
    log.info("trial %d (%s) queued again with the same parameters", trial.number,
             trial.user_attrs.get(FAIL_KIND_ATTR, "lost"))


class LostTrials:
    """The storage's heartbeat-stale callback: queue the trial again and close its MLflow run."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        queue_retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracker.run_status(run_id) == "RUNNING":
            self.tracker.end_run(run_id, "FAIL", LOST, status="KILLED")


def recover(study: optuna.Study, tracker: Tracker, parent_id: str) -> None:
    """Fail trials whose worker is gone and queue them again, queue interrupted trials again,
    and close the MLflow runs of trials that are over."""
    lost = LostTrials(tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat-stale, any host: calls `lost` via the storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_gone(t.user_attrs.get(WORKER_ATTR)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("trial %d: its worker (pid %s) is gone; marked failed", t.number, t.user_attrs[WORKER_ATTR]["pid"])
            lost(study, study._storage.get_trial(t._trial_id))
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if (t.state == TrialState.FAIL and t.user_attrs.get(FAIL_KIND_ATTR) == "interrupted"
                and t.number not in retried):
            queue_retry(study, t)
    close_orphan_runs(study, tracker, parent_id)


def close_orphan_runs(study: optuna.Study, tracker: Tracker, parent_id: str) -> None:
    """Trial runs still RUNNING whose trial is over (or that no trial owns) are closed as KILLED."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for run in tracker.children(parent_id):
        if run.info.status != "RUNNING":
            continue
        trial = by_number.get(int(run.data.tags.get("optuna.trial_number", -1)))
        if trial is not None and not trial.state.is_finished():
            continue  # still running (another worker) or waiting
        if trial is not None and trial.state != TrialState.FAIL and trial.user_attrs.get("mlflow_run_id") == run.info.run_id:
            tracker.end_run(run.info.run_id, trial.state.name)  # stopped between its two last writes
            continue
        tracker.end_run(run.info.run_id, "FAIL", LOST, status="KILLED")
        log.info("closed MLflow run %s of trial %s, left running by a stopped worker",
                 run.info.run_id, run.data.tags.get("optuna.trial_number"))
