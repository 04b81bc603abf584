"""Cached frozen forward passes with the batch norms folded into their convolutions
(`features.folded`, what a sweep runs) against the network as it is, side by side:

    python benchmarks/bench_fold.py --data ~/data/openclipart [--weights imagenet]
        [--backbone mobilenet_v2] [--sizes 64 128] [--views 3]

For each side, the product's own caches (`inputs.feature_cache` on the pipeline's decoded images
and seeded views of level `light`) are filled twice, once folded and once not, in alternating
order: phase 1's features (the whole backbone, fp32) and phase 2's prefix outputs for
`unfreeze = 1` (fp32 and bf16 autocast, where the CPU has native bf16): first one untimed view each
(the fold is made and checked, both warm up), then `--views` views in ABBA order. Prints each's seconds per
view, the relative error of folded against unfolded outputs (in bf16 also each against fp32's
unfolded outputs: bf16's own error), and
    ratio folded_vs_unfolded_<what>_<side> <x>   (seconds, <1: folding is faster)
Measured 2026-12-06 on this CPU (2 cores, AVX512-BF16), MobileNetV2 with its real weights,
clip-art, 3 views: see docs/speed.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--views", type=int, default=3)
    args = p.parse_args(argv)
    os.environ["TLSWEEP_CACHE"] = tempfile.mkdtemp(prefix="bench-fold-")  # cold, of its own, whatever is set
    from src import data as D
    from src import features as F
    from src import prefix as P
    from src.config import Fixed
    from src.device import native_bf16
    from src.inputs import feature_cache
    from src.pipeline import Pipeline

    splits = D.find_splits(args.data)
    cpu = torch.device("cpu")
    fold = F.folded
    for side in args.sizes:
        fixed = Fixed(backbone=args.backbone, weights=args.weights, image_size=side, batch_size=32,
                      max_epochs_phase1=args.views, max_epochs_phase2=args.views, seed=0)
        pipe = Pipeline(splits=splits, fixed=fixed, weights=args.weights, device=cpu, loader_workers=0)
        kinds = [("features", F.feature_extractor(pipe.base, pipe.head), None, {})]
        cut = P.cut_for(pipe.base, 1)
        halves = P.checked_split(copy.deepcopy(pipe.base), cut, side, 1) if cut else None
        if halves is not None:
            prefix = halves[0].eval().requires_grad_(False)
            how = {"dtype": P.STORED_AS, "batch_size": fixed.batch_size}
            kinds.append(("prefix_fp32", prefix, None, how))
            if native_bf16(cpu):
                kinds.append(("prefix_bf16", prefix, torch.bfloat16, how))
        references = {}
        for what, net, amp, how in kinds:
            seconds, outputs = {"folded": 0.0, "unfolded": 0.0}, {}
            caches = {arm: feature_cache(pipe, net, {**pipe.model_key(), "bench": f"{what}-{arm}"}, amp=amp, **how)
                      for arm in seconds}
            for view in range(-1, args.views):  # view -1: untimed, makes and checks the fold, warms both
                order = ("folded", "unfolded") if view % 4 in (0, 3) else ("unfolded", "folded")  # ABBA
                for arm in order:  # alternating: the machine's noise hits both
                    F.folded = fold if arm == "folded" else (lambda net: None)  # read by the cache's first pass
                    try:
                        start = time.perf_counter()
                        got = caches[arm].train_view("light", view + 1 if view >= 0 else 10_000)
                        if view >= 0:
                            seconds[arm] += time.perf_counter() - start
                    finally:
                        F.folded = fold
                    if view >= 0:
                        outputs.setdefault(arm, np.array(got[:256], dtype=np.float32))
            a, b = outputs["folded"], outputs["unfolded"]
            rel = lambda x, y: float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))  # noqa: E731
            fp32 = references.setdefault(what.split("_")[0], b)  # the first kind of each: fp32, unfolded
            against = "" if fp32 is b else f" (against fp32 unfolded: folded {rel(a, fp32):.2e}, unfolded {rel(b, fp32):.2e})"
            print(f"{side} px {what}: per view folded {seconds['folded'] / args.views:.2f} s, unfolded "
                  f"{seconds['unfolded'] / args.views:.2f} s; relative error {rel(a, b):.2e}{against}", flush=True)
            print(f"ratio folded_vs_unfolded_{what}_{side} {seconds['folded'] / max(seconds['unfolded'], 1e-9):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
