"""Phase-1 features computed in fp32 against bf16 autocast, paired, on a real folder and backbone:
why the cached forward passes stay fp32 (docs/speed.md).

    python benchmarks/bench_extract_precision.py --data ~/data/openclipart --weights imagenet \\
        [--backbone mobilenet_v2] [--sizes 64 128] [--views 5] [--epochs 15]

For each side, the product's own feature cache (`inputs.feature_cache`, the pipeline's decoded
images and seeded views of level `light`) is filled twice, once per precision, and timed; then one
linear head per precision is fitted on its features (the same init, order and steps: AdamW 1e-3,
label smoothing 0.1, the views in turn for `--epochs` epochs) and scored on the validation
features. Prints per side the features' relative error, each head's valid accuracy, how often
the two heads agree, and
    ratio bf16_vs_fp32_extract_<side> <x>   (seconds, <1: bf16 is faster)
Measured 2026-12-06 on this CPU (AVX512-BF16), MobileNetV2 with its real weights, clip-art: bf16
extraction took 0.50x the time at 64 and at 128 px, but its features are 10% off fp32's (relative
error) and the linear head fitted on them 1.4 / 1.1 points worse on validation at 64 / 128 px
(0.675 against 0.689, 0.749 against 0.760; the two heads differ on 6% / 2.5% of the images).
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--views", type=int, default=5)
    p.add_argument("--epochs", type=int, default=15)
    args = p.parse_args(argv)
    os.environ.setdefault("TLSWEEP_CACHE", tempfile.mkdtemp(prefix="bench-extract-"))  # cold, of its own
    from src import data as D
    from src import features as F
    from src.config import Fixed
    from src.inputs import feature_cache
    from src.pipeline import Pipeline

    splits = D.find_splits(args.data)
    for side in args.sizes:
        fixed = Fixed(backbone=args.backbone, weights=args.weights, image_size=side, batch_size=32,
                      max_epochs_phase1=args.epochs, max_epochs_phase2=args.epochs, seed=0)
        pipe = Pipeline(splits=splits, fixed=fixed, weights=args.weights, device=torch.device("cpu"),
                        loader_workers=0)
        extractor = F.feature_extractor(pipe.base, pipe.head)
        got = {}
        for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
            cache = feature_cache(pipe, extractor, {**pipe.model_key(), "bench_amp": name}, amp=amp)
            start = time.perf_counter()
            train = [np.asarray(cache.train_view("light", v)) for v in range(args.views)]
            got[name] = (train, np.asarray(cache.valid()), time.perf_counter() - start)
        y_train, y_valid = torch.as_tensor(pipe.labels("train")), torch.as_tensor(pipe.labels("valid"))
        heads = {name: fit_head(train, valid, y_train, y_valid, len(splits.classes), args.epochs)
                 for name, (train, valid, _) in got.items()}
        a, b = got["fp32"][1], got["bf16"][1]
        agree = (heads["fp32"][1] == heads["bf16"][1]).float().mean().item()
        print(f"{side} px: extraction ({args.views} views + valid) fp32 {got['fp32'][2]:.1f} s, bf16 "
              f"{got['bf16'][2]:.1f} s; valid features' relative error {np.linalg.norm(a - b) / np.linalg.norm(a):.4f}; "
              f"linear head valid acc fp32 {heads['fp32'][0]:.4f}, bf16 {heads['bf16'][0]:.4f}; "
              f"predictions agree on {agree:.3f}", flush=True)
        print(f"ratio bf16_vs_fp32_extract_{side} {got['bf16'][2] / got['fp32'][2]:.3f}")
    return 0


def fit_head(train: list, valid: np.ndarray, y_train, y_valid, n_classes: int, epochs: int):
    """(valid accuracy, valid predictions) of a linear head fitted on `train`'s views in turn."""
    torch.manual_seed(0)
    head = torch.nn.Linear(train[0].shape[1], n_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    order = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        x = torch.from_numpy(np.array(train[epoch % len(train)]))
        for idx in torch.randperm(len(x), generator=order).split(32):
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        pred = head(torch.as_tensor(valid)).argmax(1)
    return (pred == y_valid).float().mean().item(), pred


if __name__ == "__main__":
    sys.exit(main())
