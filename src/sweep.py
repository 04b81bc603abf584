"""CLI: run an Optuna study of two-phase transfer-learning trials, every trial an MLflow run.

    python -m src.sweep --trials 30                      # built-in demo data
    python -m src.sweep --trials 30 --data ~/sports      # your images
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries load: nothing has started, leave quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import optuna
import torch

from . import data as D
from . import model as M
from .config import Fixed, UserError, load_sweep, resolve_fixed
from .objective import STOP, Context, Objective, stop_now, writing
from .scheduler import StopOnFailures, optimize
from .pipeline import DEFAULT_MAX_BAD_FRACTION, Pipeline, initial_model
from .recovery import LostTrials, queue_retry, recover
from .report import SCORE, log_report, next_commands, summary_table, ui_base
from .study import check_same_settings, finished, open_parent, open_study, pruning_savings, update_best
from .tracking import Tracker
from .train import PRECISIONS, amp_dtype

log = logging.getLogger("tlsweep")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "sweeps" / "default.toml"
DEFAULT_STORAGE = f"sqlite:///{REPO / 'optuna.db'}"  # in the repo, whatever the working directory
PARENT_SETTLE_S = 3.0  # on a shared storage, wait this long after creating a parent before electing one


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
    p.add_argument("--workers", type=int, default=1,
                   help="sweep processes on this machine sharing the study (default 1); more than 1 needs a "
                        "storage for concurrent writers: postgresql://... or journal:///PATH")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="DataLoader worker processes per sweep process (default: 0 on CPU, cores-1 up to 8 on CUDA)")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help="unreadable images of a split that are skipped (and named on the runs) before it is "
                        f"an error (default {DEFAULT_MAX_BAD_FRACTION})")
    p.add_argument("--no-prune", action="store_true", help="never prune (to compare epochs spent)")
    p.add_argument("--no-cache", action="store_true",
                   help="decode images and run the frozen backbone every epoch (slow; for comparison)")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error(f"--trials {args.trials}: give at least 1 (the total of finished trials the study should have)")
    if not 0 <= args.max_bad_fraction < 1:
        p.error(f"--max-bad-fraction {args.max_bad_fraction}: give a fraction from 0 to below 1, e.g. 0.01")
    if args.workers < 1:
        p.error(f"--workers {args.workers}: give at least 1")
    if args.timeout is not None and args.timeout <= 0:
        p.error(f"--timeout {args.timeout}: give a positive number of seconds")
    return args


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
    stopped_reason: str | None = None  # set when too many trials failed in a row


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
    study = open_study(study_name, args.storage, fixed.seed, prune=not args.no_prune, on_lost=LostTrials(tracker))
    check_same_settings(study, {**asdict(fixed), "weights": weights, "search": {
        n: asdict(spec) for n, spec in sweep.search.items()}})
    # Decoding every image once happens here: after the cheap checks, before any training.
    pipeline = Pipeline(splits, fixed, weights, mean, std, device, args.loader_workers, not args.no_cache, base,
                        args.max_bad_fraction)
    tags = {"optuna.storage": args.storage, "data.dir": str(splits.root), "data.demo": str(on_demo).lower(),
            "weights.requested": fixed.weights, "weights.effective": weights,
            "weights.unavailable": str(fell_back).lower(), "train.device": str(device),
            "train.precision": "bf16" if amp is not None else "fp32", **{f"fixed.{k}": v for k, v in asdict(fixed).items()}}
    settle_s = 0.0 if args.storage.startswith("sqlite") else PARENT_SETTLE_S
    parent_id = open_parent(tracker, study, args.experiment or sweep.path.stem, splits, sweep, tags, settle_s)
    if splits.ignored_files:
        log.warning("%d non-image file(s) under %s were ignored (counted in dataset/summary.json)",
                    splits.ignored_files, splits.root)
    bad = pipeline.bad_images()  # found while decoding once; each trial run names them too
    tracker.set_tags(parent_id, {"data.skipped_images": sum(len(v) for v in bad.values())})
    if bad:
        tracker.log_json(parent_id, bad, "dataset/skipped_images.json")
    recover(study, tracker, parent_id)  # what a killed or interrupted earlier run left behind
    return Context(pipeline, sweep.search, tracker, parent_id, amp, args.trials), study, study_name


def run_sweep(args) -> SweepResult:
    STOP.clear()  # a stop belongs to one sweep
    ctx, study, study_name = prepare(args)
    done = len(finished(study))
    remaining = max(args.trials - done, 0)
    log.info("study %r: %d finished, running up to %d more; tracking %s, parent run %s",
             study_name, done, remaining, ctx.tracker.uri, ctx.parent_id)
    status, interrupted, failures, objective = "FINISHED", False, StopOnFailures(), Objective(ctx)
    # What start-up built (modules, stores, caches, the starting model) lives all sweep: freeze it
    # out of the collector, so the collection that frees each trial scans only the trial's objects
    # (0.4 s a trial otherwise, with torch, MLflow and Optuna loaded).
    gc.collect()
    gc.freeze()
    try:
        if remaining:
            optimize(study, objective, ctx, args, failures)
    except KeyboardInterrupt:
        status, interrupted = "KILLED", True
        log.warning("interrupted: finished trials are kept; re-run the same command to continue")
        stopped = None if objective.interrupted is None else study.trials[objective.interrupted]
        if stopped is not None and stopped.state == optuna.trial.TrialState.FAIL:  # else recovery takes it
            queue_retry(study, stopped, count=False)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        gc.unfreeze()
        with writing():  # a first Ctrl-C here only sets STOP; a second cuts the report, not the close
            try:
                update_best(ctx.tracker, ctx.parent_id, study)
                write_report(ctx, study, args)
            finally:
                ctx.tracker.finish(ctx.parent_id, status)
    result = report(study, ctx, args, interrupted)
    result.stopped_reason = failures.reason
    return result


def report(study: optuna.Study, ctx: Context, args, interrupted: bool) -> SweepResult:
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(completed, key=lambda t: t.value) if completed else None
    if os.environ.get("TLSWEEP_WORKER"):  # a --workers child: the launcher prints the summary
        return SweepResult(study.study_name, ctx.parent_id, best.value if best else None,
                           best.user_attrs.get("mlflow_run_id") if best else None,
                           best.number if best else None, len(finished(study)), 0, interrupted)
    print(f"\nstudy {study.study_name!r}: {len(finished(study))} finished trials "
          f"({len(completed)} complete), parent run {ctx.parent_id}")
    print(summary_table(study))
    spent, pruned_max = pruning_savings(study, ctx.pipeline.fixed)
    print(f"epochs spent: {spent}; pruned trials could have run up to {pruned_max} more without pruning")
    if best is not None:
        print(f"\nbest: trial {best.number}, valid_acc {best.value:.4f} (run {best.user_attrs.get('mlflow_run_id')}). "
              f"Next:")
    else:
        print("\nno trial completed yet (see optuna.fail_reason on the trial runs). Next:")
    for what, cmd in commands(ctx, args).items():
        if best is not None or what != SCORE:  # nothing to score yet
            print(f"  # {what}\n  {cmd}")
    ctx.tracker.log_metrics(ctx.parent_id, {"sweep/epochs_spent": spent,
                                            "sweep/epochs_saved_by_pruning_max": pruned_max})
    return SweepResult(study.study_name, ctx.parent_id, best.value if best else None,
                       best.user_attrs.get("mlflow_run_id") if best else None, best.number if best else None,
                       len(finished(study)), spent, interrupted)


def write_report(ctx: Context, study: optuna.Study, args) -> None:
    """The parent run's summary page, tables and plots (src/report.py), as the study is now. They
    are derived from the study, so a failure here is a warning, never the sweep's outcome: the
    next run of the same command writes them again."""
    try:
        log_report(ctx.tracker, ctx.parent_id, study, ctx.pipeline.fixed, ctx.pipeline.weights,
                   commands(ctx, args), ui_base(args.tracking_uri))
    except Exception as exc:  # plotting or artifact-store trouble
        log.warning("could not write the sweep's report on parent run %s (%s: %s); the trials are "
                    "unaffected, and re-running the same command writes it", ctx.parent_id, type(exc).__name__, exc)


def commands(ctx: Context, args) -> dict:
    exp_id = ctx.tracker.get_run(ctx.parent_id).info.experiment_id
    return next_commands(ctx.parent_id, args.tracking_uri, args.storage, exp_id)


def check_storage_for_workers(storage: str, workers: int) -> None:
    if workers > 1 and storage.startswith("sqlite"):
        raise UserError(f"--workers {workers} with --storage {storage}: SQLite takes one writer at a time. Use "
                        f"--storage journal:///path/to/optuna-journal.log on one machine, or PostgreSQL: --storage "
                        f"postgresql://USER@HOST/DB (python -m src.stack start prints one, and a --tracking-uri)")


def launch(args, argv: list[str]) -> int:
    """--workers N: N sweep processes on one study. Start-up (checks, decoding, study and parent
    run) runs once here first, so the workers find everything made; then they share the trials."""
    check_storage_for_workers(args.storage, args.workers)
    ready = parse_args([*argv, "--workers", "1", "--trials", "1"])
    ctx, study, _ = prepare(ready)  # fails fast, with the message, before any worker starts
    # Each worker in its own session: a Ctrl-C (or SIGTERM) reaches them once, forwarded from here.
    # The appended "--workers 1" wins over the user's (argparse keeps the last).
    procs = [subprocess.Popen([sys.executable, "-m", "src.sweep", *argv, "--workers", "1"],
                              env={**os.environ, "TLSWEEP_WORKER": str(i)}, start_new_session=True)
             for i in range(args.workers)]
    log.info("started %d workers: pids %s", args.workers, [p.pid for p in procs])
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)  # each cleans up: trial interrupted, queued again, runs closed
        for p in procs:
            p.wait()
        return 130
    study = open_study(study.study_name, args.storage, ctx.pipeline.fixed.seed)
    write_report(ctx, study, args)  # each worker wrote one when it ended; this one sees them all
    report(study, ctx, args, interrupted=False)
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N: 128 + N, as a shell says
    return max(codes)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # ERROR: Optuna would log every failed trial with a traceback; the sweep prints one line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    args = parse_args(argv)
    # Ctrl-C, and SIGTERM (docker stop, CI timeouts) the same way: see `_stop`.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    unraisable, sys.unraisablehook = sys.unraisablehook, _quiet_stop(sys.unraisablehook)
    try:
        if args.workers > 1:
            return launch(args, list(sys.argv[1:] if argv is None else argv))
        result = run_sweep(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the first trial, or a second Ctrl-C while cleaning up
        print("interrupted; nothing finished was lost. Run the same command again to continue.", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = unraisable
        STOP.clear()
    if result.interrupted:
        return 130
    if result.stopped_reason:
        print(f"error: sweep stopped: {result.stopped_reason}", file=sys.stderr)
        return 1
    if result.best_value is None:
        print("error: no trial completed; see optuna.fail_reason on the trial runs", file=sys.stderr)
        return 1
    return 0


def _stop(signum, frame):
    """Ctrl-C/SIGTERM: remember the stop (STOP, checked after every epoch and trial), and raise
    KeyboardInterrupt at once while a trial computes; not while Optuna or MLflow write a trial's
    state, which must not be cut in half. A second signal raises wherever it lands. (Python also
    drops an exception raised inside a garbage-collector callback: STOP keeps that one too.)"""
    again = STOP.is_set()
    STOP.set()
    if again or stop_now():
        raise KeyboardInterrupt(f"signal {signum}")


def _quiet_stop(hook):
    """An unraisable-exception hook that stays quiet about a dropped stop (STOP has it)."""
    def quiet(info):
        if not (isinstance(info.exc_value, KeyboardInterrupt) and STOP.is_set()):
            hook(info)
    return quiet


if __name__ == "__main__":
    sys.exit(main())
