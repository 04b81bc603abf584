"""`--workers N`: N sweep processes on this machine sharing one study."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys

from . import trials as T
from .config import SweepOptions
from .errors import UserError
from .recovery import LostTrials
from .start import start
from .study import open_study
from .summary import print_summary, try_confirm, try_soup, write_report

log = logging.getLogger("tlsweep")


def check_storage_for_workers(storage: str, workers: int) -> None:
    if workers > 1 and storage.startswith("sqlite"):
        raise UserError(f"--workers {workers} with --storage {storage}: SQLite takes one writer at a time. Use "
                        f"--storage journal:///path/to/optuna-journal.log on one machine, or PostgreSQL: --storage "
                        f"postgresql://USER@HOST/DB (python -m src.stack start prints one, and a --tracking-uri)")


def launch(opts: SweepOptions, argv: list[str]) -> int:
    """Start-up (checks, decoding, study and parent run) runs once here first, so the workers find
    everything made; then they share the trials. Returns the exit code (the workers' worst)."""
    check_storage_for_workers(opts.storage, opts.workers)
    started = start(dataclasses.replace(opts, workers=1, trials=1))  # fails fast, before any worker starts
    # Each worker in its own session: a Ctrl-C (or SIGTERM) reaches them once, forwarded from here.
    # The appended "--workers 1" wins over the user's (argparse keeps the last).
    procs = [subprocess.Popen([sys.executable, "-m", "src.sweep", *argv, "--workers", "1"],
                              env={**os.environ, "TLSWEEP_WORKER": str(i)}, start_new_session=True)
             for i in range(opts.workers)]
    log.info("started %d workers: pids %s", opts.workers, [p.pid for p in procs])
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)  # each cleans up: trial interrupted, queued again, runs closed
        for p in procs:
            p.wait()
        return 130
    study = open_study(started.study.study_name, opts.storage, started.ctx.pipeline.fixed.seed,
                       on_lost=LostTrials(started.tracker))
    # Every worker finished: the confirmation (not after a --timeout) and the soup, once for the
    # study (src/confirm.py, src/soup.py); the launcher runs the confirmation's jobs alone.
    full = len(T.finished(study)) >= opts.trials
    if not any(codes) and (not full or try_confirm(started, study, opts.confirm_top, opts.confirm_folds)):
        try_soup(started, study, opts.soup_top)
    write_report(started, study, opts.tracking_uri, opts.storage)  # each worker wrote one; this one sees them all
    print_summary(started, study, opts.tracking_uri, opts.storage)
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N: 128 + N, as a shell says
    return max(codes)
