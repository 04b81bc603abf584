"""CLI: run an Optuna study of two-phase transfer-learning trials, every trial an MLflow run.

    python -m src.sweep --trials 30                      # built-in demo data
    python -m src.sweep --trials 30 --data ~/sports      # your images
"""
from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import torch
from tqdm import tqdm

from . import data as D
from . import figures, model as M, search_space
from .config import Fixed, TrialConfig, UserError, load_sweep, resolve_fixed
from .pipeline import Pipeline, initial_model
from .study import (check_same_settings, derive_seed, finished, log_study_plots, open_parent,
                    open_study, pruning_savings, summary_table, update_best)
from .tracking import Tracker
from .train import PRECISIONS, amp_dtype, fit_two_phase

log = logging.getLogger("tlsweep")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "sweeps" / "default.toml"
DEFAULT_STORAGE = f"sqlite:///{REPO / 'optuna.db'}"  # in the repo, whatever the working directory


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m src.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=30,
                   help="finished trials the study should have in total; a resumed study only runs the rest (default 30)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds (default: none)")
    p.add_argument("--data", type=Path, default=None, help="image folder (default: built-in digits demo)")
    p.add_argument("--sweep", type=Path, default=DEFAULT_SWEEP, help="sweep file (default sweeps/default.toml)")
    p.add_argument("--backbone", help="torchvision model name (default from the sweep file)")
    p.add_argument("--weights", help="imagenet | none | PATH to a state dict (default from the sweep file)")
    p.add_argument("--image-size", type=int, help="crop side in pixels (default from the sweep file)")
    p.add_argument("--batch-size", type=int, help="batch size (default from the sweep file)")
    p.add_argument("--max-epochs", type=int, help="max epochs of EACH phase (default from the sweep file)")
    p.add_argument("--seed", type=int, help="study seed (default from the sweep file)")
    p.add_argument("--study-name", help="Optuna study; reusing a name resumes it (default <sweep>-<data>)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (default: optuna.db in the repo)")
    p.add_argument("--experiment", help="MLflow experiment (default: the sweep file's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's own, sqlite:///mlflow.db)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="fine-tuning and validation arithmetic: auto = bf16 autocast where the hardware does "
                        "bf16 natively (recent GPUs; CPUs with AVX512-BF16 or AMX), else fp32 (default auto)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: 0 on CPU, cores-1 up to 8 on CUDA)")
    p.add_argument("--no-prune", action="store_true", help="never prune (to compare epochs spent)")
    p.add_argument("--no-cache", action="store_true",
                   help="decode images and run the frozen backbone every epoch (slow; for comparison)")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error(f"--trials {args.trials}: give at least 1")
    return args


@dataclass
class Context:
    """What every trial shares: data, model and settings (the pipeline), search space, logging."""
    pipeline: Pipeline
    search: dict
    tracker: Tracker
    parent_id: str
    amp: torch.dtype | None = None  # phase-2 autocast dtype (None: fp32)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {name} is not usable here ({exc}); use cpu or auto") from exc
    return device


def resolve_weights(fixed: Fixed, n_classes: int, on_demo: bool,
                    weights_flag: str | None) -> tuple[torch.nn.Module, str, bool]:
    """Load the starting model before any training: (model, effective weights, fell back)."""
    if fixed.weights == "none":
        log.warning("*** --weights none: RANDOM INIT, no pretrained features (much worse results) ***")
    try:
        return initial_model(fixed.backbone, n_classes, fixed.weights, fixed.seed), fixed.weights, False
    except M.WeightsUnavailable as exc:
        if not (on_demo and weights_flag is None):
            raise
        log.warning("*** ImageNet weights unavailable; the DEMO continues from RANDOM INIT. ***\n%s", exc)
        return initial_model(fixed.backbone, n_classes, "none", fixed.seed), "none", True


