"""`--confirm-top K --confirm-folds F`: the K best configurations re-trained on F re-drawn
train/valid splits; the best mean wins.

Why: the best of many trials on one validation split is partly the luckiest (a few hundred
images: one image is a fraction of a point, and the top trials are often within noise of each
other, see src/stats.py). Re-training the top configurations on other splits of the same images
measures each one again on images it did not select on.

How, once per study (whoever sums the sweep up: a lone sweep, or the launcher of --workers; a
worker that ends while others still run trials leaves it to the last):
1. Plan. The K best complete trials (by validation accuracy). Fold f = 0..F-1 re-draws the pool
   of every readable train and valid image (test images are never part of it): per class, as
   many validation images as the original valid split has of that class, drawn with seed
   `derive_seed(study seed, FOLD_SEED + f)`; the rest train. The folds are recorded on the
   parent, `confirm/folds.json` (each fold's seed and validation files).
2. Jobs. Each (trial, fold) is a job: a WAITING trial of the study `<study>:confirm` in the same
   storage (its system attribute `tlsweep.job`). Workers take jobs atomically, with Optuna's
   heartbeat: workers ending together share them, none runs a job twice (two that plan at once
   may queue a job twice: only its earliest trial not failed runs), and a job whose worker
   died is taken up again (at once on this machine, elsewhere after the grace period), so a
   killed sweep resumes its confirmation when the same command runs again. A job trains the
   trial's configuration (its seed re-drawn per fold) on the decoded images and cached features
   of its fold (`pipeline.refold`), unpruned, as an MLflow run under the parent: role `confirm`,
   run name `confirm-<trial>-fold<f>`, tags `confirm.trial` and `confirm.fold`, the trial's
   params, per-epoch metrics at the trials' steps, `confirm/valid_acc`. It keeps no checkpoint:
   those models trained on original validation images and are never used. Jobs are not trials of
   the study: they do not count toward --trials and do not feed the sampler.
3. Decide, when every job of the plan is over: a configuration scores the mean of its folds'
   best phase-2 validation accuracy (a failed fold scores 0: a recipe that diverges on some
   split is not robust); the best mean wins (ties: the better original trial). The model that
   represents it is its original trial's, trained on the original split: nothing that trained on
   the original validation images is ever judged on them. Parent tags: `confirm.trials` (the
   plan, best first), `confirm.folds`, `confirm.best_trial` (the study's best when it was made),
   `confirm.mean.<trial>`, `confirm.winner_trial`, `confirm.winner_run_id`,
   `confirm.winner_mean_valid_acc`. The soup (src/soup.py) starts from the winner, and
   `final_test` scores the winner (or the soup, when it beats it on validation).
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

from . import trials as T
from .config import TrialConfig
from .pipeline import Pipeline, pool, refold
from .recovery import queue_retry, recover_lost, worker_id
from .stats import wilson
from .stopping import computing, raise_if_stopped, writing
from .study import derive_seed
from .tracking import Tracker
from .train import fit_two_phase, recipe
from .trial import as_fault

log = logging.getLogger("tlsweep")
ROLE = "confirm"
FOLD_SEED = 7_000_000  # fold f's seed: derive_seed(study seed, FOLD_SEED + f), apart from trial numbers
DEFAULT_FOLDS = 3


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
    """(trial, fold) -> its best valid accuracy, 0.0 for a job that failed for good, None while
    it waits or runs (a lost job's retry is a later trial of the same job)."""
    by_job = defaultdict(list)
    for t in side.get_trials(deepcopy=False):
        if _job(t) is not None:
            by_job[_job(t)].append(t)
    out = {}
    for key, tries in by_job.items():
        done = [t.value for t in tries if t.state == TrialState.COMPLETE]
        pending = any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in tries)
        out[key] = done[0] if done else (None if pending else 0.0)
    return out


def record_folds(tracker: Tracker, parent_id: str, pipe: Pipeline, folds: list[Fold]) -> None:
    """`confirm/folds.json` on the parent: each fold's seed and validation files."""
    entries = pipe.splits.train + pipe.splits.valid
    tracker.log_json(parent_id, {
        "pool": "every readable train and valid image; test images are never in it",
        "folds": [{"fold": f.number, "seed": f.seed, "train_images": len(f.train),
                   "valid": [entries[r][0] for r in f.valid]} for f in folds]}, "confirm/folds.json")


