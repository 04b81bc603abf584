"""The confirmation's folds and jobs (src/confirm.py): the re-drawn splits, each job's outcome
from its tries in the side study `<study>:confirm`, the runs a killed worker left open, and how
well a search size ranked the configurations."""
from __future__ import annotations

import logging
import random
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import model as M
from . import trials as T
from .config import TrialConfig
from .device import split_cores
from .pipeline import Pipeline
from .record import MISTAKES_SHOWN
from .recovery import worker_id
from .soup import load
from .stats import spearman
from .stopping import writing
from .study import derive_seed
from .tracking import ROLE as TR_ROLE, Tracker
from .train import PhaseResult, fit_phase, make_optimizer

log = logging.getLogger("tlsweep")
FAULT_ATTR = "tlsweep.job_fault"  # on a job's try whose training failed as a trial fails: it scores 0
MAX_DEAD_TRIES = 5                # a job whose tries keep dying scores 0 after this many
FOLD_SEED = 7_000_000  # fold f's seed: derive_seed(study seed, FOLD_SEED + f), apart from trial numbers
FULL = -1          # the job of a configuration on the original split at full size (a search size)
RELIABLE_FROM = 5  # a rank agreement over fewer configurations is flagged unreliable
ROLES = ("confirm", "full")  # the runs of re-drawn splits; of the original split at full size (--search-size)


@dataclass(frozen=True)
class Fold:
    number: int
    seed: int
    train: list[int]   # pool rows (`pipeline.pool`)
    valid: list[int]


def draw_folds(pool: list[tuple[int, int]], valid_labels: list[int], folds: int, study_seed: int) -> list[Fold]:
    """Stratified re-draws of the pool ((pool row, label) pairs): each fold's validation part has
    as many images of each class as `valid_labels` (the original valid split's)."""
    want, by_class = Counter(valid_labels), defaultdict(list)
    for row, label in pool:
        by_class[label].append(row)
    out = []
    for f in range(folds):
        seed = derive_seed(study_seed, FOLD_SEED + f)
        rng, train, valid = random.Random(seed), [], []
        for label in sorted(by_class):
            rows = sorted(by_class[label])
            rng.shuffle(rows)
            valid += rows[:want[label]]
            train += rows[want[label]:]
        out.append(Fold(f, seed, sorted(train), sorted(valid)))
    return out


def job_of(trial: FrozenTrial) -> tuple[int, int] | None:
    job = trial.system_attrs.get(T.JOB_ATTR)
    return (int(job["trial"]), int(job["fold"])) if job else None


def outcomes(side: optuna.Study) -> dict[tuple[int, int], float | None]:
    """(trial, fold) -> its best valid accuracy; 0.0 for a job whose training failed as a trial
    fails (diverged, out of memory, ...: the recipe is not robust there) or that died
    MAX_DEAD_TRIES times; None while a try of it waits or runs. A job whose tries all died
    (interrupted, its worker lost, a storage error, a duplicate) is left out: it is queued again."""
    by_job = defaultdict(list)
    for t in side.get_trials(deepcopy=False):
        if (key := job_of(t)) is not None:
            by_job[key].append(t)
    out = {}
    for key, tries in by_job.items():
        done = [t.value for t in tries if t.state == TrialState.COMPLETE]
        if done:
            out[key] = done[0]
        elif any(t.user_attrs.get(FAULT_ATTR) for t in tries) or len(tries) >= MAX_DEAD_TRIES:
            out[key] = 0.0
        elif any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in tries):
            out[key] = None
    return out