class Objective:
    """One trial: sample, train both phases, log to the trial's MLflow run, return valid acc."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def config(self, trial) -> TrialConfig:
        pipe = self.ctx.pipeline
        f = pipe.fixed
        sampled = search_space.sample(trial, self.ctx.search)
        return TrialConfig(
            backbone=f.backbone, weights=pipe.weights, image_size=f.image_size, batch_size=f.batch_size,
            max_epochs_phase1=f.max_epochs_phase1, max_epochs_phase2=f.max_epochs_phase2,
            phase2_head_lr_factor=f.phase2_head_lr_factor, seed=derive_seed(f.seed, trial.number),
            classes=pipe.splits.classes, **sampled)

    def __call__(self, trial) -> float:
        cfg = self.config(trial)
        params = {k: v for k, v in cfg.to_dict().items() if k != "classes"}
        run_id = self.ctx.tracker.start_trial(self.ctx.parent_id, trial.number, params)
        trial.set_user_attr("mlflow_run_id", run_id)
        if cfg.weights == "none":
            self.ctx.tracker.set_tags(run_id, {"weights.random_init": "true"})
        try:
            value = self.train(trial, cfg, run_id)
        except optuna.TrialPruned as exc:
            self.ctx.tracker.end_run(run_id, "PRUNED", str(exc))
            # The traceback holds the training frames (model, optimizer, best state); Optuna
            # keeps the exception, so clear them or the memory lives on into the next trial.
            traceback.clear_frames(exc.__traceback__)
            raise
        except KeyboardInterrupt:
            self.ctx.tracker.end_run(run_id, "INTERRUPTED", "interrupted by the user (Ctrl-C)")
            raise
        except Exception as exc:
            self.ctx.tracker.end_run(run_id, "FAIL", f"{type(exc).__name__}: {exc}")
            raise
        self.ctx.tracker.end_run(run_id, "COMPLETE")
        return value

    def train(self, trial, cfg: TrialConfig, run_id: str) -> float:
        ctx = self.ctx
        model = ctx.pipeline.model(cfg.seed)
        train_loader, valid_loader, phase1_inputs = ctx.pipeline.loaders(cfg, model)
        try:
            return self.fit(trial, cfg, run_id, model, train_loader, valid_loader, phase1_inputs)
        finally:
            # A pruned or failed trial must not keep its model and optimizer state alive.
            del model, train_loader, valid_loader, phase1_inputs
            gc.collect()
            if ctx.pipeline.device.type == "cuda":
                torch.cuda.empty_cache()

    def fit(self, trial, cfg: TrialConfig, run_id: str, model, train_loader, valid_loader, phase1_inputs):
        ctx = self.ctx
        total = cfg.max_epochs_phase1 + cfg.max_epochs_phase2
        with tqdm(total=total, desc=f"trial {trial.number}", leave=False, unit="ep", disable=None) as bar:
            def on_epoch(rec):
                ctx.tracker.log_epoch(run_id, rec)
                bar.update(1)
                bar.set_postfix(phase=rec.phase, valid_acc=f"{rec.valid_acc:.3f}")
                trial.report(rec.valid_acc, rec.step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at global epoch {rec.step} (valid/acc {rec.valid_acc:.4f})")

            def on_phase_end(result, trained_model):
                self.log_phase(run_id, cfg, result, trained_model)

            _, phase2 = fit_two_phase(
                model, train_loader, valid_loader, head_lr=cfg.head_lr, backbone_lr_ratio=cfg.backbone_lr_ratio,
                patience=cfg.patience, max_epochs_phase1=cfg.max_epochs_phase1,
                max_epochs_phase2=cfg.max_epochs_phase2, device=ctx.pipeline.device,
                phase2_head_lr_factor=cfg.phase2_head_lr_factor, phase1_inputs=phase1_inputs,
                on_epoch=on_epoch, on_phase_end=on_phase_end, amp=ctx.amp)
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


@dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_run_id: str | None
    best_trial_number: int | None
    n_finished: int
    epochs_spent: int             # global epochs actually trained, over all finished trials
    interrupted: bool = False


def prepare(args) -> tuple[Context, optuna.Study, str]:
    """Validate everything and open study + parent run, before any training."""
    sweep = load_sweep(args.sweep)
    on_demo = args.data is None
    fixed = resolve_fixed(sweep, on_demo, {
        "backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
        "batch_size": args.batch_size, "max_epochs_phase1": args.max_epochs,
        "max_epochs_phase2": args.max_epochs, "seed": args.seed})
    M.check_backbone(fixed.backbone)
    data_dir = D.demo_data_dir() if on_demo else args.data
    splits = D.find_splits(data_dir, seed=fixed.seed)
    device = pick_device(args.device)
    amp = amp_dtype(device, args.precision)
    base, weights, fell_back = resolve_weights(fixed, len(splits.classes), on_demo, args.weights)
    mean, std = M.norm_stats(fixed.backbone)
    study_name = args.study_name or f"{sweep.path.stem}-{'demo-digits' if on_demo else Path(data_dir).name}"
    tracker = Tracker(args.tracking_uri)
    tracker.check_reachable()
    study = open_study(study_name, args.storage, fixed.seed, prune=not args.no_prune)
    check_same_settings(study, {**asdict(fixed), "weights": weights, "search": {
        n: asdict(spec) for n, spec in sweep.search.items()}})
    # Decoding every image once happens here: after the cheap checks, before any training.
    pipeline = Pipeline(splits, fixed, weights, mean, std, device, args.workers, not args.no_cache, base)
    tags = {"optuna.storage": args.storage, "data.dir": str(splits.root), "data.demo": str(on_demo).lower(),
            "weights.requested": fixed.weights, "weights.effective": weights,
            "weights.unavailable": str(fell_back).lower(), "train.device": str(device),
            "train.precision": "bf16" if amp is not None else "fp32", **{f"fixed.{k}": v for k, v in asdict(fixed).items()}}
    parent_id = open_parent(tracker, study, args.experiment or sweep.path.stem, splits, sweep, tags)
    ctx = Context(pipeline, sweep.search, tracker, parent_id, amp)
    return ctx, study, study_name


def run_sweep(args) -> SweepResult:
    ctx, study, study_name = prepare(args)
    done = len(finished(study))
    remaining = max(args.trials - done, 0)
    log.info("study %r: %d finished, running up to %d more; tracking %s, parent run %s",
             study_name, done, remaining, ctx.tracker.uri, ctx.parent_id)
    status, interrupted = "FINISHED", False
    # What start-up built (modules, stores, caches, the starting model) lives all sweep: freeze it
    # out of the collector, so the collection that frees each trial scans only the trial's objects
    # (0.4 s a trial otherwise, with torch, MLflow and Optuna loaded).
    gc.collect()
    gc.freeze()
    try:
        if remaining:
            with tqdm(total=args.trials, initial=done, desc="trials", unit="trial", disable=None) as bar:
                def after_trial(study, trial):
                    bar.update(1 if trial.state != optuna.trial.TrialState.FAIL else 0)
                    value = "-" if trial.value is None else f"{trial.value:.4f}"
                    tqdm.write(f"trial {trial.number}: {trial.state.name} valid_acc={value} {trial.params}")
                    update_best(ctx.tracker, ctx.parent_id, study)

                stop_at_total = optuna.study.MaxTrialsCallback(
                    args.trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
                study.optimize(Objective(ctx), n_trials=remaining, timeout=args.timeout,
                               callbacks=[after_trial, stop_at_total], catch=(RuntimeError, ValueError))
    except KeyboardInterrupt:
        status = "KILLED"
        log.warning("interrupted: finished trials are kept; re-run the same command to continue")
        interrupted = True
    except BaseException:
        status = "FAILED"
        raise
    finally:
        gc.unfreeze()
        update_best(ctx.tracker, ctx.parent_id, study)
        log_study_plots(ctx.tracker, ctx.parent_id, study)
        ctx.tracker.finish(ctx.parent_id, status)
    return report(study, ctx, args, interrupted)


def report(study: optuna.Study, ctx: Context, args, interrupted: bool) -> SweepResult:
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(completed, key=lambda t: t.value) if completed else None
    print(f"\nstudy {study.study_name!r}: {len(finished(study))} finished trials "
          f"({len(completed)} complete), parent run {ctx.parent_id}")
    print(summary_table(study))
    uri = f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""
    if args.tracking_uri and args.tracking_uri.startswith("http"):
        browse = f"open {args.tracking_uri} in a browser"
    else:
        exp_id = ctx.tracker.get_run(ctx.parent_id).info.experiment_id
        browse = ("mlflow ui" + (f" --backend-store-uri {args.tracking_uri}" if args.tracking_uri else "")
                  + f"   # then open http://127.0.0.1:5000/#/experiments/{exp_id}/runs")
    if best is not None:
        print(f"\nbest: trial {best.number}, valid_acc {best.value:.4f}. Next:\n  {browse}\n"
              f"  python -m src.final_test --run-id {ctx.parent_id}{uri}")
    spent, pruned_max = pruning_savings(study, ctx.pipeline.fixed)
    print(f"epochs spent: {spent}; pruned trials could have run up to {pruned_max} more without pruning")
    ctx.tracker.log_metrics(ctx.parent_id, {"sweep/epochs_spent": spent,
                                            "sweep/epochs_saved_by_pruning_max": pruned_max})
    return SweepResult(study.study_name, ctx.parent_id, best.value if best else None,
                       best.user_attrs.get("mlflow_run_id") if best else None, best.number if best else None,
                       len(finished(study)), spent, interrupted)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # docker stop, CI timeouts: clean up like Ctrl-C
    try:
        result = run_sweep(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.interrupted:
        return 130
    if result.best_value is None:
        print("error: no trial completed; see optuna.fail_reason on the trial runs", file=sys.stderr)
        return 1
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
