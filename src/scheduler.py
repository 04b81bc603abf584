"""Running a study's trials in one worker: one at a time, capped at --trials finished trials for
the whole study (whatever other workers do), taking up what dead workers left before each."""
from __future__ import annotations

import logging
import time

import optuna
from tqdm import tqdm

from .config import TrialFault
from .objective import BARS, Context, Objective, raise_if_stopped, writing
from .recovery import FAIL_KIND_ATTR, FAIL_REASON_ATTR, recover
from .study import finished, update_best

log = logging.getLogger("tlsweep")


MAX_FAILED_IN_A_ROW = 5  # failed trials in a row that stop the sweep: the cause is not the parameters


class StopOnFailures:
    """Optuna callback: stop after MAX_FAILED_IN_A_ROW failed trials in a row."""

    def __init__(self, limit: int = MAX_FAILED_IN_A_ROW):
        self.limit, self.in_a_row, self.reason = limit, 0, None

    def __call__(self, study: optuna.Study, trial) -> None:
        if trial.user_attrs.get(FAIL_KIND_ATTR) == "surplus":
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


def optimize(study: optuna.Study, objective: Objective, ctx: Context, args, failures: StopOnFailures) -> None:
    """Run trials, one at a time, until the study has --trials finished ones (whatever earlier
    runs or other workers did; failed trials do not count), --timeout passes, or too many fail in
    a row. When the trials other workers are running would complete the count, wait: if one of
    them fails, this worker runs its replacement. Before each trial, take up what dead workers left."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with tqdm(total=args.trials, initial=len(finished(study)), desc="trials", unit="trial", disable=BARS) as bar:
        def after_trial(study, trial):
            if trial.user_attrs.get(FAIL_KIND_ATTR) == "surplus":
                return
            value = "-" if trial.value is None else f"{trial.value:.4f}"
            line = f"trial {trial.number}: {trial.state.name} valid_acc={value} {trial.params}"
            if trial.state == optuna.trial.TrialState.FAIL:
                line += (f"\n  failed ({trial.user_attrs.get(FAIL_KIND_ATTR, 'error')}): "
                         f"{trial.user_attrs.get(FAIL_REASON_ATTR, '')}")
            tqdm.write(line)
            update_best(ctx.tracker, ctx.parent_id, study)
            raise_if_stopped()

        while failures.reason is None and (deadline is None or time.monotonic() < deadline):
            raise_if_stopped()
            recover(study, ctx.tracker, ctx.parent_id)
            done = len(finished(study))
            bar.n = done
            bar.refresh()
            if done >= args.trials:
                return
            running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
            if done + running >= args.trials:
                time.sleep(POLL_S)
                continue
            try:
                with writing():  # Ctrl-C raises at once only while a trial computes
                    study.optimize(objective, n_trials=1, catch=(TrialFault,),
                                   callbacks=[objective.close_run, after_trial, failures])
            except ValueError:  # "Cannot tell a FAIL trial": another worker took ours over
                if objective.taken_over is None:
                    raise
                log.warning("trial %d was taken over by another worker; going on", objective.taken_over)
                objective.taken_over = None
