"""`--confirm-top K --confirm-folds F`: the K best configurations re-trained on F re-drawn
train/valid splits; the best mean wins (docs/sweep-files.md, Confirmation).

Why: the best of many trials on one validation split is partly the luckiest (the top trials are
often within noise of each other, src/stats.py). Each re-training has another validation set (of
which about valid / (train + valid) are original validation images) and another seed.
Once per study, by whoever sums the sweep up (a lone sweep, or the --workers launcher, its workers
having taken jobs while any waited; a sweep that ends while others still run trials leaves it to
the last; never after a --timeout or a stop):
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

With a search size (`--search-size S`, `Fixed.search_size`) the trials train at S px and their
models cannot win; the confirmation is then how the full size is reached (K defaults to FULL_TOP,
F to 0). Every job trains at the full `image_size` (`full`: the pipeline at full size, its own
decoded store and features), and each configuration gets one more job, fold FULL (-1) on the
ORIGINAL split, the run `full-<trial>` (role `full`, checkpoints and figures like a trial's): the
configuration trained again from scratch (phase 1 on the search size's cached features, the
views its trials made: `Pipeline.loaders(head_at=)`; phase 2 at full size), or with `--full-epochs E`
> 0 its trial's best model fine-tuned there for E phase-2 epochs (`confirm_jobs.fine_tuned`).
That run represents the configuration: the best mean over the F folds wins (F = 0: the best
full-size valid accuracy on the original split), among those whose full-size run completed. On
the parent also `confirm.full.<trial>` (its full-size valid accuracy), `confirm.full_epochs`,
and the rank agreement (Spearman) of the search-size and full-size valid accuracies,
`confirm.rank_agreement` / `confirm/rank_agreement` (with `confirm.rank_agreement_configs`;
below RELIABLE_FROM configurations flagged unreliable).
"""
from __future__ import annotations

import gc
import logging

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import search_space
from . import trials as T
from .config import TrialConfig
from .confirm_jobs import (FAULT_ATTR, FULL, ROLES, ask_job, close_orphan_jobs, completed_runs, draw_folds, fine_tuned,
                           interrupted_try, job_of, job_tags, outcomes, rank_agreement, record_folds, widen_when_alone)
from .pipeline import Pipeline, pool, refold
from .record import MISTAKES_SHOWN, TrialRecord
from .recovery import recover_lost
from .stopping import STOP, computing, raise_if_stopped, writing
from .study import derive_seed
from .tracking import Tracker
from .train import fit_two_phase, recipe
from .trial import as_fault

log = logging.getLogger("tlsweep")
ROLE, FULL_ROLE = ROLES
POLL_S = 5.0         # while other workers' jobs run: how often to look again
DEFAULT_FOLDS = 3
FULL_TOP = 3         # --confirm-top when a search size is set and it is not given
FULL_EPOCHS = 0      # --full-epochs: 0 trains a full-size model from scratch (fine-tuning 3: -3.4 points, docs/quality-and-cost.md)
FULL_SEED = 999_999  # a full-size job's seed offset (fold f: 1 + f), apart from the trial's own
MAX_TOP = 50  # --confirm-top's ceiling (the parent's tags of one decision go in one MLflow batch)


