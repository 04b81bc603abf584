"""Taking up what a killed, crashed or interrupted sweep left behind.

- Every trial records the worker running it (`tlsweep.worker`: host, pid, process start time),
  and RDB storages keep Optuna's heartbeat per running trial.
- A RUNNING trial whose worker is gone is failed and its parameters are queued again, as a
  WAITING trial carrying Optuna's retry attributes (`failed_trial`, `retry_history`, read by
  `RetryHeartbeatStaleTrialCallback.retried_trial_number`). Gone means: on this host, the process
  is dead (seen at once; "this host" means the same hostname, boot id and pid namespace);
  elsewhere, no heartbeat for GRACE_PERIOD_S (Optuna checks that before each trial, so another
  worker picks the trial up mid-sweep). Exactly one worker wins the FAIL and queues the retry.
- A trial stopped by Ctrl-C (`tlsweep.fail_kind` = interrupted) is queued again the same way,
  by its own worker as it stops (so no two workers queue it).
- MLflow trial runs still RUNNING although their trial is over are closed as KILLED.
A retry keeps its original trial's seed, so it trains exactly what the lost trial would have.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import trials as T
from .files import process_alive
from .tracking import ROLE, Tracker
from .trials import FAIL_KIND_ATTR, FAIL_REASON_ATTR, PRUNE_REASON_ATTR, WORKER_ATTR

log = logging.getLogger("tlsweep")
HEARTBEAT_INTERVAL_S = 10    # how often a running trial says it is alive
GRACE_PERIOD_S = 60          # silence after which another worker may take the trial over
MAX_RETRIES = 3              # a trial whose workers keep dying is not queued forever
LOST = ("the worker running this trial stopped (killed, crashed or lost) before it finished; "
        "its parameters were queued again")


def _process_start(pid: int) -> str | None:
    """Start time of a process (Linux), to tell a reused pid from the original process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _namespace() -> dict:
    """What tells this machine's process table apart from another's with the same hostname
    (containers sharing a hostname, a reboot): the boot id and the pid namespace (Linux)."""
    ns = {}
    for key, read in (("boot", lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
                      ("pidns", lambda: os.stat("/proc/self/ns/pid").st_ino)):
        try:
            ns[key] = read()
        except OSError:
            ns[key] = None
    return ns


def worker_id() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), **_namespace(), "pid": pid, "start": _process_start(pid)}


def worker_gone(worker: dict | None) -> bool:
    """True only when sure: the worker ran in this process table and its process is gone."""
    here = {"host": socket.gethostname(), **_namespace()}
    if not worker or any(worker.get(k) != v for k, v in here.items()):
        return False
    pid = int(worker["pid"])
    if pid == os.getpid():
        return False
    if not process_alive(pid):
        return True
    start = _process_start(pid)
    return bool(worker.get("start") and start and start != worker["start"])  # pid reused


