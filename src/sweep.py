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
import sys
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries load: nothing has started, leave quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import optuna

from . import trials as T
from .device import PRECISIONS, use_my_cores
from .errors import UserError
from .estimate import estimate
from .launcher import launch
from .options import SweepOptions
from .pipeline import DEFAULT_MAX_BAD_FRACTION
from .recovery import requeue_interrupted
from .scheduler import optimize
from .confirm import DEFAULT_FOLDS, FULL_EPOCHS, FULL_TOP, MAX_TOP
from .fidelity import HALF, MIN_SEARCH
from .soup import SOUP_TOP
from .start import start
from .stopping import STOP, handling_signals, writing
from .study import update_best
from .summary import SweepResult, print_summary, result, try_confirm, try_winner, write_report
from .winner import ENSEMBLE_TOP
from .trial import Objective

log = logging.getLogger("tlsweep")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "sweeps" / "default.toml"
DEFAULT_STORAGE = f"sqlite:///{REPO / 'optuna.db'}"  # in the repo, whatever the working directory


def parse_args(argv=None) -> SweepOptions:
    p = build_parser()
    args = p.parse_args(argv)
    _check(p, args)
    return SweepOptions(**vars(args))


def _half_or(give: str):
    """argparse's `type` for --search-size and --search-epochs: a whole number >= 0, or HALF."""
    def parse(value: str) -> int | str:
        if value != HALF and not (value.isascii() and value.isdigit()):
            raise argparse.ArgumentTypeError(f"{value}: give {give}")
        return value if value == HALF else int(value)
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The sweep's flags (docs/flags.md lists each; tests/test_docs.py keeps the two agreeing)."""
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
    p.add_argument("--search-size", metavar="S", type=_half_or(f"a side in pixels below --image-size, {HALF} (half "
                                                         f"the side, not below {MIN_SEARCH} px) or 0 (off)"),
                   help=f"trials train at S px, the --confirm-top best again at --image-size, and only those "
                        f"can win ({HALF}: half the side, off below {2 * MIN_SEARCH} px; 0: off; default from the "
                        f"sweep file; see src/confirm.py)")
    p.add_argument("--search-epochs", metavar="E",
                   type=_half_or(f"phase-2 epochs up to --max-epochs, {HALF} (half of them) or 0 (all)"),
                   help=f"a trial at the search size trains phase 2 for at most E epochs; the models trained again "
                        f"at --image-size get all of them ({HALF}: half of --max-epochs, rounded up; 0: all; default "
                        f"from the sweep file; see src/fidelity.py)")
    p.add_argument("--study-name", help="Optuna study; reusing a name resumes it (default "
                                        "<sweep>-<data>-<backbone>-<size>px[-search<S>]; see src/naming.py)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (default: optuna.db in the repo)")
    p.add_argument("--experiment", help="MLflow experiment (default: the data folder's name, demo-digits for the demo)")
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
    _end_flags(p)
    return p


