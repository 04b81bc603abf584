"""`--confirm-top K --confirm-folds F`: the K best configurations re-trained on F re-drawn
train/valid splits; the best mean wins (README: Sweep files, Confirmation).

Why: the best of many trials on one validation split is partly the luckiest (the top trials are
often within noise of each other, src/stats.py). Each re-training has another validation set (of
which about valid / (train + valid) are original validation images) and another seed.
Once per study, by whoever sums the sweep up (a lone sweep, or the --workers launcher, which runs
the jobs alone; a sweep that ends while others still run trials leaves it to the last; never after
a --timeout or a stop):
1. Plan: the K best complete trials; fold f re-draws the pool of every readable train and valid
   image (never a test image), per class as many validation images as the original valid split
   has, seed `derive_seed(study seed, FOLD_SEED + f)`. Recorded: the parent's `confirm/folds.json`.
2. Jobs: each (trial, fold) is a WAITING trial of the study `<study>:confirm` in the same storage
   (system attribute `tlsweep.job`), taken atomically with Optuna's heartbeat; each sweep waits
   until every job of its plan is over, so sweeps ending together share them. Only a job's
   earliest try that is not failed runs (two sweeps may queue it at once); a job whose tries all
   died (a kill: seen at once on this machine, elsewhere after the grace period; a Ctrl-C; a
   storage error) is queued again, so the same command resumes it. A job trains the trial's
   configuration (a seed of its own per fold) on its fold's decoded images and cached features
   (`pipeline.refold`), unpruned, as the run `confirm-<trial>-fold<f>` under the parent (role
   `confirm`; tags `confirm.trial`, `confirm.fold`, `confirm.job`; the trial's params; per-epoch
   metrics; `confirm/valid_acc`), without a checkpoint: those models trained on original
   validation images and are never used. Jobs do not count toward --trials nor feed the sampler.
3. Decide: a configuration scores the mean of its folds' best phase-2 validation accuracy (a fold
   whose training failed as a trial fails scores 0: the recipe is not robust there); the best mean
   wins (ties: the better original trial), and its ORIGINAL trial's model represents it (trained on
   the original split: nothing trained on the original validation images is judged on them).
   Parent tags: `confirm.trials`, `confirm.folds`, `confirm.mean.<trial>`, `confirm.winner_trial`,
   `confirm.winner_run_id`, `confirm.winner_mean_valid_acc`, then `confirm.best_trial` (the best
   trial it was made for: a later best makes it stale). The soup starts from the winner (judged
   on the original validation split, like every candidate); `final_test` scores the one chosen.
"""
from __future__ import annotations

import gc
import logging
import random
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import search_space
from . import trials as T
from .config import TrialConfig
from .pipeline import Pipeline, pool, refold
from .recovery import recover_lost, worker_id
from .stopping import STOP, computing, raise_if_stopped, writing
from .study import derive_seed
from .tracking import ROLE as TR_ROLE, Tracker
from .train import fit_two_phase, recipe
from .trial import as_fault

log = logging.getLogger("tlsweep")
ROLE = "confirm"
FAULT_ATTR = "tlsweep.job_fault"  # on a job's try whose training failed as a trial fails: it scores 0
MAX_DEAD_TRIES = 5                # a job whose tries keep dying scores 0 after this many
POLL_S = 5.0                      # while other workers' jobs run: how often to look again
FOLD_SEED = 7_000_000  # fold f's seed: derive_seed(study seed, FOLD_SEED + f), apart from trial numbers
DEFAULT_FOLDS = 3
MAX_TOP = 50  # --confirm-top's ceiling (the parent's tags of one decision go in one MLflow batch)


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