def ranked(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The `top` best complete trials, best first (ties: the earlier trial)."""
    return sorted(T.completed(study), key=lambda t: (-t.value, t.number))[:top]


def decide(tracker: Tracker, parent_id: str, plan: list[FrozenTrial], folds: list[int], results: dict,
           full_runs: dict[int, str] | None = None) -> FrozenTrial | None:
    """The best mean over the folds wins (ties: the better original trial); with a search size
    (`full_runs`: trial -> its full-size run), only a configuration with a full-size model, and
    F = 0 means the full-size valid accuracy. Recorded on the parent, `confirm.best_trial` last
    (what `trials.confirmed_winner` checks: a cut before it leaves the earlier decision unused,
    never half of one). None when no configuration has a full-size model."""
    judged = [f for f in folds if f != FULL] or [FULL]
    means = {t.number: float(np.mean([results[(t.number, f)] for f in judged])) for t in plan}
    eligible = [t for t in plan if full_runs is None or t.number in full_runs]
    if not eligible:
        log.warning("confirmation: no configuration's full-size training completed; nothing can win")
        return None
    winner = max(eligible, key=lambda t: (means[t.number], t.value, -t.number))
    tags = {f"confirm.mean.{t.number}": f"{means[t.number]:.6f}" for t in plan}
    if full_runs is not None:
        tags |= {f"confirm.full.{t.number}": f"{results[(t.number, FULL)]:.6f}" for t in plan}
        tags |= rank_agreement(tracker, parent_id, eligible, results)
    tracker.set_tags(parent_id, tags)
    tracker.set_tags(parent_id, {
        "confirm.trials": ",".join(str(t.number) for t in plan), "confirm.folds": len(folds) - (full_runs is not None),
        "confirm.winner_trial": winner.number,
        "confirm.winner_run_id": full_runs[winner.number] if full_runs is not None else T.run_id(winner),
        "confirm.winner_mean_valid_acc": f"{means[winner.number]:.6f}"})
    tracker.set_tags(parent_id, {"confirm.best_trial": plan[0].number})
    log.info("confirmation: %s; the winner is trial %d", ", ".join(
        f"trial {t.number} {means[t.number]:.4f} (original {t.value:.4f})" for t in plan), winner.number)
    return winner


class Confirmation:
    """One worker's part in the study's confirmation (see the module docstring). `full`: the
    pipeline at full size when the trials searched at a smaller one (`pipeline`: phase 1 fits there)."""

    def __init__(self, tracker: Tracker, parent_id: str, study: optuna.Study, pipeline: Pipeline, search: dict,
                 top: int, folds: int, amp: torch.dtype | None = None, full: Pipeline | None = None,
                 full_epochs: int = 0):
        self.tracker, self.parent_id, self.study = tracker, parent_id, study
        self.pipe, self.full, self.head_at = full or pipeline, full is not None, pipeline if full else None
        self.search, self.folds, self.amp, self.full_epochs = search, folds, amp, full_epochs
        self.plan = ranked(study, top)
        self.complete = {t.number: t for t in T.completed(study)}  # a job of another plan may name any
        self.fold_list = draw_folds(pool(self.pipe), self.pipe.labels("valid"), folds, self.pipe.fixed.seed)
        self.fold_numbers = ([FULL] if self.full else []) + list(range(folds))
        self._fold_pipes: dict[int, Pipeline] = {FULL: self.pipe}
        self.record = TrialRecord(tracker, parent_id, self.pipe.mean, self.pipe.std)

    def run(self, decide_after: bool = True) -> None:
        """Queue the plan's missing jobs and run jobs until every one is over (waiting for others', taking
        up any whose worker dies), then decide; `decide_after` False (a --workers child): only while any waits."""
        if len(self.plan) < (1 if self.full else 2):
            log.info("confirmation: %d complete trial(s), nothing to %s", len(self.plan),
                     "train at full size" if self.full else "compare")
            return
        side = T.side_study(self.study, T.CONFIRM_SUFFIX)
        plan = [(t.number, f) for t in self.plan for f in self.fold_numbers]
        with writing():
            if self.folds:
                record_folds(self.tracker, self.parent_id, self.pipe, self.fold_list)
            if self.full:
                self.tracker.set_tags(self.parent_id, {"confirm.full_epochs": self.full_epochs})
        results = queue_missing(side, self.tracker, plan)
        log.info("confirmation: %d configurations x %d job(s)%s, %d to run", len(self.plan),
                 len(self.fold_numbers), f" at {self.pipe.fixed.image_size} px" if self.full else "",
                 sum(results.get(k) is None for k in plan))
        while True:
            raise_if_stopped()
            if side.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                self._take_one(side)
            elif not decide_after or all(outcomes(side).get(k) is not None for k in plan):
                break
            elif STOP.wait(POLL_S):  # other workers' jobs still run
                raise_if_stopped()
            queue_missing(side, self.tracker, plan)
        if decide_after:
            with writing():
                close_orphan_jobs(self.tracker, self.parent_id, side)
                decide(self.tracker, self.parent_id, self.plan, self.fold_numbers, outcomes(side),
                       completed_runs(side, FULL) if self.full else None)
        raise_if_stopped()

    def _claim(self, side: optuna.Study):
        """Take a WAITING job (atomically) and open its run: (trial, original trial, fold, config,
        run id), or None when it is not one to run (closed here)."""
        trial = ask_job(side)
        job = job_of(T.frozen(trial))
        original = self.complete.get(job[0]) if job else None
        if not_to_run(side, trial, job, original, self.fold_numbers):
            side.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            return None
        number, fold = job
        cfg = job_config(self.pipe, self.search, original, fold)
        run_id = self.tracker.start_child(
            self.parent_id, f"full-{number}" if fold == FULL else f"confirm-{number}-fold{fold}",
            FULL_ROLE if fold == FULL else ROLE,
            {"confirm.trial": number, "confirm.fold": fold, "confirm.job": trial.number, "optuna.state": "RUNNING",
             **job_tags(fold, self.full_epochs, self.head_at.fixed.image_size if self.full else 0)},
            params={k: v for k, v in cfg.to_dict().items() if k != "classes"})
        trial.set_user_attr(T.RUN_ID_ATTR, run_id)
        return trial, original, fold, cfg, run_id

    def _fold_pipe(self, fold: int) -> Pipeline:
        if fold not in self._fold_pipes:
            self._fold_pipes[fold] = refold(self.pipe, self.fold_list[fold].train, self.fold_list[fold].valid)
        return self._fold_pipes[fold]

    def _take_one(self, side: optuna.Study) -> None:
        with writing():
            claimed = self._claim(side)
        if claimed is None:
            return
        (trial, original, fold, cfg, run_id), history = claimed, []
        try:
            with T.heartbeat(trial), computing():
                raise_if_stopped()

                def on_epoch(rec):
                    with writing():
                        self.tracker.log_epoch(run_id, rec)
                        widen_when_alone(side, self.tracker, run_id, rec.step, self.pipe.device)
                    raise_if_stopped()

                def on_phase_end(result, model):  # the full-size run: checkpoints and figures, as a trial's
                    history.extend(result.history)
                    with writing():
                        self.record.phase_end(run_id, cfg, result, model, history, original.number)
                    raise_if_stopped()

                acc = fine_tuned(self.pipe, cfg, self.tracker, T.run_id(original), self.full_epochs, on_epoch,
                                 self.amp, on_phase_end) if fold == FULL and self.full_epochs else \
                    train_on_fold(self._fold_pipe(fold), cfg, on_epoch, self.amp, on_phase_end if fold == FULL else None,
                                  self.head_at if fold == FULL else None)
        except KeyboardInterrupt:
            interrupted_try(self.tracker, side, trial, run_id)
            raise
        except Exception as exc:
            failed_try(self.tracker, side, trial, run_id, exc, self.pipe, original, fold)
            return
        finally:
            gc.collect()
            if self.pipe.device.type == "cuda":
                torch.cuda.empty_cache()
        with writing():  # Optuna's record first: the run is closed after it (`close_orphan_jobs`)
            side.tell(trial, acc, skip_if_finished=True)  # taken over meanwhile: the retry's value counts
            self.tracker.log_metrics(run_id, {"confirm/valid_acc": acc, "phase2/best_valid_acc": acc})
            self.tracker.end_run(run_id, "COMPLETE")
        log.info("confirmation of trial %d (valid_acc %.4f on the original split) on %s: %.4f", original.number,
                 original.value, "the original split at full size" if fold == FULL else f"fold {fold}", acc)
        raise_if_stopped()


def queue_missing(side: optuna.Study, tracker: Tracker, plan: list[tuple[int, int]]) -> dict:
    """Fail the jobs whose worker died (their runs closed), then queue every job of the plan never
    queued or whose tries all died; returns the outcomes seen before queueing."""
    with writing():
        recover_lost(side, tracker)
        results = outcomes(side)
        for number, fold in (k for k in plan if k not in results):
            side.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, system_attrs={T.JOB_ATTR: {"trial": number, "fold": fold}}))
    return results


def failed_try(tracker: Tracker, side: optuna.Study, trial, run_id: str, exc: Exception, pipe: Pipeline,
               original: FrozenTrial, fold: int) -> None:
    """A job's training raised: a fault of the recipe scores 0 there; anything else stops the
    confirmation (re-raised; the job is queued again next time)."""
    fault = as_fault(exc, pipe.device, pipe.fixed.batch_size)
    with writing():
        if fault is not None:  # the recipe failed on this split: it scores 0 there
            trial.set_user_attr(FAULT_ATTR, True)
            trial.set_user_attr(T.FAIL_KIND_ATTR, fault.kind)
        side.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        tracker.end_run(run_id, "FAIL", str(fault or f"{type(exc).__name__}: {exc}"),
                        tags={T.FAIL_KIND_ATTR: fault.kind} if fault else None)
    if fault is None:
        raise exc
    log.warning("confirmation of trial %d on fold %d failed (%s); it scores 0 there", original.number, fold, fault)


def not_to_run(side: optuna.Study, trial, job, original, folds: list[int]) -> bool:
    """Not a job (another worker took the last one between our look and our ask, and Optuna made
    an empty trial), a duplicate (workers that queue at once may queue a job twice: only its
    earliest try that is not failed runs), or another plan's fold."""
    return original is None or job[1] not in folds or any(
        job_of(t) == job and t.number < trial.number and t.state != TrialState.FAIL
        for t in side.get_trials(deepcopy=False))


