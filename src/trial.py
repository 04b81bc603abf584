"""One trial of the study: admit it, sample its config, train both phases, return its value or
raise its fault. Its MLflow run is src/record.py's; when a stop may raise, src/stopping.py's.

How a trial can end, and what is recorded (`optuna.state` on the run, `tlsweep.fail_kind` on
the Optuna trial; names in src/trials.py):
  COMPLETE      returns its best phase-2 validation accuracy;
  PRUNED        the pruner stopped it (`optuna.prune_reason`);
  FAIL          a fault of this trial (src/errors.py), the sweep goes on: `diverged` (NaN/inf
                loss), `out_of_memory` (memory is freed first), `bad_images` (more than
                --max-bad-fraction of a split unreadable), `error` (any other RuntimeError or
                ValueError), `surplus` (no room left: never started), with `optuna.fail_reason`;
  INTERRUPTED   Ctrl-C/SIGTERM: the run is closed as KILLED, the trial recorded as FAIL with kind
                `interrupted`, and its worker queues it again (`recovery.requeue_interrupted`);
A UserError inside a trial (something every trial would meet) stops the sweep.
"""
from __future__ import annotations

import gc
import logging
import traceback
from dataclasses import dataclass

import optuna
import torch
from tqdm import tqdm

from . import prefix as P
from . import search_space
from . import trials as T
from .config import TrialConfig
from .errors import OutOfMemory, Surplus, TrialFault, UserError
from .pipeline import Pipeline
from .record import BARS, MISTAKES_SHOWN, TrialRecord
from .recovery import queue_retry, worker_id
from .stopping import computing, raise_if_stopped, writing
from .study import derive_seed
from .train import fit_two_phase, recipe

log = logging.getLogger("tlsweep")


@dataclass
class Context:
    """What every trial shares: data, model and settings (the pipeline), search space, records."""
    pipeline: Pipeline
    search: dict
    record: TrialRecord
    amp: torch.dtype | None = None  # phase-2 autocast dtype (None: fp32)
    trials: int | None = None       # finished trials the study should have (--trials): the cap
    keep_checkpoints: int = 0       # --keep-checkpoints K: phase-2 models of the K best only (0: every model)


def as_fault(exc: Exception, device: torch.device, batch_size: int) -> TrialFault | None:
    """The trial-ending fault an exception stands for; None if it should stop the sweep."""
    if isinstance(exc, UserError):
        return None
    if isinstance(exc, TrialFault):
        return exc
    text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return OutOfMemory(f"out of memory on {device} at batch size {batch_size} ({text}); the trial's "
                           f"memory was freed. If every trial runs out, lower --batch-size or --image-size")
    if isinstance(exc, (RuntimeError, ValueError)):
        return TrialFault(f"{type(exc).__name__}: {text}")
    return None


def admit(trial: optuna.Trial, cap: int | None) -> None:
    """Workers that start at once may overshoot --trials: the trials finished, and those running
    with a smaller number, go first; a trial without room ends before it starts (FAIL, `surplus`,
    no run), and a retry it carried is queued again."""
    if cap is None:
        return
    ahead = len(T.finished(trial.study)) + sum(1 for t in T.running(trial.study) if t.number < trial.number)
    if ahead < cap:
        return
    mine = T.frozen(trial)
    if mine.system_attrs.get(T.FAILED_TRIAL_ATTR) is not None:
        queue_retry(trial.study, mine, count=False)
    trial.set_user_attr(T.FAIL_KIND_ATTR, Surplus.kind)
    trial.set_user_attr(T.FAIL_REASON_ATTR, "another worker took the last place")
    raise Surplus(f"the study has its {cap} trials without this one")


