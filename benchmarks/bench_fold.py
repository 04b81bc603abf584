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

import copy
import sys
import time

import numpy as np
import torch

from cached_passes import parse, pipelines


def main(argv=None) -> int:
    args = parse(__doc__, argv, "views", 3)
    from src import features as F
    from src import prefix as P
    from src.device import native_bf16
    from src.inputs import feature_cache

    for side, pipe in pipelines(args, args.views, "bench-fold-"):
        kinds = [("features", F.feature_extractor(pipe.base, pipe.head), None, {})]
        cut = P.cut_for(pipe.base, 1)
        halves = P.checked_split(copy.deepcopy(pipe.base), cut, side, 1) if cut else None
        if halves is not None:
            prefix = halves[0].eval().requires_grad_(False)
            how = {"dtype": P.STORED_AS, "batch_size": pipe.fixed.batch_size}
            kinds.append(("prefix_fp32", prefix, None, how))
            if native_bf16(pipe.device):
                kinds.append(("prefix_bf16", prefix, torch.bfloat16, how))
        references = {}
        for what, net, amp, how in kinds:
            seconds, outputs = {"folded": 0.0, "unfolded": 0.0}, {}
            caches = {arm: feature_cache(pipe, net, {**pipe.model_key(), "bench": f"{what}-{arm}"}, amp=amp, **how)
                      for arm in seconds}
            caches["unfolded"].fast = None  # checked, nothing folded: the network as it is
            for cache in caches.values():  # untimed: makes and checks the fold, warms both up
                cache.train_view("light", 10_000)
            for view in range(args.views):
                for arm in ("folded", "unfolded") if view % 4 in (0, 3) else ("unfolded", "folded"):  # ABBA
                    start = time.perf_counter()
                    got = caches[arm].train_view("light", view)
                    seconds[arm] += time.perf_counter() - start
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
