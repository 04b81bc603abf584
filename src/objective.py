"""One trial of the study: sample, train both phases, log to the trial's MLflow run.

How a trial can end, and what is recorded (`optuna.state` on the run, `tlsweep.fail_kind` on
the Optuna trial):
  COMPLETE      returns its best phase-2 validation accuracy;
  PRUNED        the median pruner stopped it (`optuna.prune_reason`);
  FAIL          a fault of this trial, the sweep goes on: `diverged` (NaN/inf loss),
                `out_of_memory` (memory is freed first), `bad_images` (more than
                --max-bad-fraction of a split unreadable), `error` (any other RuntimeError or
                ValueError), with `optuna.fail_reason`;
  INTERRUPTED   Ctrl-C/SIGTERM: the run is closed as KILLED, the trial is queued again;
A UserError inside a trial (something every trial would meet) stops the sweep.
The run is closed after Optuna has recorded the trial (`Objective.close_run`), so MLflow never
says a trial finished that Optuna does not know of.
"""
from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from tqdm import tqdm

from . import figures, model as M, search_space
from .config import TrialConfig, TrialFault, UserError
from .pipeline import Pipeline
from .recovery import (FAIL_KIND_ATTR, FAIL_REASON_ATTR, PRUNE_REASON_ATTR, WORKER_ATTR, original_number,
                       queue_retry, worker_id)
from .study import derive_seed
from .tracking import Tracker
from .train import fit_two_phase


log = logging.getLogger("tlsweep")
MISTAKES_SHOWN = 16  # most confidently misclassified validation images drawn per trial (4 x 4)
STOP = threading.Event()  # set by the sweep's Ctrl-C/SIGTERM handler
# Progress bars: tqdm's own choice (off when not a terminal), always off in a --workers child.
BARS = True if os.environ.get("TLSWEEP_WORKER") else None
_computing = threading.local()


def stop_now() -> bool:
    """Whether a Ctrl-C may raise where it lands: while a trial computes (or before the study
    runs), yes; while Optuna or MLflow write a trial's state, no: STOP is checked right after."""
    return getattr(_computing, "on", True)


class _Computing:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.before, _computing.on = stop_now(), self.on

    def __exit__(self, *exc):
        _computing.on = self.before


def computing() -> _Computing:
    return _Computing(True)


def writing() -> _Computing:
    return _Computing(False)


def raise_if_stopped() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


@dataclass
class Context:
    """What every trial shares: data, model and settings (the pipeline), search space, logging."""
    pipeline: Pipeline
    search: dict
    tracker: Tracker
    parent_id: str
    amp: torch.dtype | None = None  # phase-2 autocast dtype (None: fp32)
    trials: int | None = None       # finished trials the study should have (--trials): the cap


class OutOfMemory(TrialFault):
    kind = "out_of_memory"


class Surplus(TrialFault):
    """Started by a worker that raced another for the last place: the study is full without it."""

    kind = "surplus"


def as_fault(exc: Exception, device: torch.device, batch_size: int) -> TrialFault | None:
    """The trial-ending fault an exception stands for; None if it should stop the sweep."""
    if isinstance(exc, TrialFault):
        return exc
    text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return OutOfMemory(f"out of memory on {device} at batch size {batch_size} ({text}); the trial's "
                           f"memory was freed. If every trial runs out, lower --batch-size or --image-size")
    if isinstance(exc, (RuntimeError, ValueError)):
        return TrialFault(f"{type(exc).__name__}: {text}")
    return None


