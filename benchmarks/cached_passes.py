"""What the benchmarks of the cached frozen forward passes share (bench_extract_precision.py,
bench_fold.py): their command line, and the product's own pipeline per image side on a real
folder, on the CPU, with a cold cache of its own."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(doc: str, argv, count: str, default: int, more: dict | None = None) -> argparse.Namespace:
    """--data, --backbone, --weights, --sizes, `--<count>` (views or epochs per side), and a
    benchmark's own flags (`more`: flag -> add_argument's keywords)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument(f"--{count}", type=int, default=default)
    for flag, kw in (more or {}).items():
        p.add_argument(flag, **kw)
    return p.parse_args(argv)


def pipelines(args: argparse.Namespace, epochs: int, prefix: str):
    """(side, the product's `Pipeline` at that side) for each of `args.sizes`, in a fresh cache
    directory (whatever TLSWEEP_CACHE says: a warm cache would time nothing)."""
    os.environ["TLSWEEP_CACHE"] = tempfile.mkdtemp(prefix=prefix)
    from src import data as D
    from src.config import Fixed
    from src.pipeline import Pipeline

    splits = D.find_splits(args.data)
    for side in args.sizes:
        fixed = Fixed(backbone=args.backbone, weights=args.weights, image_size=side, batch_size=32,
                      max_epochs_phase1=epochs, max_epochs_phase2=epochs, seed=0)
        yield side, Pipeline(splits=splits, fixed=fixed, weights=args.weights, device=torch.device("cpu"),
                             loader_workers=0)
