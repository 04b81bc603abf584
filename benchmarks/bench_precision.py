"""Phase-2 training throughput (images/s) in fp32 and bf16, channels_last and not, side by side.

    python benchmarks/bench_precision.py [--device cpu|cuda] [--backbones resnet18 mobilenet_v2]
                                         [--sizes 64 128 224] [--batch-size 32] [--steps 6]

Each arm is the product's own phase-2 step (`train.train_epoch`: every stage unfrozen, the head
and backbone learning-rate groups, autocast as `--precision` sets it) on random-init weights and
random images already in memory, so only the arithmetic is timed; arms alternate within one
run (this machine is noisy). Prints each arm's images/s, then per backbone and size
    ratio bf16_vs_fp32_<backbone>_<size> <x>          (channels_last, >1: bf16 is faster)
    ratio channels_last_vs_nchw_<backbone>_<size> <x>  (fp32)
and which precision `--precision auto` picks on this device (`device.amp_dtype`). This is the
measurement behind `--precision auto` measuring (src/precision.py): on this CPU (AVX512-BF16, no AMX)
bf16 ran resnet18 1.7-2.0x as fast as fp32, but mobilenet_v2 0.68x at 64 px and efficientnet_b0 0.6x.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src import device as D  # noqa: E402
from src import model as M  # noqa: E402
from src.train import make_optimizer, train_epoch  # noqa: E402


def images_per_s(backbone: str, size: int, device: torch.device, amp, layout, args) -> float:
    torch.manual_seed(0)
    model = M.build_model(backbone, 24, weights="none").to(device, memory_format=layout)
    M.unfreeze(model)
    optimizer = make_optimizer(M.param_groups(model, 1e-4, 1e-5))
    x = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, 24, (args.batch_size,))
    if layout is torch.contiguous_format:  # to_device makes batches channels_last: keep NCHW here
        batches = [(x.to(device), y.to(device))] * args.steps

        def run(n):
            M.train_mode(model)
            for images, labels in batches[:n]:
                with D.autocast(device, amp):
                    loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    else:
        def run(n):
            train_epoch(model, [(x, y)] * n, optimizer, device, amp)
    run(2)  # warm-up: oneDNN/cuDNN pick their kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch_size * args.steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes over the arms; the best is kept")
    args = parser.parse_args(argv)
    device = D.pick_device(args.device)
    arms = {"fp32": (None, torch.channels_last), "bf16": (torch.bfloat16, torch.channels_last),
            "fp32_nchw": (None, torch.contiguous_format)}
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} steps; "
          f"--precision auto picks {'bf16' if D.amp_dtype(device, 'auto') else 'fp32'}", flush=True)
    for backbone in args.backbones:
        for size in args.sizes:
            best = {name: 0.0 for name in arms}
            for _ in range(args.repeats):
                for name, (amp, layout) in arms.items():
                    best[name] = max(best[name], images_per_s(backbone, size, device, amp, layout, args))
            print(f"{backbone} {size} px: " + ", ".join(f"{n} {v:.0f} img/s" for n, v in best.items()), flush=True)
            print(f"ratio bf16_vs_fp32_{backbone}_{size} {best['bf16'] / best['fp32']:.2f}")
            print(f"ratio channels_last_vs_nchw_{backbone}_{size} {best['fp32'] / best['fp32_nchw']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