def completed_runs(side: optuna.Study, fold: int) -> dict[int, str]:
    """trial -> the run of the earliest complete try of its job on `fold`."""
    out = {}
    for t in sorted(side.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if (job := job_of(t)) is not None and job[1] == fold:
            out.setdefault(job[0], t.user_attrs[T.RUN_ID_ATTR])
    return out


def record_folds(tracker: Tracker, parent_id: str, pipe: Pipeline, folds: list[Fold]) -> None:
    """`confirm/folds.json` on the parent: each fold's seed and validation files."""
    entries = pipe.splits.train + pipe.splits.valid
    tracker.log_json(parent_id, {
        "pool": "every readable train and valid image; test images are never in it",
        "folds": [{"fold": f.number, "seed": f.seed, "train_images": len(f.train),
                   "valid": [entries[r][0] for r in f.valid]} for f in folds]}, "confirm/folds.json")


def close_orphan_jobs(tracker: Tracker, parent_id: str, side: optuna.Study) -> None:
    """Confirmation runs still RUNNING whose try is over (a kill between Optuna's record and the
    run's closing) are closed as Optuna recorded the try: COMPLETE with its value, else KILLED."""
    over = {t.number: t for t in side.get_trials(deepcopy=False) if t.state.is_finished()}
    for run in tracker.children(parent_id):
        tags = run.data.tags
        tried = over.get(int(tags.get("confirm.job", -1)))
        if tags.get(TR_ROLE) not in ROLES or run.info.status != "RUNNING" or tried is None:
            continue
        if tried.state == TrialState.COMPLETE:
            tracker.log_metrics(run.info.run_id, {"confirm/valid_acc": tried.value, "phase2/best_valid_acc": tried.value})
            tracker.end_run(run.info.run_id, "COMPLETE")
        else:
            tracker.end_run(run.info.run_id, "FAIL", "its worker stopped before closing it", status="KILLED")


def rank_agreement(tracker: Tracker, parent_id: str, plan: list[FrozenTrial], results: dict) -> dict:
    """Spearman's rho of the configurations' search-size and full-size valid accuracies (those
    whose full-size run completed): the parent's metric `confirm/rank_agreement` (NaN when
    undefined) and its tags."""
    rho = spearman([t.value for t in plan], [results[(t.number, FULL)] for t in plan])
    tracker.log_metrics(parent_id, {"confirm/rank_agreement": float("nan") if rho is None else rho})
    return {"confirm.rank_agreement": "undefined" if rho is None else f"{rho:.4f}",
            "confirm.rank_agreement_configs": len(plan),
            "confirm.rank_agreement_reliable": str(len(plan) >= RELIABLE_FROM).lower()}


def interrupted_try(tracker: Tracker, side: optuna.Study, trial, run_id: str) -> None:
    """A try that died (Ctrl-C, SIGTERM): closed, and its job is queued again next time."""
    with writing():
        trial.set_user_attr(T.FAIL_KIND_ATTR, T.INTERRUPTED)
        side.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        tracker.end_run(run_id, "INTERRUPTED", "interrupted (Ctrl-C or SIGTERM); queued again")


def job_tags(fold: int, epochs: int, head_size: int) -> dict:
    """A job's run tags: `train.threads` (a --workers child: its share), and a FULL job's
    `full.start`: how its model was made (`--full-epochs`; retrained: its phase 1 on the search
    size's cached features, `head_size` px)."""
    made = f"fine-tuned {epochs} epoch{'s' * (epochs != 1)}" if epochs else f"trained again, phase 1 at {head_size} px"
    return {"train.threads": torch.get_num_threads(), **({"full.start": made} if fold == FULL else {})}


def ask_job(side: optuna.Study) -> optuna.Trial:
    """A job of the side study taken atomically (a WAITING one, or a new one if none waits), marked
    as this worker's."""
    with warnings.catch_warnings():  # Optuna's heartbeat runs here by hand (`T.heartbeat`), not via optimize
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = side.ask()
    trial.set_user_attr(T.WORKER_ATTR, worker_id())
    return trial


def fine_tuned(pipe: Pipeline, cfg: TrialConfig, tracker: Tracker, trial_run_id: str, epochs: int, on_epoch, amp,
               on_phase_end) -> float:
    """Progressive resizing (`--full-epochs`): a search-size trial's best model fine-tuned at the
    pipeline's (full) size for `epochs` phase-2 epochs, at the trial's own phase-2 learning rates,
    weight decay, schedule, smoothing and unfrozen stages, without early stopping; the best of
    those epochs is kept (`on_phase_end`) and its validation accuracy returned; the model as it
    came from the search size is not a candidate. Its epochs take phase 2's steps (from
    `max_epochs_phase1 + 1`), as a retraining's would; it has no phase 1 (no phase-1 checkpoint,
    confusion matrix or metrics)."""
    with tempfile.TemporaryDirectory() as tmp:
        _, state = load(tracker, trial_run_id, Path(tmp))
    model = pipe.model(cfg.seed)
    model.load_state_dict(state)
    result = fine_tune(model, *pipe.image_loaders(cfg), cfg, epochs, pipe.device, on_epoch=on_epoch, amp=amp,
                       keep_mistakes=MISTAKES_SHOWN)
    on_phase_end(result, model)
    return result.best_valid_acc


def fine_tune(model: torch.nn.Module, train, valid, cfg: TrialConfig, epochs: int, device, *, on_epoch=None,
              amp=None, keep_mistakes: int = 0) -> PhaseResult:
    """`model`'s phase 2 continued for `epochs` epochs on these loaders, at `cfg`'s phase-2
    learning rates, weight decay, schedule, smoothing and unfrozen stages, without early stopping
    (the recipe of `fine_tuned`, and of `benchmarks/bench_fidelity.py --warm-epochs`)."""
    model.to(device, memory_format=torch.channels_last)
    M.unfreeze(model, cfg.unfreeze)
    optimizer = make_optimizer(M.param_groups(model, cfg.head_lr * cfg.phase2_head_lr_factor,
                                              cfg.head_lr * cfg.backbone_lr_ratio, weight_decay=cfg.weight_decay))
    return fit_phase(model, train, valid, optimizer, max_epochs=epochs, patience=epochs, device=device, phase=2,
                     first_step=cfg.max_epochs_phase1 + 1, on_epoch=on_epoch, amp=amp, keep_mistakes=keep_mistakes,
                     label_smoothing=cfg.label_smoothing, lr_schedule=cfg.lr_schedule)


def widen_when_alone(side: optuna.Study, tracker: Tracker, run_id: str, step: int, device: torch.device) -> None:
    """A `--workers` child on the CPU whose job is the only one left (none waits, no other runs)
    takes back the cores the launcher split from here on: the other workers are done, so their
    share would idle (the last of 3 jobs on 2 workers ran on one of 2 cores). Not where the user
    set the share (OMP_NUM_THREADS). Tag `train.threads_alone`: the threads it then ran on
    (`train.threads` stays its share at the start)."""
    split = split_cores()
    if device.type != "cpu" or split is None or torch.get_num_threads() >= split:
        return
    if len(side.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))) == 1:
        torch.set_num_threads(split)
        tracker.set_tags(run_id, {"train.threads_alone": split, "train.threads_alone_from_step": step})
        log.info("confirmation: the last job runs alone from step %d: on all %d cores", step, split)
