"""`--precision auto` on a CPU with native bf16: measured, not assumed.

On this project's CPU (AVX512-BF16, no AMX) bf16 autocast made resnet18's phase 2 1.7-2.0x faster,
but mobilenet_v2's 0.6-0.8x at 64 px, and efficientnet_b0's 0.6-0.85x up to 128 px
(`benchmarks/bench_precision.py`): bf16's forward is fast (1.6-2.3x for mobilenet_v2), its backward
through depthwise convolutions slow. So where the CPU could do either, `auto` times a few phase-2
steps of the sweep's own backbone, image side and batch in both (`measure`: training steps with
every stage and with the last stage trainable, plus the validation forward passes of an epoch),
once, and keeps bf16 only if it is at least `MARGIN` times faster. fp32 is the safer arithmetic, and
near 1x the steps are noisy: mobilenet_v2 at 128 px read 0.88-1.43x here over 18 runs (each pick 9
times under the old margin of 1.05x), a coin toss that moved whole sweeps' results and bought no
time (three paired study seeds of 2026-12-07: at the two where auto took bf16 the sweeps ran
0.99-1.08x as long as in fp32 and scored equal or lower; docs/quality-and-cost.md). A burst of other
work can mislead a round (at 64 px one run read bf16 at 1.10x where others read 0.60-0.80x, and its
trials then ran slower than fp32's), hence the fastest of up to ROUNDS alternating rounds (two that
each read bf16 beyond MARGIN by a factor CLEAR, on the same side, end it early: the start-up of a
sweep at two sizes spent 33 s here on six rounds). The choice is kept in
`cache_dir()/precision.json`, keyed by the CPU model, torch version, backbone, side, batch and
validation share, so every later sweep, worker and resumed study on this machine uses the same one.
GPUs with native bf16 always use it; elsewhere `auto` is fp32.
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
MARGIN = 1.25     # bf16 must be this much faster than fp32 to be picked (beyond the steps' noise near 1x)
WARMUP, STEPS = 2, 3  # steps per precision: untimed (oneDNN picks its kernels), then timed; ROUNDS times, the fastest kept
ROUNDS = 3        # alternating fp32 / bf16: a burst of other work on the machine must hit every round to mislead
CLEAR = 1.15      # ... but two rounds that each read bf16 this far from MARGIN, on the same side, decide it
MAX_BATCH = 32    # images per step (the sweep's batch up to this: smaller batches ranked them otherwise)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _images_per_s(model: torch.nn.Module, amp, side: int, batch: int, n_classes: int, train: bool) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    images = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, n_classes, (batch,))

    def step():
        with torch.set_grad_enabled(train), autocast(torch.device("cpu"), amp):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return batch * STEPS / (time.perf_counter() - start)


def measure(backbone: str, side: int, batch: int, eval_share: float = 0.5, n_classes: int = 10) -> dict:
    """Phase-2 epochs per second, as training images/s, in fp32 and bf16 on this CPU (random init):
    a training step averaged over the two ends of what `unfreeze` trains (every stage; the last
    stage only, the rest forward only), plus `eval_share` validation images (forward only) per
    training image. bf16's forward is fast here, its backward through depthwise convs slow."""
    model = M.build_model(backbone, n_classes, weights="none").to(memory_format=torch.channels_last)
    batch = max(2, min(batch, MAX_BATCH))
    speed, previous = {"fp32": 0.0, "bf16": 0.0}, 0
    for _ in range(ROUNDS):  # alternating: the machine's noise hits both
        got = {}
        for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
            seconds = 0.0
            for last in ("all", 1):
                M.unfreeze(model, last)
                M.train_mode(model)
                seconds += 0.5 / _images_per_s(model, amp, side, batch, n_classes, train=True)
            model.eval()
            seconds += eval_share / _images_per_s(model, amp, side, batch, n_classes, train=False)
            got[name] = 1 / seconds
            speed[name] = max(speed[name], got[name])
        ratio = got["bf16"] / got["fp32"]
        clear = 1 if ratio >= MARGIN * CLEAR else -1 if ratio <= MARGIN / CLEAR else 0
        if clear and clear == previous:
            break  # two clear rounds agree (mobilenet_v2 here: 0.68x at 64 px, 1.40x at 128 px)
        previous = clear
    return speed


def pick(device: torch.device, precision: str, backbone: str, side: int, batch: int,
         eval_share: float = 0.5) -> torch.dtype | None:
    """The phase-2 autocast dtype (None: fp32) for `--precision` at this backbone, side and batch;
    `eval_share`: validation images per training image (a phase-2 epoch evaluates them too)."""
    if precision != "auto":
        return amp_dtype(device, precision)
    if not native_bf16(device) or device.type != "cpu":
        return torch.bfloat16 if native_bf16(device) else None
    path = cache_dir() / "precision.json"
    eval_share = round(min(max(eval_share, 0.0), 2.0), 1)
    key = f"{cpu_model()} | torch {torch.__version__} | {backbone} | {side} px | batch {batch} | valid/train {eval_share}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        speed = measure(backbone, side, batch, eval_share)
        ratio = round(speed["bf16"] / max(speed["fp32"], 1e-9), 3)  # as kept: the pick and the read below agree
        known[key] = {**{k: round(v, 1) for k, v in speed.items()}, "bf16_vs_fp32": ratio,
                      "picked": "bf16" if ratio >= MARGIN else "fp32"}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, known)
        log.info("--precision auto: %s for %s at %d px (bf16 ran %.2fx fp32's speed on this CPU; measured once, "
                 "kept in %s)", known[key]["picked"], backbone, side, ratio, path)
    # by the kept ratio, not the kept pick: an entry measured under another MARGIN follows this one
    return torch.bfloat16 if known[key].get("bf16_vs_fp32", 0) >= MARGIN else None


def name(amp: torch.dtype | None) -> str:
    return "bf16" if amp is not None else "fp32"
