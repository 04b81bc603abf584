"""`--workers N`: N sweep processes on this machine sharing one study."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys

import torch

from . import trials as T
from .device import SPLIT_ENV, THREADS_ENV, cores
from .errors import UserError
from .options import SweepOptions
from .recovery import LostTrials
from .start import start
from .study import open_study
from .summary import print_summary, try_confirm, try_winner, write_report

log = logging.getLogger("tlsweep")


def check_storage_for_workers(storage: str, workers: int) -> None:
    if workers > 1 and storage.startswith("sqlite"):
        raise UserError(f"--workers {workers} with --storage {storage}: SQLite takes one writer at a time. Use "
                        f"--storage journal:///path/to/optuna-journal.log on one machine, or PostgreSQL: --storage "
                        f"postgresql://USER@HOST/DB (python -m src.stack start prints one, and a --tracking-uri)")


def worker_env(i: int, workers: int, environ: dict, cores: int, gpus: int, device: str) -> dict:
    """Worker i's environment: its number, its share of the cores (torch threads, OpenMP and MKL
    pools; an OMP_NUM_THREADS or MKL_NUM_THREADS the user set wins), and, with several GPUs and --device auto or cuda,
    one GPU of them in turn (CUDA_VISIBLE_DEVICES; one the user set wins)."""
    given = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP's "4,2": the outer level
    # the share is the launcher's (no thread count of the user's): SPLIT_ENV says of how many cores
    mine = not (given.isdigit() and int(given) > 0) and "MKL_NUM_THREADS" not in environ
    share = str(max(1, cores // workers)) if mine else given
    env = {"MKL_NUM_THREADS": share, **environ, "TLSWEEP_WORKER": str(i), THREADS_ENV: share,
           "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", share), **({SPLIT_ENV: str(cores)} if mine else {})}
    if gpus > 1 and device in ("auto", "cuda") and "CUDA_VISIBLE_DEVICES" not in environ:
        env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
    return env


def check_worker_count(workers: int, cores: int) -> None:
    if workers > cores:
        log.warning("--workers %d is more than the %d CPU core(s) this sweep may use: each worker gets one "
                    "thread and they take turns on the cores, no faster in total than --workers %d",
                    workers, cores, cores)


def launch(opts: SweepOptions, argv: list[str]) -> int:
    """Start-up (checks, decoding, study and parent run) runs once here first, so the workers find
    everything made; then they share the trials. Returns the exit code (the workers' worst)."""
    check_storage_for_workers(opts.storage, opts.workers)
    check_worker_count(opts.workers, cores())
    started = start(dataclasses.replace(opts, workers=1, trials=1))  # fails fast, before any worker starts
    gpus = torch.cuda.device_count() if started.ctx.pipeline.device.type == "cuda" else 0
    envs = [worker_env(i, opts.workers, dict(os.environ), cores(), gpus, opts.device) for i in range(opts.workers)]
    # Each worker in its own session: a Ctrl-C (or SIGTERM) reaches them once, forwarded from here.
    # The appended "--workers 1" wins over the user's (argparse keeps the last).
    procs = [subprocess.Popen([sys.executable, "-m", "src.sweep", *argv, "--workers", "1"], env=env,
                              start_new_session=True) for env in envs]
    spread = [e["CUDA_VISIBLE_DEVICES"] for e in envs if e.get("CUDA_VISIBLE_DEVICES") != os.environ.get("CUDA_VISIBLE_DEVICES")]
    log.info("started %d workers: pids %s, %s CPU thread(s) each%s", opts.workers, [p.pid for p in procs],
             envs[0][THREADS_ENV], f", on GPUs {spread}" if spread else "")
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
    # Every worker finished: the confirmation (not after a --timeout; the workers took its jobs while
    # any waited, this runs what is left) and the winner, once for the study (src/confirm.py, src/winner.py).
    full = len(T.finished(study)) >= opts.trials
    if not any(codes) and (not full or try_confirm(started, study)):
        try_winner(started, study, opts.soup_top, opts.ensemble_top)
    write_report(started, study, opts.tracking_uri, opts.storage)  # each worker wrote one; this one sees them all
    print_summary(started, study, opts.tracking_uri, opts.storage)
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N: 128 + N, as a shell says
    return max(codes)
