"""A trial's record: its MLflow run, opened with the trial's config, fed every epoch and phase,
and closed as Optuna recorded the trial; and its progress bar in the terminal.

What a trial run gets (names in src/tracking.py): params (the whole config but the classes),
tags, per-epoch metrics, per phase `phase<p>/*` metrics, `checkpoints/phase<p>_best.pt` and
`confusion/valid_phase<p>.{png,csv}`, after phase 2 `figures/*` (src/figures.py). The run is
closed after Optuna has recorded the trial (`close_as_recorded`, an Optuna callback), so MLflow
never says a trial finished that Optuna does not know of; a kill in between leaves a RUNNING run
that the next start closes from Optuna's record (src/recovery.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import optuna
import torch

from . import figures, model as M
from .config import TrialConfig
from .stats import wilson
from .stopping import writing
from .tracking import Tracker
from .train import PhaseResult
from . import trials as T
from .trials import FAIL_KIND_ATTR, FAIL_REASON_ATTR, PRUNE_REASON_ATTR, RUN_ID_ATTR

log = logging.getLogger("tlsweep")
KEPT_TAG = "checkpoint.kept"  # "false": --keep-checkpoints left this trial's phase-2 model out (not among the best)
MISTAKES_SHOWN = 16  # most confidently misclassified validation images drawn per trial (4 x 4)
# Progress bars: tqdm's own choice (off when not a terminal), always off in a --workers child.
BARS = True if os.environ.get("TLSWEEP_WORKER") else None


class TrialRecord:
    """The MLflow runs of a sweep's trials, each a child of the parent run."""

    def __init__(self, tracker: Tracker, parent_id: str, mean, std):
        # mean/std: the input normalization, kept in checkpoints and undone to draw mistakes
        self.tracker, self.parent_id, self.mean, self.std = tracker, parent_id, mean, std

    def open(self, trial: optuna.Trial, cfg: TrialConfig, retry_of: int) -> str:
        """The trial's run, with its config as params; its id is recorded on the trial."""
        params = {k: v for k, v in cfg.to_dict().items() if k != "classes"}
        run_id = self.tracker.start_trial(self.parent_id, trial.number, params)
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        tags = {"train.threads": torch.get_num_threads()}  # CPU threads (a --workers child: its share)
        if cfg.weights == "none":
            tags["weights.random_init"] = "true"
        if retry_of != trial.number:
            tags["optuna.retry_of"] = retry_of
        self.tracker.set_tags(run_id, tags)
        return run_id

    def epoch(self, run_id: str, record) -> None:
        self.tracker.log_epoch(run_id, record)

    def phase_end(self, run_id: str, cfg: TrialConfig, result: PhaseResult, model, history: list,
                  number: int, keep: bool = True) -> None:
        """Best checkpoint (unless not `keep`; phase 2: tag `checkpoint.kept=false`) and validation confusion
        matrix of a finished phase; after phase 2 also the figures a user looks at."""
        tracker, p = self.tracker, result.phase
        low, high = wilson(result.best_valid_acc, len(result.valid_targets))
        tracker.log_metrics(run_id, {f"phase{p}/epochs": result.epochs, f"phase{p}/best_epoch": result.best_epoch,
                                     f"phase{p}/best_valid_acc": result.best_valid_acc,
                                     f"phase{p}/best_valid_acc_low": low, f"phase{p}/best_valid_acc_high": high,
                                     f"phase{p}/best_valid_loss": result.best_valid_loss}, step=result.last_step)
        with tempfile.TemporaryDirectory() as tmp:
            if keep:
                ckpt = M.make_checkpoint(model, {**cfg.to_dict(), "mean": self.mean, "std": self.std},
                                         p, result.best_epoch, result.best_valid_acc)
                tracker.log_files(run_id, [M.save_checkpoint(ckpt, Path(tmp) / f"phase{p}_best.pt")], "checkpoints")
            elif p == 2:
                tracker.set_tags(run_id, {KEPT_TAG: "false"})
            cm = figures.confusion(result.valid_targets, result.valid_preds, len(cfg.classes))
            files = figures.write_confusion(cm, cfg.classes, Path(tmp) / f"valid_phase{p}",
                                            f"validation, phase {p} best (epoch {result.best_epoch})")
            tracker.log_files(run_id, files, "confusion")
        if p == 2:
            self._try_figures(run_id, cfg, result, history, number)

    def _try_figures(self, run_id: str, cfg: TrialConfig, result: PhaseResult, history: list, number: int) -> None:
        """The figures are for reading, the trial's result stands without them: a failure to draw
        them is a warning and a tag on the run, never a failed trial."""
        try:
            self._figures(run_id, cfg, result, history, number)
        except Exception as exc:  # noqa: BLE001 - matplotlib and artifact stores fail in many ways
            log.warning("trial %d: figures not written (%s: %s)", number, type(exc).__name__, exc)
            self.tracker.set_tags(run_id, {"figures.error": f"{type(exc).__name__}: {exc}"[:500]})

    def _figures(self, run_id: str, cfg: TrialConfig, result: PhaseResult, history: list, number: int) -> None:
        """Per-class scores, training curves of both phases, the most confidently misclassified images."""
        classes = cfg.classes
        where = f"trial {number}, validation, phase 2 best (epoch {result.best_epoch})"
        rows = figures.per_class_report(result.valid_targets, result.valid_preds, classes)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            files = [figures.write_report(rows, tmp / "per_class_valid.csv"),
                     figures.save(figures.per_class_figure(rows, where), tmp / "per_class_valid.png"),
                     figures.save(figures.training_curves_figure(history, f"trial {number}: training curves"),
                                  tmp / "training_curves.png")]
            if result.valid_mistakes is not None:
                fig = figures.misclassified_figure(result.valid_mistakes, classes, self.mean, self.std,
                                                   f"{where}: most confidently misclassified")
                files.append(figures.save(fig, tmp / "misclassified_valid.png"))
            self.tracker.log_files(run_id, files, "figures")

    def skipped(self, run_id: str, bad: dict[str, dict[str, str]]) -> None:
        """Name the unreadable files the trial skipped, if any (split -> {path: reason}). Written as
        the trial ends, whatever its outcome: a failure to write it is a warning, never the outcome."""
        if not bad:
            return
        try:
            self.tracker.set_tags(run_id, {"data.skipped_images": sum(len(files) for files in bad.values())})
            self.tracker.log_json(run_id, bad, "data/skipped_images.json")
        except Exception as exc:  # noqa: BLE001 - the trial's own outcome must reach Optuna
            log.warning("run %s: the skipped images were not recorded (%s: %s)", run_id, type(exc).__name__, exc)

    def close(self, run_id: str, state: str, reason: str | None = None, tags: dict | None = None,
              status: str | None = None) -> None:
        self.tracker.end_run(run_id, state, reason, status=status, tags=tags)

    def close_as_recorded(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback: close the trial's run as Optuna recorded the trial."""
        run_id = T.run_id(trial)
        if run_id is None:
            return
        with writing():
            if trial.state == optuna.trial.TrialState.FAIL:
                kind = trial.user_attrs.get(FAIL_KIND_ATTR, "error")
                self.close(run_id, "FAIL", trial.user_attrs.get(FAIL_REASON_ATTR), {FAIL_KIND_ATTR: kind})
            else:
                self.close(run_id, trial.state.name, trial.user_attrs.get(PRUNE_REASON_ATTR))