def decide(tracker: Tracker, parent_id: str, plan: list[FrozenTrial], folds: int, n_valid: int,
           results: dict) -> FrozenTrial:
    """The best mean over the folds wins (ties: the better original trial); recorded on the parent."""
    means = {t.number: float(np.mean([results[(t.number, f)] for f in range(folds)])) for t in plan}
    winner = max(plan, key=lambda t: (means[t.number], t.value, -t.number))
    low, high = wilson(means[winner.number], n_valid * folds)
    tracker.set_tags(parent_id, {
        "confirm.trials": ",".join(str(t.number) for t in plan), "confirm.folds": folds,
        "confirm.best_trial": plan[0].number, "confirm.winner_trial": winner.number,
        "confirm.winner_run_id": T.run_id(winner), "confirm.winner_mean_valid_acc": f"{means[winner.number]:.6f}",
        "confirm.winner_mean_valid_acc_95": f"{low:.4f}-{high:.4f}",
        **{f"confirm.mean.{t.number}": f"{means[t.number]:.6f}" for t in plan}})
    log.info("confirmation: %s; the winner is trial %d", ", ".join(
        f"trial {t.number} {means[t.number]:.4f} (original {t.value:.4f})" for t in plan), winner.number)
    return winner


class Confirmation:
    """One worker's part in the study's confirmation (see the module docstring)."""

    def __init__(self, tracker: Tracker, parent_id: str, study: optuna.Study, pipeline: Pipeline,
                 top: int, folds: int, amp: torch.dtype | None = None):
        self.tracker, self.parent_id, self.study, self.pipe = tracker, parent_id, study, pipeline
        self.top, self.folds, self.amp = top, folds, amp
        self.plan = ranked(study, top)
        self.by_number = {t.number: t for t in self.plan}
        self.fold_list = draw_folds(pool(pipeline), pipeline.labels("valid"), folds, pipeline.fixed.seed)
        self._fold_pipes: dict[int, Pipeline] = {}

    def run(self) -> bool:
        """Queue the plan's missing jobs, run jobs while any wait, and decide when all are over;
        True when the confirmation is settled (decided, or nothing to confirm)."""
        if len(self.plan) < 2:
            log.info("confirmation: fewer than 2 complete trials, nothing to compare")
            return True
        side = T.side_study(self.study, T.CONFIRM_SUFFIX)
        recover_lost(side, self.tracker)  # jobs whose worker died: queued again
        record_folds(self.tracker, self.parent_id, self.pipe, self.fold_list)
        have = {_job(t) for t in side.get_trials(deepcopy=False)}
        for t in self.plan:
            for f in range(self.folds):
                if (t.number, f) not in have:
                    side.add_trial(optuna.trial.create_trial(
                        state=TrialState.WAITING, system_attrs={T.JOB_ATTR: {"trial": t.number, "fold": f}}))
        todo = [k for k, v in outcomes(side).items() if v is None and k[0] in self.by_number]
        log.info("confirmation: %d configurations x %d re-drawn splits, %d job(s) to run",
                 len(self.plan), self.folds, len(todo))
        while side.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self._take_one(side)
        results = outcomes(side)
        if any(results.get((t.number, f)) is None for t in self.plan for f in range(self.folds)):
            log.info("confirmation: other workers still run jobs; the last one to end decides")
            return False
        decide(self.tracker, self.parent_id, self.plan, self.folds, len(self.fold_list[0].valid), results)
        return True

    def _take_one(self, side: optuna.Study) -> None:
        with warnings.catch_warnings():  # Optuna's heartbeat runs here by hand (`T.heartbeat`), not via optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = side.ask()  # a WAITING job, taken atomically
        job = _job(T.frozen(trial))
        if job is None or job[0] not in self.by_number:
            # Another worker took the last job between our look and our ask (Optuna then made a
            # new, empty trial), or a job of an older plan: closed, never run.
            side.tell(trial, state=TrialState.FAIL)
            return
        if any(_job(t) == job and t.number < trial.number and t.state != TrialState.FAIL
               for t in side.get_trials(deepcopy=False)):
            # Workers planning at once may queue a job twice: only its earliest live trial runs.
            trial.set_user_attr(T.FAIL_KIND_ATTR, "duplicate")
            side.tell(trial, state=TrialState.FAIL)
            return
        number, fold = job
        original = self.by_number[number]
        run_id = self.tracker.start_child(
            self.parent_id, f"confirm-{number}-fold{fold}", ROLE,
            {"confirm.trial": number, "confirm.fold": fold, "confirm.job": trial.number,
             "optuna.state": "RUNNING"}, params=original.params)
        trial.set_user_attr(T.RUN_ID_ATTR, run_id)
        trial.set_user_attr(T.WORKER_ATTR, worker_id())
        try:
            with T.heartbeat(trial), computing():
                acc = self._train(original, fold, run_id)
        except KeyboardInterrupt:
            with writing():
                trial.set_user_attr(T.FAIL_KIND_ATTR, T.INTERRUPTED)
                side.tell(trial, state=TrialState.FAIL)
                queue_retry(side, T.frozen(trial), count=False)
                self.tracker.end_run(run_id, "INTERRUPTED", "interrupted (Ctrl-C or SIGTERM); queued again")
            raise
        except Exception as exc:
            fault = as_fault(exc, self.pipe.device, self.pipe.fixed.batch_size)
            if fault is None:
                with writing():
                    side.tell(trial, state=TrialState.FAIL)
                    self.tracker.end_run(run_id, "FAIL", f"{type(exc).__name__}: {exc}")
                raise
            with writing():
                trial.set_user_attr(T.FAIL_KIND_ATTR, fault.kind)
                side.tell(trial, state=TrialState.FAIL)
                self.tracker.end_run(run_id, "FAIL", str(fault), tags={T.FAIL_KIND_ATTR: fault.kind})
            log.warning("confirmation of trial %d on fold %d failed (%s); it scores 0 there", number, fold, fault)
            return
        finally:
            gc.collect()
            if self.pipe.device.type == "cuda":
                torch.cuda.empty_cache()
        with writing():
            self.tracker.log_metrics(run_id, {"confirm/valid_acc": acc, "phase2/best_valid_acc": acc})
            self.tracker.end_run(run_id, "COMPLETE")
            side.tell(trial, acc)
        log.info("confirmation of trial %d (valid_acc %.4f on the original split) on fold %d: %.4f",
                 number, original.value, fold, acc)
        raise_if_stopped()

    def _fold(self, f: int) -> Pipeline:
        if f not in self._fold_pipes:
            fold = self.fold_list[f]
            self._fold_pipes[f] = refold(self.pipe, fold.train, fold.valid)
        return self._fold_pipes[f]

    def _train(self, original: FrozenTrial, f: int, run_id: str) -> float:
        pipe = self._fold(f)
        seed = derive_seed(derive_seed(pipe.fixed.seed, original.number), 1 + f)
        cfg = TrialConfig.build(pipe.fixed, original.params, weights=pipe.weights, seed=seed,
                                classes=pipe.splits.classes)
        model = pipe.model(cfg.seed)
        data = pipe.loaders(cfg, model)

        def on_epoch(rec):
            with writing():
                self.tracker.log_epoch(run_id, rec)
            raise_if_stopped()

        _, phase2 = fit_two_phase(model, data.train, data.valid, **recipe(cfg), device=pipe.device,
                                  phase1=data.phase1, on_epoch=on_epoch, amp=self.amp)
        return phase2.best_valid_acc

def confirmed_winner(tags: dict) -> tuple[str, str] | None:
    """(trial number, run id) the confirmation chose, if it was made for the study's best trial as
    the parent's tags record it now (a later, better trial makes it stale)."""
    if tags.get("confirm.winner_run_id") and tags.get("confirm.best_trial") == tags.get("best.trial_number"):
        return tags["confirm.winner_trial"], tags["confirm.winner_run_id"]
    return None
