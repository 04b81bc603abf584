"""Trials per hour with `--workers N` on this machine, side by side in one run.

    python benchmarks/bench_workers.py --data DIR [--workers 1 2] [--trials 4]

Each arm is `python -m src.sweep --workers N` on a fresh journal storage and tracking store
(no pruning, `--max-epochs` per phase), after one warm-up trial that fills the caches every arm
then reads (so no arm pays the decoding the others do not). Without `--data` it runs on generated
photos (`bench_pipeline.generate`). Prints each arm's wall time and trials per hour, then
    ratio workers<N>_vs_1_trials_per_hour <x>
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def sweep(data: Path, out: Path, name: str, trials: int, workers: int, args) -> float:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "src.sweep", "--data", str(data), "--trials", str(trials), "--workers", str(workers),
           "--backbone", args.backbone, "--weights", args.weights, "--image-size", str(args.image_size),
           "--max-epochs", str(args.max_epochs), "--no-prune", "--soup-top", "0", "--ensemble-top", "0",
           "--storage", f"journal://{out}/journal.log", "--tracking-uri", f"sqlite:///{out}/mlflow.db",
           "--study-name", name]
    start = time.time()
    with open(out / "sweep.log", "w") as log:
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{name}: the sweep failed (exit {code}); see {out / 'sweep.log'}")
    return time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    data = args.data
    if data is None:
        sys.path.insert(0, str(HERE))
        from bench_pipeline import generate
        data = generate(out / "photos")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sweep(data, out / "warmup", "warmup", 1, 1, args)  # fills the decode and feature caches
    rate = {}
    for n in args.workers:
        wall = sweep(data, out / f"workers{n}", f"workers{n}", args.trials, n, args)
        rate[n] = args.trials / wall * 3600
        print(f"--workers {n}: {args.trials} trials in {wall:.0f} s, {rate[n]:.1f} trials/hour", flush=True)
    for n in args.workers:
        if n != 1 and 1 in rate:
            print(f"ratio workers{n}_vs_1_trials_per_hour {rate[n] / rate[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