class Objective:
    """One trial: sample, train both phases, log to the trial's MLflow run, return valid acc."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.interrupted: int | None = None   # number of the trial Ctrl-C stopped
        self.taken_over: int | None = None    # number of a trial another worker took over

    def config(self, trial, origin: int) -> TrialConfig:
        """`origin`: the trial number this one stands for (its own, or the lost trial it retries)."""
        pipe = self.ctx.pipeline
        f = pipe.fixed
        sampled = search_space.sample(trial, self.ctx.search)
        # A retry of a lost trial keeps the lost trial's seed: it trains what that trial would have.
        seed = derive_seed(f.seed, origin)
        return TrialConfig(
            backbone=f.backbone, weights=pipe.weights, image_size=f.image_size, batch_size=f.batch_size,
            max_epochs_phase1=f.max_epochs_phase1, max_epochs_phase2=f.max_epochs_phase2,
            phase2_head_lr_factor=f.phase2_head_lr_factor, seed=seed, classes=pipe.splits.classes, **sampled)

    def __call__(self, trial) -> float:
        """Train; the run is closed by `close_run` after Optuna records the outcome (or here,
        when the sweep stops: interrupted, or a user error)."""
        tracker = self.ctx.tracker
        trial.set_user_attr(WORKER_ATTR, worker_id())
        self.check_room(trial)
        retry_of = original_number(trial.study, trial)
        cfg = self.config(trial, retry_of)
        params = {k: v for k, v in cfg.to_dict().items() if k != "classes"}
        run_id = tracker.start_trial(self.ctx.parent_id, trial.number, params)
        trial.set_user_attr("mlflow_run_id", run_id)
        tags = {"weights.random_init": "true"} if cfg.weights == "none" else {}
        if retry_of != trial.number:
            tags["optuna.retry_of"] = retry_of
        if tags:
            tracker.set_tags(run_id, tags)
        fault = None
        try:
            with computing():
                value = self.train(trial, cfg, run_id)
        except optuna.TrialPruned as exc:
            trial.set_user_attr(PRUNE_REASON_ATTR, str(exc))
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker found this trial's heartbeat stale and queued it again: step aside.
            self.taken_over = trial.number
            self.end(run_id, "FAIL", "taken over by another worker (this one's heartbeat was late)", status="KILLED")
            raise
        except KeyboardInterrupt:
            # Optuna records it as FAIL; this worker queues it again (`run_sweep`), no other does.
            with writing():
                trial.set_user_attr(FAIL_KIND_ATTR, "interrupted")
                self.interrupted = trial.number
                self.end(run_id, "INTERRUPTED", "interrupted (Ctrl-C or SIGTERM); queued again")
            raise
        except Exception as exc:
            fault = None if isinstance(exc, UserError) else as_fault(exc, self.ctx.pipeline.device, cfg.batch_size)
            kind, reason = (fault.kind if fault else "error"), str(fault or f"{type(exc).__name__}: {exc}")
            trial.set_user_attr(FAIL_KIND_ATTR, kind)
            trial.set_user_attr(FAIL_REASON_ATTR, reason[:5000])
            if fault is None:  # the sweep stops: no callback will close the run
                self.end(run_id, "FAIL", reason, {FAIL_KIND_ATTR: kind})
                raise
        if fault is not None:
            # Raised here, not inside `except`: the fault must not chain the original exception,
            # whose traceback reaches the trial's model (memory that must be freed now). The
            # sweep catches faults: this trial ends, the sweep goes on.
            fault.__traceback__, fault.__context__, fault.__cause__ = None, None, None
            raise fault
        return value

    def check_room(self, trial) -> None:
        """Workers that start at once may overshoot --trials: the trials finished, and those
        running with a smaller number, go first; a trial without room ends before it starts
        (FAIL, `surplus`, no run), and a retry it carried is queued again."""
        if self.ctx.trials is None:
            return
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        ahead = sum(1 for t in trial.study.get_trials(deepcopy=False)
                    if t.state in done or (t.state == optuna.trial.TrialState.RUNNING and t.number < trial.number))
        if ahead < self.ctx.trials:
            return
        frozen = trial.study._storage.get_trial(trial._trial_id)
        if frozen.system_attrs.get("failed_trial") is not None:
            queue_retry(trial.study, frozen, count=False)
        trial.set_user_attr(FAIL_KIND_ATTR, Surplus.kind)
        trial.set_user_attr(FAIL_REASON_ATTR, "another worker took the last place")
        raise Surplus(f"the study has its {self.ctx.trials} trials without this one")

    def close_run(self, study: optuna.Study, trial) -> None:
        """Optuna callback: close the trial's run once Optuna has recorded the trial, so a kill in
        between leaves a RUNNING run that the next start closes from Optuna's record, never a
        closed run that disagrees with Optuna."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is None:
            return
        with writing():
            if trial.state == optuna.trial.TrialState.FAIL:
                kind = trial.user_attrs.get(FAIL_KIND_ATTR, "error")
                self.end(run_id, "FAIL", trial.user_attrs.get(FAIL_REASON_ATTR), {FAIL_KIND_ATTR: kind})
            else:
                self.end(run_id, trial.state.name, trial.user_attrs.get(PRUNE_REASON_ATTR))

    def end(self, run_id: str, state: str, reason: str | None = None, tags: dict | None = None,
            status: str | None = None) -> None:
        """Close the trial's run, naming the unreadable files it skipped, if any."""
        tags = dict(tags or {})
        bad = self.ctx.pipeline.bad_images()
        if bad:
            tags["data.skipped_images"] = sum(len(files) for files in bad.values())
            self.ctx.tracker.log_json(run_id, bad, "data/skipped_images.json")
        self.ctx.tracker.end_run(run_id, state, reason, status=status, tags=tags)

    def train(self, trial, cfg: TrialConfig, run_id: str) -> float:
        ctx = self.ctx
        raise_if_stopped()  # a stop that came while Optuna was starting this trial
        model = ctx.pipeline.model(cfg.seed)
        train_loader, valid_loader, phase1_inputs = ctx.pipeline.loaders(cfg, model)
        try:
            return self.fit(trial, cfg, run_id, model, train_loader, valid_loader, phase1_inputs)
        except BaseException as exc:
            # The traceback's frames hold the model, optimizer, batches and best state; Optuna keeps
            # the exception, so clear them, or a failed (e.g. out-of-memory) or pruned trial's
            # memory lives on into the next trial.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            del model, train_loader, valid_loader, phase1_inputs
            gc.collect()
            if ctx.pipeline.device.type == "cuda":
                torch.cuda.empty_cache()

    def fit(self, trial, cfg: TrialConfig, run_id: str, model, train_loader, valid_loader, phase1_inputs):
        ctx = self.ctx
        total = cfg.max_epochs_phase1 + cfg.max_epochs_phase2
        with tqdm(total=total, desc=f"trial {trial.number}", leave=False, unit="ep", disable=BARS) as bar:
            def on_epoch(rec):
                with writing():
                    ctx.tracker.log_epoch(run_id, rec)
                    bar.update(1)
                    bar.set_postfix(phase=rec.phase, valid_acc=f"{rec.valid_acc:.3f}")
                    trial.report(rec.valid_acc, rec.step)
                    prune = trial.should_prune()
                raise_if_stopped()
                if prune:
                    raise optuna.TrialPruned(f"pruned at global epoch {rec.step} (valid/acc {rec.valid_acc:.4f})")

            history = []  # both phases' epochs, for the training curves

            def on_phase_end(result, trained_model):
                history.extend(result.history)
                with writing():
                    self.log_phase(run_id, cfg, result, trained_model)
                    if result.phase == 2:
                        self.try_figures(run_id, cfg, result, history, trial.number)
                raise_if_stopped()

            _, phase2 = fit_two_phase(
                model, train_loader, valid_loader, head_lr=cfg.head_lr, backbone_lr_ratio=cfg.backbone_lr_ratio,
                patience=cfg.patience, max_epochs_phase1=cfg.max_epochs_phase1,
                max_epochs_phase2=cfg.max_epochs_phase2, device=ctx.pipeline.device,
                phase2_head_lr_factor=cfg.phase2_head_lr_factor, phase1_inputs=phase1_inputs,
                on_epoch=on_epoch, on_phase_end=on_phase_end, amp=ctx.amp, keep_mistakes=MISTAKES_SHOWN)
        return phase2.best_valid_acc

    def log_phase(self, run_id: str, cfg: TrialConfig, result, model) -> None:
        """Best checkpoint and validation confusion matrix of a finished phase."""
        tracker, p = self.ctx.tracker, result.phase
        tracker.log_metrics(run_id, {f"phase{p}/epochs": result.epochs, f"phase{p}/best_epoch": result.best_epoch,
                                     f"phase{p}/best_valid_acc": result.best_valid_acc,
                                     f"phase{p}/best_valid_loss": result.best_valid_loss}, step=result.last_step)
        with tempfile.TemporaryDirectory() as tmp:
            pipe = self.ctx.pipeline
            ckpt = M.make_checkpoint(model, {**cfg.to_dict(), "mean": pipe.mean, "std": pipe.std},
                                     p, result.best_epoch, result.best_valid_acc)
            path = M.save_checkpoint(ckpt, Path(tmp) / f"phase{p}_best.pt")
            tracker.log_files(run_id, [path], "checkpoints")
            cm = figures.confusion(result.valid_targets, result.valid_preds, len(cfg.classes))
            files = figures.write_confusion(cm, cfg.classes, Path(tmp) / f"valid_phase{p}",
                                            f"validation, phase {p} best (epoch {result.best_epoch})")
            tracker.log_files(run_id, files, "confusion")

    def try_figures(self, run_id: str, cfg: TrialConfig, result, history: list, number: int) -> None:
        """The figures are for reading, the trial's result stands without them: a failure to draw
        them is a warning and a tag on the run, never a failed trial."""
        try:
            self.log_figures(run_id, cfg, result, history, number)
        except Exception as exc:  # noqa: BLE001 - matplotlib and artifact stores fail in many ways
            log.warning("trial %d: figures not written (%s: %s)", number, type(exc).__name__, exc)
            self.ctx.tracker.set_tags(run_id, {"figures.error": f"{type(exc).__name__}: {exc}"[:500]})

    def log_figures(self, run_id: str, cfg: TrialConfig, result, history: list, number: int) -> None:
        """What a user looks at on a trial that finished phase 2 (see src/figures.py): per-class
        scores, training curves of both phases, the most confidently misclassified images."""
        pipe, classes = self.ctx.pipeline, cfg.classes
        where = f"trial {number}, validation, phase 2 best (epoch {result.best_epoch})"
        rows = figures.per_class_report(result.valid_targets, result.valid_preds, classes)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            files = [figures.write_report(rows, tmp / "per_class_valid.csv"),
                     figures.save(figures.per_class_figure(rows, where), tmp / "per_class_valid.png"),
                     figures.save(figures.training_curves_figure(history, f"trial {number}: training curves"),
                                  tmp / "training_curves.png")]
            if result.valid_mistakes is not None:
                fig = figures.misclassified_figure(result.valid_mistakes, classes, pipe.mean, pipe.std,
                                                   f"{where}: most confidently misclassified")
                files.append(figures.save(fig, tmp / "misclassified_valid.png"))
            self.ctx.tracker.log_files(run_id, files, "figures")
