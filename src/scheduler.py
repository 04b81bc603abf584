"""Running a study's trials in one worker: one at a time, capped at --trials finished trials for
the whole study (whatever other workers do), taking up what dead workers left before each."""
from __future__ import annotations

import logging
import time

import optuna
from tqdm import tqdm

from . import trials as T
from .errors import Surplus, TrialFault
from .record import BARS
from .recovery import recover
from .stopping import raise_if_stopped, writing
from .study import update_best
from .trial import Objective
from .trials import FAIL_KIND_ATTR, FAIL_REASON_ATTR

log = logging.getLogger("tlsweep")


MAX_FAILED_IN_A_ROW = 5  # failed trials in a row that stop the sweep: the cause is not the parameters


class StopOnFailures:
    """Optuna callback: stop after MAX_FAILED_IN_A_ROW failed trials in a row."""

    def __init__(self, limit: int = MAX_FAILED_IN_A_ROW):
        self.limit, self.in_a_row, self.reason = limit, 0, None

    def __call__(self, study: optuna.Study, trial) -> None:
        if trial.user_attrs.get(FAIL_KIND_ATTR) == Surplus.kind:
            return  # not a failure: another worker took the last place
        if trial.state == optuna.trial.TrialState.FAIL:
            self.in_a_row += 1
        elif trial.state.is_finished():
            self.in_a_row = 0
        if self.in_a_row >= self.limit:
            self.reason = (f"{self.in_a_row} trials in a row failed (the last: trial {trial.number}, "
                           f"{trial.user_attrs.get(FAIL_KIND_ATTR, 'error')}); see optuna.fail_reason on their runs")
            study.stop()


POLL_S = 2.0  # how often a worker with nothing to start looks whether another worker's trial failed


def optimize(study: optuna.Study, objective: Objective, trials: int, timeout_s: float | None) -> str | None:
    """Run trials, one at a time, until the study has `trials` finished ones (whatever earlier
    runs or other workers did; failed trials do not count), `timeout_s` passes, or too many fail in
    a row. When the trials other workers are running would complete the count, wait: if one of
    them fails, this worker runs its replacement. Before each trial, take up what dead workers left.
    Returns why it stopped early (too many failures in a row), or None."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failures = StopOnFailures()
    record = objective.ctx.record
    tracker, parent_id = record.tracker, record.parent_id
    with tqdm(total=trials, initial=len(T.finished(study)), desc="trials", unit="trial", disable=BARS) as bar:
        def after_trial(study, trial):
            if trial.user_attrs.get(FAIL_KIND_ATTR) == Surplus.kind:
                return
            value = "-" if trial.value is None else f"{trial.value:.4f}"
            line = f"trial {trial.number}: {trial.state.name} valid_acc={value} {trial.params}"
            if trial.state == optuna.trial.TrialState.FAIL:
                line += (f"\n  failed ({trial.user_attrs.get(FAIL_KIND_ATTR, 'error')}): "
                         f"{trial.user_attrs.get(FAIL_REASON_ATTR, '')}")
            tqdm.write(line)
            update_best(tracker, parent_id, study)
            raise_if_stopped()

        while failures.reason is None and (deadline is None or time.monotonic() < deadline):
            raise_if_stopped()
            recover(study, tracker, parent_id)
            done = len(T.finished(study))
            bar.n = done
            bar.refresh()
            if done >= trials:
                return None
            if done + len(T.running(study)) >= trials:
                time.sleep(POLL_S)
                continue
            try:
                with writing():  # Ctrl-C raises at once only while a trial computes
                    study.optimize(objective, n_trials=1, catch=(TrialFault,),
                                   callbacks=[record.close_as_recorded, after_trial, failures])
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as exc:
                if not T.taken_over(exc):
                    raise
                log.info("a trial of this worker was finished by another worker; going on")
    return failures.reason
