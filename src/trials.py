"""What a study and its trials record, how to find trials, and the one module that uses Optuna's
private storage API (`study._storage`, `trial._trial_id`, `study._study_id`).

Attribute names, in one place (Optuna's own retry attributes, `failed_trial` and
`retry_history`, are read by `RetryHeartbeatStaleTrialCallback.retried_trial_number` too):
"""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

# user attributes of a trial
WORKER_ATTR = "tlsweep.worker"          # host, boot id, pid namespace, pid, start time of its worker
RUN_ID_ATTR = "mlflow_run_id"           # the trial's MLflow run
FAIL_KIND_ATTR = "tlsweep.fail_kind"    # diverged | out_of_memory | bad_images | error | interrupted | surplus
INTERRUPTED = "interrupted"             # the fail kind of a trial a Ctrl-C or SIGTERM stopped
FAIL_REASON_ATTR = "tlsweep.fail_reason"
PRUNE_REASON_ATTR = "tlsweep.prune_reason"
# system attributes of a trial queued again
FAILED_TRIAL_ATTR = "failed_trial"      # Optuna's: the number of the trial it retries
RETRY_HISTORY_ATTR = "retry_history"    # Optuna's: the numbers it stands for, the first one first
TIMES_LOST_ATTR = "tlsweep.times_lost"  # how often its workers died (counts toward MAX_RETRIES)
# user attributes of the study
STUDY_UID_ATTR = "tlsweep.study_uid"    # ties a study to its parent run, whatever the store
PARENT_RUN_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "sweep_settings"        # fixed settings and search space, compared on resume
VALID_IMAGES_ATTR = "tlsweep.valid_images"  # readable validation images: the n of accuracy intervals
STEPS_ATTR = "tlsweep.steps"            # how its trials number their epochs (STEPS)
STEPS = "phase-aligned"                 # phase-1 epoch e = step e, phase-2 epoch e = max_epochs_phase1 + e
# the confirmation jobs' study (src/confirm.py): `<study name>:confirm` in the same storage
CONFIRM_SUFFIX = ":confirm"
JOB_ATTR = "tlsweep.job"                # system attribute of a job: {"trial": original trial number, "fold": f}


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count toward --trials: complete or pruned (failed ones do not)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def best(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial (the first of equals), or None: the one winner everything names."""
    return max(completed(study), key=lambda t: t.value, default=None)


def among_best(study: optuna.Study, value: float, k: int) -> bool:
    """Whether a trial finishing with `value` is among the `k` best complete trials so far (ties
    in): `--keep-checkpoints`. A trial among the k best at the end was among them when it finished."""
    return sum(t.value > value for t in completed(study)) < k


def run_id(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(RUN_ID_ATTR)


def confirmed_winner(tags: dict) -> tuple[str, str] | None:
    """(trial number, run id) the confirmation (src/confirm.py) chose, from the parent run's tags,
    if it was made for the study's best trial as they record it now (a later, better trial makes
    it stale; `confirm.best_trial` is written last)."""
    if tags.get("confirm.winner_run_id") and tags.get("confirm.best_trial") == tags.get("best.trial_number"):
        return tags["confirm.winner_trial"], tags["confirm.winner_run_id"]
    return None


def winner(tags: dict) -> tuple[str, str, str] | None:
    """(kind, run id, trial number) of the model a sweep's final test scores, from the parent run's
    tags: the single model it selected (the confirmed trial, src/confirm.py, if made for the best
    trial as it is now, else the best trial), or the candidate chosen beside it on validation
    (`ensemble` or `soup`, src/winner.py) if chosen from it; None before any trial completed."""
    picked = confirmed_winner(tags)
    number, run_id = picked or (tags.get("best.trial_number"), tags.get("best.run_id"))
    if not run_id:
        return None
    if tags.get("winner.run_id") and tags.get("winner.best_trial") == number:
        return tags.get("winner.kind", "trial"), tags["winner.run_id"], number
    return "trial", run_id, number


def one_model(accs: dict[str, float]) -> str:
    """The one-model candidate the ensemble competes with (src/winner.py), from the candidates'
    validation accuracies (`trial` always among them): the soup if it beats the single."""
    return "soup" if accs.get("soup", -1.0) > accs["trial"] else "trial"


# -- Optuna's private API, used here only ---------------------------------------------------------
def original_number(trial: optuna.Trial) -> int:
    """The number of the trial a live trial stands in for: the lost trial it retries, or its own."""
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    return int((attrs.get(RETRY_HISTORY_ATTR) or [trial.number])[0])


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """A live trial as the storage has it now (with its system attributes)."""
    return trial.study._storage.get_trial(trial._trial_id)


def claim_failed(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial | None:
    """Mark a RUNNING trial FAIL; the updated trial for exactly one caller (the one whose write
    won), None for the others and when it was finished already."""
    try:
        won = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        won = False
    return study._storage.get_trial(trial._trial_id) if won else None


def with_steps(trial: FrozenTrial, values: dict[int, float]) -> FrozenTrial:
    """A copy of a trial with other intermediate values (all else, its id included, the same)."""
    return FrozenTrial(number=trial.number, state=trial.state, value=None, values=trial.values,
                       datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
                       params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
                       system_attrs=trial.system_attrs, intermediate_values=values, trial_id=trial._trial_id)


def storage_identity(study: optuna.Study) -> tuple[str, int]:
    """(the storage's URL or journal path, the study's id in it): the same for every worker."""
    storage = study._storage
    url = getattr(storage, "url", None) or getattr(getattr(storage, "_backend", None), "_file_path", "") or ""
    return str(url), study._study_id


def taken_over(exc: BaseException) -> bool:
    """Whether `study.optimize` failed because the trial it ran was finished by someone else: a
    worker that found its heartbeat stale failed it and queued it again (Optuna then refuses to
    record it: "Cannot tell a FAIL trial")."""
    if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
        return True
    return isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a")


def side_study(study: optuna.Study, suffix: str) -> optuna.Study:
    """A study of our own beside this one, in the same storage object (so with its heartbeat
    and lost-trial callback): created by the first caller, loaded by the others."""
    return optuna.create_study(study_name=study.study_name + suffix, storage=study._storage,
                               load_if_exists=True, direction="maximize")


def heartbeat(trial: optuna.Trial):
    """Optuna's heartbeat for a trial run outside `study.optimize` (a context; nothing where the
    storage has none): another worker takes the trial over when it goes silent."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, trial.study._storage)
