"""`--precision auto` on a CPU with native bf16: measured, not assumed.

On this project's CPU (AVX512-BF16, no AMX) bf16 autocast made resnet18's phase 2 1.7-2.0x faster
but mobilenet_v2's 0.68x at 64 px (1.5x at 224 px) and efficientnet_b0's 0.6x up to 128 px
(`benchmarks/bench_precision.py`): depthwise convolutions are slow in oneDNN's bf16. So where
the CPU could do either, `auto` times a few phase-2 steps of the sweep's own backbone, image
side and batch in both, once, and keeps bf16 only if it is at least `MARGIN` times faster (fp32 is
the safer arithmetic). The choice is kept in `cache_dir()/precision.json`, keyed by the CPU
model, torch version, backbone, side and batch, so every later sweep, worker and resumed study on
this machine uses the same one. GPUs with native bf16 always use it; elsewhere `auto` is fp32.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch

from . import model as M
from .device import amp_dtype, autocast, native_bf16
from .files import write_json_atomic
from .splits import cache_dir

log = logging.getLogger("tlsweep")
MARGIN = 1.1      # bf16 must be this much faster than fp32 to be picked
STEPS = 2         # timed steps per precision (after one warm-up step), twice, the faster kept
MAX_BATCH = 16    # images per timed step (the ratio, not the speed, is what is kept)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _images_per_s(model: torch.nn.Module, amp, side: int, batch: int, n_classes: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    images = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, n_classes, (batch,))

    def step():
        with autocast(torch.device("cpu"), amp):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: oneDNN picks its kernels
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return batch * STEPS / (time.perf_counter() - start)


def measure(backbone: str, side: int, batch: int, n_classes: int = 10) -> dict:
    """Phase-2 images/s (every stage trainable, random init) in fp32 and bf16 on this CPU."""
    model = M.build_model(backbone, n_classes, weights="none").to(memory_format=torch.channels_last)
    M.unfreeze(model)
    M.train_mode(model)
    batch = max(2, min(batch, MAX_BATCH))
    speed = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(2):  # alternating: the machine's noise hits both
        for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
            speed[name] = max(speed[name], _images_per_s(model, amp, side, batch, n_classes))
    return speed


def pick(device: torch.device, precision: str, backbone: str, side: int, batch: int) -> torch.dtype | None:
    """The phase-2 autocast dtype (None: fp32) for `--precision` at this backbone, side and batch."""
    if precision != "auto":
        return amp_dtype(device, precision)
    if not native_bf16(device) or device.type != "cpu":
        return torch.bfloat16 if native_bf16(device) else None
    path = cache_dir() / "precision.json"
    key = f"{cpu_model()} | torch {torch.__version__} | {backbone} | {side} px | batch {batch}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        speed = measure(backbone, side, batch)
        ratio = speed["bf16"] / max(speed["fp32"], 1e-9)
        known[key] = {**{k: round(v, 1) for k, v in speed.items()}, "bf16_vs_fp32": round(ratio, 3),
                      "picked": "bf16" if ratio >= MARGIN else "fp32"}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, known)
        log.info("--precision auto: %s for %s at %d px (bf16 ran %.2fx fp32's speed on this CPU; measured once, "
                 "kept in %s)", known[key]["picked"], backbone, side, ratio, path)
    return torch.bfloat16 if known[key]["picked"] == "bf16" else None


def name(amp: torch.dtype | None) -> str:
    return "bf16" if amp is not None else "fp32"
