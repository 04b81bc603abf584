"""Phase-1 features computed in fp32 against bf16 autocast, paired, on a real folder and backbone:
why the cached forward passes stay fp32 (docs/speed.md).

    python benchmarks/bench_extract_precision.py --data ~/data/openclipart --weights imagenet \\
        [--backbone mobilenet_v2] [--sizes 64 128] [--epochs 15]

For each side, the product's own feature cache (`inputs.feature_cache`, the pipeline's decoded
images and seeded views of level `light`, one per epoch) is filled twice, once per precision, and
timed; then phase 1 as the product runs it (`train.fit_phase` on `features.FeatureEpochs`: the
same head init, view order and steps; AdamW 1e-3, weight decay 1e-2, label smoothing 0.1, no early
stop, the best epoch kept) fits one head per precision, scored on its validation features. Prints
per side the features' relative error, each head's valid accuracy, how often the two agree, and
    ratio bf16_vs_fp32_extract_<side> <x>   (seconds, <1: bf16 is faster)
Measured 2026-12-06 on this CPU (AVX512-BF16), MobileNetV2 with its real weights, clip-art: bf16
extraction took 0.52x / 0.48x the time at 64 / 128 px; its features are 10% off fp32's (relative
error), yet the heads fitted on them scored 0.710 against fp32's 0.693 at 64 px and 0.760 against
0.756 at 128 px (differing on 3% / 10% of the validation images): phase 1 alone does not show the
loss the whole sweeps with bf16 extraction had (docs/quality-and-cost.md, 2026-12-06). An earlier,
hand-written fit (5 views in turn, the last epoch kept) had shown bf16 1.1-1.4 points worse.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from cached_passes import parse, pipelines


def main(argv=None) -> int:
    args = parse(__doc__, argv, "epochs", 15)
    from src import features as F
    from src.inputs import feature_cache
    from src.train import fit_phase, make_optimizer

    for side, pipe in pipelines(args, args.epochs, "bench-extract-"):
        extractor = F.feature_extractor(pipe.base, pipe.head)
        y_valid = torch.as_tensor(pipe.labels("valid"))
        got = {}
        for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
            cache = feature_cache(pipe, extractor, {**pipe.model_key(), "bench_amp": name}, amp=amp)
            start = time.perf_counter()
            for view in range(args.epochs):  # every view phase 1 will read, so the fit times no extraction
                cache.train_view("light", view)
            valid = torch.from_numpy(np.array(cache.valid()))
            seconds = time.perf_counter() - start
            torch.manual_seed(0)  # the same head init for both
            head = torch.nn.Linear(valid.shape[1], len(pipe.splits.classes))
            optimizer = make_optimizer([{"params": list(head.parameters()), "lr": 1e-3, "weight_decay": 1e-2,
                                         "name": "head"}])
            result = fit_phase(head, F.FeatureEpochs(cache, "light", 32, torch.Generator().manual_seed(0)),
                               pipe._loader(torch.utils.data.TensorDataset(valid, y_valid), 64, False), optimizer,
                               max_epochs=args.epochs, patience=args.epochs, device=torch.device("cpu"),
                               label_smoothing=0.1)
            got[name] = (valid.numpy(), seconds, result)
        (a, fp32_s, fp32), (b, bf16_s, bf16) = got["fp32"], got["bf16"]
        agree = float(np.mean(np.asarray(fp32.valid_preds) == np.asarray(bf16.valid_preds)))
        print(f"{side} px: extraction ({args.epochs} views + valid) fp32 {fp32_s:.1f} s, bf16 {bf16_s:.1f} s; "
              f"valid features' relative error {np.linalg.norm(a - b) / np.linalg.norm(a):.4f}; "
              f"linear head valid acc fp32 {fp32.best_valid_acc:.4f}, bf16 {bf16.best_valid_acc:.4f}; "
              f"predictions agree on {agree:.3f}", flush=True)
        print(f"ratio bf16_vs_fp32_extract_{side} {bf16_s / fp32_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