def _end_flags(p: argparse.ArgumentParser) -> None:
    """The flags of how a sweep ends (its winner, the models it keeps) and --estimate."""
    p.add_argument("--soup-top", type=int, default=SOUP_TOP,
                   help=f"at the end, a greedy weight-averaged soup of the K best trials competes with the best "
                        f"one on validation (0 or 1: no soup; default {SOUP_TOP})")
    p.add_argument("--ensemble-top", type=int, default=ENSEMBLE_TOP,
                   help=f"at the end, the K best models' averaged predictions compete too, and win unless the "
                        f"single or the soup leads them on validation beyond noise (McNemar p < 0.05; K times "
                        f"the inference cost; 0 or 1: no ensemble; "
                        f"default {ENSEMBLE_TOP}; see src/winner.py)")
    p.add_argument("--confirm-top", type=int, default=0, metavar="K",
                   help="after the trials, re-train the K best configurations on --confirm-folds re-drawn "
                        "train/valid splits; the best mean wins, its original trial is the model (0: off, "
                        f"the default, but {FULL_TOP} with a search size; see src/confirm.py)")
    p.add_argument("--confirm-folds", type=int, default=None, metavar="F",
                   help=f"re-drawn splits per configuration for --confirm-top (default {DEFAULT_FOLDS}; with a "
                        f"search size 0: the configurations are judged at full size on the original split)")
    p.add_argument("--full-epochs", type=int, default=FULL_EPOCHS, metavar="E",
                   help=f"with a search size, each full-size model starts from its trial's best model and "
                        f"fine-tunes at --image-size for E phase-2 epochs (0: trained again from scratch at full "
                        f"size, both phases; default {FULL_EPOCHS}; see src/confirm.py)")
    p.add_argument("--keep-checkpoints", type=int, default=0, metavar="K",
                   help="upload a trial's model (phase 2's best) only while the trial is among the K best, and "
                        "no phase-1 models: less disk (0: every model, the default)")
    p.add_argument("--estimate", action="store_true",
                   help="time a few real batches of both phases on this data and device, print the sweep's "
                        "expected and worst-case wall time and disk, and exit: no study, no run")


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that cannot be right, whatever the sweep file says: an argparse error (exit 2)."""
    if not 0 <= args.confirm_top <= MAX_TOP:
        p.error(f"--confirm-top {args.confirm_top}: give 0 (off) to {MAX_TOP} configurations")
    if args.confirm_folds is not None and args.confirm_folds < 0:
        p.error(f"--confirm-folds {args.confirm_folds}: give 0 or more re-drawn splits")
    if args.full_epochs < 0:
        p.error(f"--full-epochs {args.full_epochs}: give 0 (train again at full size) or more epochs")
    if (args.confirm_top or args.search_size not in (None, 0, HALF)) and args.no_cache:  # "half": confirm_plan
        p.error("--confirm-top and --search-size re-train on the decoded images: they cannot run with --no-cache")
    if args.soup_top < 0:
        p.error(f"--soup-top {args.soup_top}: give 0 (no soup) or more")
    if args.ensemble_top < 0:
        p.error(f"--ensemble-top {args.ensemble_top}: give 0 (no ensemble) or more")
    if args.trials < 1:
        p.error(f"--trials {args.trials}: give at least 1 (the total of finished trials the study should have)")
    if not 0 <= args.max_bad_fraction < 1:
        p.error(f"--max-bad-fraction {args.max_bad_fraction}: give a fraction from 0 to below 1, e.g. 0.01")
    if args.workers < 1:
        p.error(f"--workers {args.workers}: give at least 1")
    if args.keep_checkpoints < 0:
        p.error(f"--keep-checkpoints {args.keep_checkpoints}: give 0 (every model) or how many of the best to keep")
    if args.timeout is not None and args.timeout <= 0:
        p.error(f"--timeout {args.timeout}: give a positive number of seconds")



def run_sweep(opts: SweepOptions) -> SweepResult:
    """Start up, run the trials this study still needs, write the parent's report and close it."""
    STOP.clear()  # a stop belongs to one sweep
    started = start(opts)
    study = started.study
    done = len(T.finished(study))
    remaining = max(opts.trials - done, 0)
    log.info("study %r: %d finished, running up to %d more; tracking %s, parent run %s",
             study.study_name, done, remaining, started.tracker.uri, started.parent_id)
    status, interrupted, stopped_reason, settled = "FINISHED", False, None, False
    worker = bool(os.environ.get("TLSWEEP_WORKER"))  # a --workers child: the launcher sums up
    # What start-up built (modules, stores, caches, the starting model) lives all sweep: freeze it
    # out of the collector, so the collection that frees each trial scans only the trial's objects
    # (0.4 s a trial otherwise, with torch, MLflow and Optuna loaded).
    gc.collect()
    gc.freeze()
    try:
        if remaining:
            stopped_reason = optimize(study, Objective(started.ctx), opts.trials, opts.timeout)
        # Not after a --timeout or a stop. A --workers child takes its share of the confirmation's
        # jobs; who sums up (a lone sweep, the launcher) decides it and the winner, once.
        full = stopped_reason is None and len(T.finished(study)) >= opts.trials
        settled = (try_confirm(started, study, decide=not worker) if full else True) and not worker
    except KeyboardInterrupt:
        status, interrupted = "KILLED", True
        log.warning("interrupted: finished trials are kept; re-run the same command to continue")
        requeue_interrupted(study)  # a trial Optuna did not record yet is recovery's, on the next start
    except BaseException:
        status = "FAILED"
        raise
    finally:
        gc.unfreeze()
        with writing():  # a first Ctrl-C here only sets STOP; a second cuts the report, not the close
            try:
                update_best(started.tracker, started.parent_id, study)
                if status == "FINISHED" and settled:  # once, by who sums up, after the confirmation
                    try_winner(started, study, opts.soup_top, opts.ensemble_top)
                write_report(started, study, opts.tracking_uri, opts.storage)
            finally:
                started.tracker.finish(started.parent_id, status)
    if worker:  # the launcher prints the summary
        return result(study, started.parent_id, 0, interrupted, stopped_reason)
    spent = print_summary(started, study, opts.tracking_uri, opts.storage)
    return result(study, started.parent_id, spent, interrupted, stopped_reason)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its INFO notes on the report's category axes
    # ERROR: Optuna would log every failed trial with a traceback; the sweep prints one line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    opts = parse_args(argv)
    threads = use_my_cores()  # a --workers child: its share of the cores (src/launcher.py)
    if os.environ.get("TLSWEEP_WORKER"):
        log.info("worker %s: %d CPU thread(s)", os.environ["TLSWEEP_WORKER"], threads)
    try:
        with handling_signals():  # Ctrl-C and SIGTERM: see src/stopping.py
            if opts.estimate:
                print(estimate(opts))
                return 0
            if opts.workers > 1:
                return launch(opts, list(sys.argv[1:] if argv is None else argv))
            outcome = run_sweep(opts)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the first trial, or a second Ctrl-C while cleaning up
        print("interrupted; nothing finished was lost. Run the same command again to continue.", file=sys.stderr)
        return 130
    if outcome.interrupted:
        return 130
    if outcome.stopped_reason:
        print(f"error: sweep stopped: {outcome.stopped_reason}", file=sys.stderr)
        return 1
    if outcome.best_value is None:
        print("error: no trial completed; see optuna.fail_reason on the trial runs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