def ranked(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The `top` best complete trials, best first (ties: the earlier trial)."""
    return sorted(T.completed(study), key=lambda t: (-t.value, t.number))[:top]


def _job(trial: FrozenTrial) -> tuple[int, int] | None:
    job = trial.system_attrs.get(T.JOB_ATTR)
    return (int(job["trial"]), int(job["fold"])) if job else None


def outcomes(side: optuna.Study) -> dict[tuple[int, int], float | None]:
    """(trial, fold) -> its best valid accuracy; 0.0 for a job whose training failed as a trial
    fails (diverged, out of memory, ...: the recipe is not robust there) or that died
    MAX_DEAD_TRIES times; None while a try of it waits or runs. A job whose tries all died
    (interrupted, its worker lost, a storage error, a duplicate) is left out: it is queued again."""
    by_job = defaultdict(list)
    for t in side.get_trials(deepcopy=False):
        if (key := _job(t)) is not None:
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


def record_folds(tracker: Tracker, parent_id: str, pipe: Pipeline, folds: list[Fold]) -> None:
    """`confirm/folds.json` on the parent: each fold's seed and validation files."""
    entries = pipe.splits.train + pipe.splits.valid
    tracker.log_json(parent_id, {
        "pool": "every readable train and valid image; test images are never in it",
        "folds": [{"fold": f.number, "seed": f.seed, "train_images": len(f.train),
                   "valid": [entries[r][0] for r in f.valid]} for f in folds]}, "confirm/folds.json")


def decide(tracker: Tracker, parent_id: str, plan: list[FrozenTrial], folds: int, results: dict) -> FrozenTrial:
    """The best mean over the folds wins (ties: the better original trial); recorded on the parent,
    `confirm.best_trial` last (what `trials.confirmed_winner` checks: a cut before it leaves the
    earlier decision unused, never half of one)."""
    means = {t.number: float(np.mean([results[(t.number, f)] for f in range(folds)])) for t in plan}
    winner = max(plan, key=lambda t: (means[t.number], t.value, -t.number))
    tracker.set_tags(parent_id, {
        "confirm.trials": ",".join(str(t.number) for t in plan), "confirm.folds": folds,
        "confirm.winner_trial": winner.number, "confirm.winner_run_id": T.run_id(winner),
        "confirm.winner_mean_valid_acc": f"{means[winner.number]:.6f}",
        **{f"confirm.mean.{t.number}": f"{means[t.number]:.6f}" for t in plan}})
    tracker.set_tags(parent_id, {"confirm.best_trial": plan[0].number})
    log.info("confirmation: %s; the winner is trial %d", ", ".join(
        f"trial {t.number} {means[t.number]:.4f} (original {t.value:.4f})" for t in plan), winner.number)
    return winner


class Confirmation:
    """One worker's part in the study's confirmation (see the module docstring)."""

    def __init__(self, tracker: Tracker, parent_id: str, study: optuna.Study, pipeline: Pipeline, search: dict,
                 top: int, folds: int, amp: torch.dtype | None = None):
        self.tracker, self.parent_id, self.study, self.pipe = tracker, parent_id, study, pipeline
        self.search, self.folds, self.amp = search, folds, amp
        self.plan = ranked(study, top)
        self.complete = {t.number: t for t in T.completed(study)}  # a job of another plan may name any
        self.fold_list = draw_folds(pool(pipeline), pipeline.labels("valid"), folds, pipeline.fixed.seed)
        self._fold_pipes: dict[int, Pipeline] = {}

    def run(self) -> None:
        """Queue the plan's missing jobs and run jobs until every one of them is over (waiting for
        other workers', and taking up any whose worker dies), then decide."""
        if len(self.plan) < 2:
            log.info("confirmation: fewer than 2 complete trials, nothing to compare")
            return
        side = T.side_study(self.study, T.CONFIRM_SUFFIX)
        plan = [(t.number, f) for t in self.plan for f in range(self.folds)]
        with writing():
            record_folds(self.tracker, self.parent_id, self.pipe, self.fold_list)
        said = False
        while True:
            with writing():
                recover_lost(side, self.tracker)  # jobs whose worker died: failed, their runs closed
                results = outcomes(side)
                for number, fold in (k for k in plan if k not in results):  # never queued, or all tries died
                    side.add_trial(optuna.trial.create_trial(
                        state=TrialState.WAITING, system_attrs={T.JOB_ATTR: {"trial": number, "fold": fold}}))
            raise_if_stopped()
            if not said:
                log.info("confirmation: %d configurations x %d re-drawn splits, %d job(s) to run",
                         len(self.plan), self.folds, sum(results.get(k) is None for k in plan))
                said = True
            if side.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                self._take_one(side)
            elif all(outcomes(side).get(k) is not None for k in plan):
                break
            elif STOP.wait(POLL_S):  # other workers' jobs still run
                raise_if_stopped()
        with writing():
            close_orphan_jobs(self.tracker, self.parent_id, side)
            decide(self.tracker, self.parent_id, self.plan, self.folds, outcomes(side))
        raise_if_stopped()

    def _claim(self, side: optuna.Study):
        """Take a WAITING job (atomically) and open its run: (trial, original trial, fold, run id),
        or None when it is not one to run (closed here)."""
        with warnings.catch_warnings():  # Optuna's heartbeat runs here by hand (`T.heartbeat`), not via optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = side.ask()
        trial.set_user_attr(T.WORKER_ATTR, worker_id())
        job = _job(T.frozen(trial))
        original = self.complete.get(job[0]) if job else None
        if original is None or any(_job(t) == job and t.number < trial.number and t.state != TrialState.FAIL
                                   for t in side.get_trials(deepcopy=False)):
            # Not a job (another worker took the last one between our look and our ask, and
            # Optuna made an empty trial), or a duplicate (workers that queue at once may queue a
            # job twice: only its earliest try that is not failed runs).
            side.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            return None
        number, fold = job
        run_id = self.tracker.start_child(
            self.parent_id, f"confirm-{number}-fold{fold}", ROLE,
            {"confirm.trial": number, "confirm.fold": fold, "confirm.job": trial.number, "optuna.state": "RUNNING"},
            params=original.params)
        trial.set_user_attr(T.RUN_ID_ATTR, run_id)
        return trial, original, fold, run_id

    def _take_one(self, side: optuna.Study) -> None:
        with writing():
            claimed = self._claim(side)
        if claimed is None:
            return
        trial, original, fold, run_id = claimed
        try:
            with T.heartbeat(trial), computing():
                raise_if_stopped()
                if fold not in self._fold_pipes:
                    self._fold_pipes[fold] = refold(self.pipe, self.fold_list[fold].train, self.fold_list[fold].valid)

                def on_epoch(rec):
                    with writing():
                        self.tracker.log_epoch(run_id, rec)
                    raise_if_stopped()

                acc = train_on_fold(self._fold_pipes[fold], self.search, original, fold, on_epoch, self.amp)
        except KeyboardInterrupt:
            with writing():  # a try that died: the job is queued again next time
                trial.set_user_attr(T.FAIL_KIND_ATTR, T.INTERRUPTED)
                side.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                self.tracker.end_run(run_id, "INTERRUPTED", "interrupted (Ctrl-C or SIGTERM); queued again")
            raise
        except Exception as exc:
            fault = as_fault(exc, self.pipe.device, self.pipe.fixed.batch_size)
            with writing():
                if fault is not None:  # the recipe failed on this split: it scores 0 there
                    trial.set_user_attr(FAULT_ATTR, True)
                    trial.set_user_attr(T.FAIL_KIND_ATTR, fault.kind)
                side.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                self.tracker.end_run(run_id, "FAIL", str(fault or f"{type(exc).__name__}: {exc}"),
                                     tags={T.FAIL_KIND_ATTR: fault.kind} if fault else None)
            if fault is None:  # not the recipe's: stop; the job is queued again next time
                raise
            log.warning("confirmation of trial %d on fold %d failed (%s); it scores 0 there",
                        original.number, fold, fault)
            return
        finally:
            gc.collect()
            if self.pipe.device.type == "cuda":
                torch.cuda.empty_cache()
        with writing():  # Optuna's record first: the run is closed after it (`close_orphan_jobs`)
            side.tell(trial, acc, skip_if_finished=True)  # taken over meanwhile: the retry's value counts
            self.tracker.log_metrics(run_id, {"confirm/valid_acc": acc, "phase2/best_valid_acc": acc})
            self.tracker.end_run(run_id, "COMPLETE")
        log.info("confirmation of trial %d (valid_acc %.4f on the original split) on fold %d: %.4f",
                 original.number, original.value, fold, acc)
        raise_if_stopped()


def train_on_fold(pipe: Pipeline, search: dict, original: FrozenTrial, fold: int, on_epoch, amp) -> float:
    """A trial's configuration exactly as it was sampled (its params through the same
    conversions), trained on a fold's pipeline with a seed of its own (a fold's score is the
    recipe's, not one lucky init's): its best phase-2 validation accuracy."""
    sampled = search_space.sample(optuna.trial.FixedTrial(original.params), search)
    cfg = TrialConfig.build(pipe.fixed, sampled, weights=pipe.weights, classes=pipe.splits.classes,
                            seed=derive_seed(derive_seed(pipe.fixed.seed, original.number), 1 + fold))
    model = pipe.model(cfg.seed)
    data = pipe.loaders(cfg, model)
    _, phase2 = fit_two_phase(model, data.train, data.valid, **recipe(cfg), device=pipe.device,
                              phase1=data.phase1, on_epoch=on_epoch, amp=amp)
    return phase2.best_valid_acc


def close_orphan_jobs(tracker: Tracker, parent_id: str, side: optuna.Study) -> None:
    """Confirmation runs still RUNNING whose try is over (a kill between Optuna's record and the
    run's closing) are closed as Optuna recorded the try: COMPLETE with its value, else KILLED."""
    over = {t.number: t for t in side.get_trials(deepcopy=False) if t.state.is_finished()}
    for run in tracker.children(parent_id):
        tags = run.data.tags
        tried = over.get(int(tags.get("confirm.job", -1)))
        if tags.get(TR_ROLE) != ROLE or run.info.status != "RUNNING" or tried is None:
            continue
        if tried.state == TrialState.COMPLETE:
            tracker.log_metrics(run.info.run_id, {"confirm/valid_acc": tried.value, "phase2/best_valid_acc": tried.value})
            tracker.end_run(run.info.run_id, "COMPLETE")
        else:
            tracker.end_run(run.info.run_id, "FAIL", "its worker stopped before closing it", status="KILLED")