def job_config(pipe: Pipeline, search: dict, original: FrozenTrial, fold: int) -> TrialConfig:
    """A trial's configuration exactly as it was sampled (its params through the same
    conversions), at the pipeline's size, with a seed of its own per fold (a fold's score is the
    recipe's, not one lucky init's)."""
    sampled = search_space.sample(optuna.trial.FixedTrial(original.params), search)
    return TrialConfig.build(pipe.fixed, sampled, weights=pipe.weights, classes=pipe.splits.classes,
                             seed=derive_seed(derive_seed(pipe.fixed.seed, original.number),
                                              FULL_SEED if fold == FULL else 1 + fold))


def train_on_fold(pipe: Pipeline, cfg: TrialConfig, on_epoch, amp, on_phase_end=None,
                  head_at: Pipeline | None = None) -> float:
    """A configuration trained on a fold's pipeline, unpruned: its best phase-2 validation
    accuracy. `head_at`: phase 1 on that pipeline's inputs (the search size's cached features)."""
    model = pipe.model(cfg.seed)
    data = pipe.loaders(cfg, model, head_at, amp)
    _, phase2 = fit_two_phase(model, data.train, data.valid, **recipe(cfg), device=pipe.device,
                              phase1=data.phase1, phase2=data.phase2, on_epoch=on_epoch, on_phase_end=on_phase_end, amp=amp,
                              keep_mistakes=MISTAKES_SHOWN if on_phase_end else 0)
    return phase2.best_valid_acc
