"""DataLoader workers on the CPU, side by side: none (the product's CPU default,
`device.default_loader_workers`) against N worker processes, on the loaders a sweep runs:

    python benchmarks/bench_loader_workers.py --data ~/data/openclipart [--weights imagenet]
        [--backbone mobilenet_v2] [--sizes 64 128] [--levels light strong] [--workers 1] [--repeats 3]

For each side and augmentation level, through the product's own pipeline and caches:
- `prefix`: one seeded view of the train images through the frozen prefix of `unfreeze = 1` (what
  a trial's phase 2 spends its cached passes on: decoding, augmenting, the frozen forward pass),
  each into a cache of its own;
- `steps`: `--steps` of the product's fine-tuning steps (`train.train_epoch`, every stage trained:
  phase 2 of `unfreeze = "all"`) on augmented train images.
First one untimed round each (warm-up), then `--repeats` rounds in ABBA order. Prints seconds per
round and
    ratio workers<N>_vs_0_<what>_<level>_<side> <x>   (seconds, > 1: the workers are slower)
Measured 2026-12-07 on this 2-core CPU (MobileNetV2, real weights, clip-art, 1 worker, 3 repeats,
two runs): 1.20-1.60x slower in every case (this version's run: 1.26-1.48x) (docs/speed.md): the worker's augmentation takes a core from the
compute's two intra-op threads, and a loader's workers start again every epoch.
"""
from __future__ import annotations

import copy
import itertools
import sys
import time

from cached_passes import parse, pipelines


def main(argv=None) -> int:
    args = parse(__doc__, argv, "repeats", 3, more={
        "--levels": {"nargs": "+", "default": ["light", "strong"]},
        "--workers": {"type": int, "default": 1},
        "--steps": {"type": int, "default": 20}})
    if args.workers < 1:
        raise SystemExit(f"--workers {args.workers}: give 1 or more (the arm timed against none)")
    from src import model as M
    from src import prefix as P
    from src.config import TrialConfig
    from src.inputs import feature_cache
    from src.train import make_optimizer, train_epoch

    arms = (0, args.workers)
    for side, pipe in pipelines(args, args.repeats + 1, "bench-loader-workers-"):
        prefix_net = P.checked_split(copy.deepcopy(pipe.base), P.cut_for(pipe.base, 1), side, 1)[0]
        prefix_net = prefix_net.eval().requires_grad_(False)
        for level in args.levels:
            caches = {}
            for w in arms:  # a cache's loader takes the pipeline's workers
                pipe.workers = w
                caches[w] = feature_cache(pipe, prefix_net, {**pipe.model_key(), "bench": f"workers{w}"},
                                          dtype=P.STORED_AS, batch_size=pipe.fixed.batch_size)
            cfg = TrialConfig.build(pipe.fixed, {"aug_strength": level, "head_lr": 1e-3, "backbone_lr_ratio": 0.1,
                                                 "patience": 3}, weights=pipe.weights, seed=1,
                                    classes=pipe.splits.classes)

            def prefix(w, view):
                caches[w].train_view(level, view)

            def steps(w, view):  # the product's phase-2 step (every stage trained) on the loader's first batches
                pipe.workers = w
                train, _ = pipe.image_loaders(cfg)
                model = pipe.model(cfg.seed).requires_grad_(True)
                train_epoch(model, itertools.islice(train.loader, args.steps),
                            make_optimizer(M.param_groups(model, 1e-3, 1e-4)), pipe.device)

            for what, run in (("prefix", prefix), ("steps", steps)):
                seconds = dict.fromkeys(arms, 0.0)
                for w in arms:  # untimed: warm-up
                    run(w, 10_000)
                for r in range(args.repeats):
                    for w in arms if r % 4 in (0, 3) else arms[::-1]:  # ABBA
                        start = time.perf_counter()
                        run(w, r)
                        seconds[w] += time.perf_counter() - start
                a, b = (seconds[w] / args.repeats for w in arms)
                print(f"{side} px {level} {what}: 0 workers {a:.2f} s, {args.workers} worker(s) {b:.2f} s", flush=True)
                print(f"ratio workers{args.workers}_vs_0_{what}_{level}_{side} {b / max(a, 1e-9):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