class Objective:
    """One trial: sample, train both phases, return valid acc (the run: `ctx.record`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def config(self, trial, origin: int) -> TrialConfig:
        """`origin`: the trial number this one stands for (its own, or the lost trial it retries)."""
        pipe = self.ctx.pipeline
        # A retry of a lost trial keeps the lost trial's seed: it trains what that trial would have.
        return TrialConfig.build(pipe.fixed, search_space.sample(trial, self.ctx.search), weights=pipe.weights,
                                 seed=derive_seed(pipe.fixed.seed, origin), classes=pipe.splits.classes)

    def __call__(self, trial: optuna.Trial) -> float:
        """Train; the run is closed by `TrialRecord.close_as_recorded` after Optuna records the
        outcome (or here, when the sweep stops: interrupted, or a user error)."""
        record = self.ctx.record
        trial.set_user_attr(T.WORKER_ATTR, worker_id())
        admit(trial, self.ctx.trials)
        retry_of = T.original_number(trial)
        cfg = self.config(trial, retry_of)
        run_id = record.open(trial, cfg, retry_of)
        fault = None
        try:
            with computing():
                return self.train(trial, cfg, run_id)
        except optuna.TrialPruned as exc:
            trial.set_user_attr(T.PRUNE_REASON_ATTR, str(exc))
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker found this trial's heartbeat stale and queued it again: step aside.
            log.warning("trial %d was taken over by another worker (this one's heartbeat was late)", trial.number)
            record.close(run_id, "FAIL", "taken over by another worker (this one's heartbeat was late)", status="KILLED")
            raise
        except KeyboardInterrupt:
            # Optuna records it as FAIL; this worker queues it again (`run_sweep`), no other does.
            with writing():
                trial.set_user_attr(T.FAIL_KIND_ATTR, T.INTERRUPTED)
                record.close(run_id, "INTERRUPTED", "interrupted (Ctrl-C or SIGTERM); queued again")
            raise
        except Exception as exc:
            fault = as_fault(exc, self.ctx.pipeline.device, cfg.batch_size)
            kind, reason = (fault.kind if fault else "error"), str(fault or f"{type(exc).__name__}: {exc}")
            trial.set_user_attr(T.FAIL_KIND_ATTR, kind)
            trial.set_user_attr(T.FAIL_REASON_ATTR, reason[:5000])
            if fault is None:  # the sweep stops: no callback will close the run
                record.close(run_id, "FAIL", reason, {T.FAIL_KIND_ATTR: kind})
                raise
        # Raised here, not inside `except`: the fault must not chain the original exception, whose
        # traceback reaches the trial's model (memory that must be freed now). The sweep catches
        # faults: this trial ends, the sweep goes on.
        fault.__traceback__, fault.__context__, fault.__cause__ = None, None, None
        raise fault

    def train(self, trial, cfg: TrialConfig, run_id: str) -> float:
        pipe, model, data = self.ctx.pipeline, None, None
        try:
            raise_if_stopped()  # a stop that came while Optuna was starting this trial
            model = pipe.model(cfg.seed)
            data = pipe.loaders(cfg, model, amp=self.ctx.amp)
            if data.phase2 is not None:  # phase 2 trains the model after this block, on its cached output
                with writing():
                    self.ctx.record.tracker.set_tags(run_id, {"phase2.cut": P.cut_for(model, cfg.unfreeze)})
            return self.fit(trial, cfg, run_id, model, data)
        except BaseException as exc:
            # The traceback's frames hold the model, optimizer, batches and best state; Optuna keeps
            # the exception, so clear them, or a failed (e.g. out-of-memory) or pruned trial's
            # memory lives on into the next trial.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            with writing():
                self.ctx.record.skipped(run_id, data.skipped() if data is not None else pipe.bad_images())
            del model, data
            gc.collect()
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()

    def fit(self, trial, cfg: TrialConfig, run_id: str, model, data) -> float:
        """Both phases, each epoch logged and reported to the pruner, each phase's end recorded."""
        record, history = self.ctx.record, []  # both phases' epochs, for the training curves
        total = cfg.max_epochs_phase1 + cfg.max_epochs_phase2
        with tqdm(total=total, desc=f"trial {trial.number}", leave=False, unit="ep", disable=BARS) as bar:
            def on_epoch(rec):
                with writing():
                    record.epoch(run_id, rec)
                    bar.update(1)
                    bar.set_postfix(phase=rec.phase, valid_acc=f"{rec.valid_acc:.3f}")
                    trial.report(rec.valid_acc, rec.step)
                    prune = trial.should_prune()
                raise_if_stopped()
                if prune:
                    raise optuna.TrialPruned(f"pruned at phase {rec.phase}, epoch {rec.epoch} (step {rec.step}, "
                                             f"valid/acc {rec.valid_acc:.4f})")

            def on_phase_end(result, trained_model):
                history.extend(result.history)
                k = self.ctx.keep_checkpoints  # with K: no phase-1 model; phase 2's while among the K best
                keep = not k or (result.phase == 2 and T.among_best(trial.study, result.best_valid_acc, k))
                with writing():
                    record.phase_end(run_id, cfg, result, trained_model, history, trial.number, keep)
                raise_if_stopped()

            _, phase2 = fit_two_phase(
                model, data.train, data.valid, **recipe(cfg), device=self.ctx.pipeline.device, phase1=data.phase1, phase2=data.phase2,
                on_epoch=on_epoch, on_phase_end=on_phase_end, amp=self.ctx.amp, keep_mistakes=MISTAKES_SHOWN)
        return phase2.best_valid_acc