def queue_retry(study: optuna.Study, trial: FrozenTrial, count: bool = True) -> None:
    """Queue the trial's parameters again (what Optuna's RetryHeartbeatStaleTrialCallback does,
    without copying the lost trial's user attributes: its run id and failure are not the retry's).
    `count`: a lost worker counts toward MAX_RETRIES; a Ctrl-C does not."""
    history = [*trial.system_attrs.get(T.RETRY_HISTORY_ATTR, []), trial.number]
    lost = trial.system_attrs.get(T.TIMES_LOST_ATTR, 0) + (1 if count else 0)
    if lost > MAX_RETRIES:
        log.warning("trial %d was lost %d times; not queued again", history[0], lost)
        return
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={**trial.system_attrs, T.FAILED_TRIAL_ATTR: history[0], T.RETRY_HISTORY_ATTR: history,
                      T.TIMES_LOST_ATTR: lost}))
    log.info("trial %d (%s) queued again with the same parameters", trial.number,
             trial.user_attrs.get(FAIL_KIND_ATTR, "lost"))


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again the trials a stop interrupted in this process that are not queued yet (Optuna's
    record says which: FAIL, kind `interrupted`, this worker); returns their numbers. Read from the
    study, so a second Ctrl-C during the bookkeeping cannot lose one."""
    me = worker_id()
    trials = study.get_trials(deepcopy=False)
    queued = {n for t in trials for n in t.system_attrs.get(T.RETRY_HISTORY_ATTR, [])}
    stopped = [t for t in trials if t.state == TrialState.FAIL and t.number not in queued
               and t.user_attrs.get(FAIL_KIND_ATTR) == T.INTERRUPTED and t.user_attrs.get(WORKER_ATTR) == me]
    for t in stopped:
        queue_retry(study, t, count=False)
    return [t.number for t in stopped]


class LostTrials:
    """The storage's heartbeat-stale callback: queue the trial again and close its MLflow run
    (also a run already closed: Optuna's record is the truth, and it says the trial was lost)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        queue_retry(study, trial)
        run_id = T.run_id(trial)
        if run_id and self.tracker.run_status(run_id) is not None:
            self.tracker.end_run(run_id, "FAIL", LOST, status="KILLED")


def _lost(trial: FrozenTrial) -> bool:
    """A RUNNING trial whose worker is surely gone: its process on this machine has exited, or it
    never said who it was (killed right after Optuna created it) and is older than the grace period."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is not None:
        return worker_gone(worker)
    started = trial.datetime_start
    return started is not None and (datetime.now() - started).total_seconds() > GRACE_PERIOD_S


def recover(study: optuna.Study, tracker: Tracker, parent_id: str) -> None:
    """Fail the trials whose worker is gone and queue them again, and close the MLflow runs of
    trials that are over. (An interrupted trial was queued again by its own worker.)"""
    recover_lost(study, tracker)
    close_orphan_runs(study, tracker, parent_id)


def recover_lost(study: optuna.Study, tracker: Tracker) -> None:
    """Fail the RUNNING trials whose worker is gone (heartbeat-stale, or dead on this machine),
    queue them again and close their runs (also for the confirmation jobs' study, src/confirm.py)."""
    lost = LostTrials(tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat-stale, any host: calls `lost` via the storage
    for t in T.running(study):
        if not _lost(t):
            continue
        claimed = T.claim_failed(study, t)  # for exactly one worker: only that one queues it again
        if claimed is not None:
            log.warning("trial %d of study %r: its worker is gone; marked failed", t.number, study.study_name)
            lost(study, claimed)


def close_orphan_runs(study: optuna.Study, tracker: Tracker, parent_id: str) -> None:
    """Trial runs still RUNNING whose trial is over are closed as Optuna recorded it (a kill came
    between Optuna's record and the run's closing), or as KILLED when the trial was lost or no
    trial owns the run."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for run in tracker.children(parent_id):
        if run.info.status != "RUNNING" or run.data.tags.get(ROLE) != "trial":
            continue  # the soup and confirmation runs are not the trials' (src/confirm.py closes its own)
        trial = by_number.get(int(run.data.tags.get("optuna.trial_number", -1)))
        if trial is not None and not trial.state.is_finished():
            continue  # still running (another worker) or waiting
        own = trial is not None and T.run_id(trial) == run.info.run_id
        kind = trial.user_attrs.get(FAIL_KIND_ATTR) if own else None
        if own and trial.state != TrialState.FAIL:
            tracker.end_run(run.info.run_id, trial.state.name, trial.user_attrs.get(PRUNE_REASON_ATTR))
        elif own and kind is not None:  # a fault of the trial, recorded before the kill
            tracker.end_run(run.info.run_id, "FAIL", trial.user_attrs.get(FAIL_REASON_ATTR),
                            tags={FAIL_KIND_ATTR: kind})
        else:
            tracker.end_run(run.info.run_id, "FAIL", LOST, status="KILLED")
        log.info("closed MLflow run %s of trial %s, left open by a stopped worker",
                 run.info.run_id, run.data.tags.get("optuna.trial_number"))
