"""`python -m src.sweep ... --estimate`: what the sweep asked for will cost, before it starts.

It runs the sweep's own start-up checks (sweep file, flags, data, weights, device), times a few
real batches of the user's images on the device: decoding, the frozen backbone's forward (phase
1's features), phase-2 training steps and validation at the search size and the full size, and
the model's checkpoint. From those it prints the wall time and disk of the sweep asked for, and
exits: no study, no MLflow run (a flat folder's split is sealed, as the sweep would seal it).

- **Worst case**: nothing cached yet, no trial pruned, no early stop: every trial runs both
  phases' max epochs, every augmentation level's views are extracted, every trial keeps both
  phases' checkpoints (or `--keep-checkpoints K` of them).
- **Expected**: as the worst case, but pruned and early-stopped as the pruner's rule makes
  typical (`_expected_phase2_epochs`): successive halving keeps 1 in its reduction factor (4) at
  each rung; a median/percentile pruner stops that percentile of the trials after its startup
  trials at the first epoch after warm-up; a trial that is not pruned stops at EARLY_STOP of its
  max epochs. These are rules of thumb, not a promise: the worst case is the bound.
- Terms beside the measured compute: start-up (weights, precision choice, study and parent run:
  STARTUP_S), per trial (its MLflow run, figures and checkpoint upload: PER_TRIAL_S plus the
  measured checkpoint write) and the end (the winner's candidates evaluated, the report: END_S).
  Measured on this project's 2-core CPU with tiny sweeps (tests/test_estimate.py checks the
  expected figure against a real one).
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from .cache import store_decode
from . import features as F
from . import fidelity
from . import model as M
from . import precision
from . import prefix as P
from .config import FRAME_LEVELS
from .device import autocast
from .options import SweepOptions
from .start import check

EARLY_STOP = 0.7   # an unpruned trial stops early at this share of its max epochs (typical, not measured per data)
STARTUP_S = 1.5    # the study, its parent run and tracking store (beside the measured decoding)
PER_TRIAL_S = 1.0  # a trial's MLflow run, figures and confusion matrices (beside its checkpoint write)
END_S = 1.5        # the report and plots, beside the measured evaluation of the winner's candidates
FIGURES_BYTES = 400e3  # a trial's figures and confusion matrices in MLflow
STEPS = 2          # timed batches of each kind, after one warm-up batch


@dataclass
class Speed:
    """Seconds per image at one side, measured on real images."""
    side: int
    forward: float   # frozen backbone, eval, fp32 (phase 1's features)
    train: float     # a phase-2 step (whole network, the sweep's precision)
    valid: float     # a validation forward (the sweep's precision)
    features: int    # the feature width phase 1 caches
    prefix: dict     # unfreeze -> the frozen prefix's output per image phase 2 caches (src/prefix.py; 0: not cut)


def _timed(fn) -> float:
    fn()  # warm-up: allocation, oneDNN/cuDNN choices
    start = time.perf_counter()
    for _ in range(STEPS):
        fn()
    return (time.perf_counter() - start) / STEPS


def _batch(splits: D.Splits, side: int, batch: int, mean, std) -> torch.Tensor:
    transform = D.build_transform("none", side, mean, std, train=False)
    images = [transform(D.load_rgb(splits.root / rel)) for rel, _ in splits.train[:batch]]
    while len(images) < batch:
        images += images[:batch - len(images)]
    return torch.stack(images)


def prefix_sizes(model: torch.nn.Module, side: int, depths) -> dict:
    """Unfreeze depth -> numbers per image its phase 2 caches (0 where the model is not cut)."""
    sizes, model = {}, copy.deepcopy(model).cpu()
    for depth in depths:
        cut = P.cut_for(model, depth)
        halves = P.checked_split(model, cut, side) if cut else None
        with torch.no_grad():
            sizes[depth] = halves[0].eval()(torch.zeros(1, 3, side, side)).numel() if halves else 0
    return sizes


def measure(model: torch.nn.Module, backbone: str, splits: D.Splits, side: int, batch: int, device, amp,
            depths=()) -> Speed:
    """Time STEPS real batches of the frozen forward, a phase-2 step and a validation pass; the
    prefix sizes of the `depths` (unfreeze values) phase 2 may cache."""
    mean, std = M.norm_stats(backbone)
    x = _batch(splits, side, batch, mean, std).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(splits.classes), (batch,), device=device)
    body = F.feature_extractor(model, M.head_name(model))
    fast = F.folded(body)  # as the caches run it
    body = (fast if fast is not None else body).to(device, memory_format=torch.channels_last)
    with torch.no_grad():
        width = body(x[:1]).flatten(1).shape[1]
        forward = _timed(lambda: body(x)) / batch
    net = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    M.unfreeze(net, "all")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    net.train()
    train = _timed(step) / batch
    net.eval()
    with torch.no_grad(), autocast(device, amp):
        valid = _timed(lambda: net(x)) / batch
    return Speed(side, forward, train, valid, width, prefix_sizes(model, side, depths))


def decode_seconds(splits: D.Splits, side: int, n: int = 16) -> float:
    """Seconds to decode, resize and crop one image into the store (a sample of the train split)."""
    decode = store_decode(side)
    sample = splits.train[:n]
    start = time.perf_counter()
    for rel, _ in sample:
        decode(D.load_rgb(splits.root / rel))
    return (time.perf_counter() - start) / max(1, len(sample))


def _expected_phase2_epochs(prune, max_epochs: int, trials: int, pruned: bool) -> tuple[float, float]:
    """(expected phase-2 epochs per trial, expected share of trials that complete): see the docstring."""
    if not pruned or prune.pruner == "none":
        return EARLY_STOP * max_epochs, 1.0
    if prune.pruner == "halving":
        eta, rung, reach, epochs = 4, max(1, prune.warmup_epochs), 1.0, 0.0
        while rung < max_epochs:
            epochs += reach * (1 - 1 / eta) * rung
            reach, rung = reach / eta, rung * eta
        return epochs + reach * max(EARLY_STOP * max_epochs, rung / eta), reach
    share = 0.5 if prune.pruner == "median" else prune.percentile / 100
    share *= max(0, trials - prune.startup_trials) / max(1, trials)
    at = min(max_epochs, prune.warmup_epochs + 1)
    return share * at + (1 - share) * EARLY_STOP * max_epochs, 1 - share


@dataclass
class Cost:
    """Seconds (or bytes) of one term: expected and worst case."""
    what: str
    expected: float
    worst: float


def _training(p2: float, sp: Speed, ntr: int, v1: int, e2: float, extra: float) -> float:
    """One training outside the trials (a fold): its V1 phase-1 views, E2 epochs."""
    return v1 * ntr * sp.forward + e2 * p2 + extra


def costs(opts: SweepOptions, sweep, fixed, plan, n: tuple[int, int], speeds: dict, decode: float,
          save_s: float, ckpt_bytes: int) -> tuple[list[Cost], list[Cost]]:
    """(time terms, disk terms) of the sweep asked for, from the measured speeds (see the docstring)."""
    (ntr, nva), trials, (top, folds) = n, opts.trials, plan
    e1, e2, es = fixed.max_epochs_phase1, fixed.max_epochs_phase2, fidelity.searched(fixed).max_epochs_phase2
    s, f = speeds[fixed.search_size or fixed.image_size], speeds[fixed.image_size]
    levels = sweep.search["aug_strength"].choices
    touched = len(levels) * (1 - (1 - 1 / len(levels)) ** trials)
    sizes = 2 if fixed.search_size else 1
    frames = any(lvl in FRAME_LEVELS for lvl in levels) and not opts.no_cache
    p2 = {sp.side: ntr * sp.train + nva * sp.valid + (ntr + nva) * decode * opts.no_cache for sp in (s, f)}
    exp2, completes = _expected_phase2_epochs(sweep.prune, es, trials, not opts.no_prune)
    clean = fixed.phase1_views == "clean"  # phase 1 on the one un-augmented view (src/fidelity.py PHASE1_VIEWS)
    views1 = (1, 1) if clean else (touched * e1, len(levels) * e1)  # phase-1 views cached: expected, worst
    if opts.no_cache:  # the frozen backbone runs every phase-1 epoch of every trial
        p1 = (trials * EARLY_STOP * e1 * (ntr + nva) * s.forward, trials * e1 * (ntr + nva) * s.forward)
    else:  # each view once (each level's, each epoch: or the one clean view), shared by all trials
        p1 = ((views1[0] * ntr + nva) * s.forward, (views1[1] * ntr + nva) * s.forward)
    startup = STARTUP_S + (0 if opts.no_cache else (ntr + nva) * decode * sizes + ntr * decode * frames)
    keep = opts.keep_checkpoints
    saves = (1 + completes, 2) if not keep else (completes, 1)
    per = [x * p2[s.side] + PER_TRIAL_S + k * save_s for x, k in zip((exp2, es), saves)]
    # a full-size model's phase 1 fits on the search size's features, cached by its trials: ~nothing
    full = [top * (x * p2[f.side] + PER_TRIAL_S + 2 * save_s) if fixed.search_size else 0
            for x in (EARLY_STOP * e2, e2)]
    fold_sp = f if fixed.search_size else s
    redrawn = [top * folds * _training(p2[fold_sp.side], fold_sp, ntr + nva, 1 if clean else e1, x, PER_TRIAL_S)
               for x in (EARLY_STOP * e2, e2)]
    judged = (min(opts.soup_top, trials) * (opts.soup_top > 1) + opts.ensemble_top * (opts.ensemble_top > 1) + 1)
    end = END_S + judged * nva * f.valid
    time_terms = [Cost("start-up (weights, decoding once)", startup, startup),
                  Cost(f"{trials} trials at {s.side} px", trials * per[0] + p1[0], trials * per[1] + p1[1])]
    if fixed.search_size:
        time_terms.append(Cost(f"the {top} best again at {f.side} px", *full))
    if folds and top:
        time_terms.append(Cost(f"confirmation: {top} x {folds} re-drawn splits", *redrawn))
    time_terms.append(Cost("the winner's candidates, the report", end, end))
    disk = _disk(opts, fixed, (ntr, nva), speeds, views1, frames, ckpt_bytes, completes, top)
    return time_terms, disk + _prefix_disk(fixed, (ntr, nva), speeds, (touched, len(levels)), top, es) * (not opts.no_cache)


def _prefix_disk(fixed, n, speeds, levels, top, searched_epochs) -> list[Cost]:
    """Phase 2's cached frozen-prefix outputs (float16), per depth the search offers: each level's
    views of every phase-2 epoch (expected: the levels the trials likely touch, worst: all); at
    full size after a search, the `top` models' (expected: one level and depth, worst: each its own)."""
    (ntr, nva), out = n, [0.0, 0.0]
    for sp in speeds.values():
        if not sp.prefix:
            continue
        if fixed.search_size and sp.side == fixed.image_size:
            one = 2 * (fixed.max_epochs_phase2 * ntr + nva) * max(sp.prefix.values())
            out = [out[0] + one, out[1] + top * one]
            continue
        e2 = searched_epochs if fixed.search_size else fixed.max_epochs_phase2
        out = [out[i] + sum(2 * (views * e2 * ntr + nva) * size for size in sp.prefix.values())
               for i, views in enumerate(levels)]
    return [Cost("caches: phase 2's frozen-prefix outputs", *out)] if any(out) else []


def _disk(opts, fixed, n, speeds, views1, frames, ckpt_bytes, completes, top) -> list[Cost]:
    """views1: phase-1 views cached (expected, worst)."""
    (ntr, nva), trials, keep = n, opts.trials, opts.keep_checkpoints
    if keep:  # a trial keeps its model while among the K best: K + K ln(T/K) in a random order
        kept = (min(trials * completes + keep, keep * (1 + math.log(max(1.0, trials / keep)))), trials)
    else:
        kept = (trials * (1 + completes), 2 * trials)
    models = [k + 2 * top * bool(fixed.search_size) + 1 + opts.ensemble_top for k in kept]  # + full, soup, ensemble
    disk = [Cost("checkpoints and figures (MLflow artifacts)", models[0] * ckpt_bytes + trials * FIGURES_BYTES,
                 models[1] * ckpt_bytes + trials * FIGURES_BYTES)]
    if opts.no_cache:
        return disk
    cache = [0.0, 0.0]
    for sp in speeds.values():
        side = D.stored_side(sp.side)
        images = (ntr + nva) * 3 * side * side + (1.5 * ntr * 3 * side * side if frames else 0)
        full_only = fixed.search_size and sp.side == fixed.image_size  # no features: phase 1 at the search size
        for i, views in enumerate(views1):
            cache[i] += images + (0 if full_only else (views * ntr + nva) * sp.features * 4)
    disk.append(Cost(f"caches (decoded images, phase-1 features; under {D.cache_dir()})", *cache))
    return disk


def estimate(opts: SweepOptions) -> str:
    """Measure on the user's data and device, and say what the sweep will cost."""
    sweep, _, fixed, plan, splits, device, base, weights, _ = check(opts)  # what the sweep checks first
    share = len(splits.valid) / max(1, len(splits.train))
    speeds = {}
    for side in sorted({fixed.search_size or fixed.image_size, fixed.image_size}):
        amp = precision.pick(device, opts.precision, fixed.backbone, side, fixed.batch_size, share)
        depths = [u for u in getattr(sweep.search.get("unfreeze"), "choices", None) or () if u != "all"]
        speeds[side] = measure(base, fixed.backbone, splits, side, fixed.batch_size, device, amp, depths)
    decode = decode_seconds(splits, D.stored_side(fixed.image_size))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = M.save_checkpoint({"state_dict": base.state_dict()}, Path(tmp) / "m.pt")
        save_s, ckpt_bytes = time.perf_counter() - start, path.stat().st_size
    times, disk = costs(opts, sweep, fixed, plan, (len(splits.train), len(splits.valid)), speeds, decode,
                        save_s, ckpt_bytes)
    return report(opts, fixed, splits, device, weights, speeds, times, disk)


def _t(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:,.1f} h"


def _b(size: float) -> str:
    return f"{size / 1e6:,.0f} MB" if size < 1e9 else f"{size / 1e9:,.1f} GB"


def report(opts, fixed, splits, device, weights, speeds: dict, times: list[Cost], disk: list[Cost]) -> str:
    searched = (f" (trials at {fixed.search_size} px" + (f", phase 2 at most {fixed.search_epochs} epochs"
                                                         if fixed.search_epochs else "") + ")") if fixed.search_size else ""
    lines = [f"estimate: {opts.trials} trials of {fixed.backbone} ({weights} weights) at {fixed.image_size} px"
             f"{searched}, batch {fixed.batch_size}, at most {fixed.max_epochs_phase1} + {fixed.max_epochs_phase2} "
             f"epochs, on {device}",
             f"  data: {len(splits.train)} train / {len(splits.valid)} valid images, {len(splits.classes)} classes",
             "  measured on this data and device, images/s: " + "; ".join(
                 f"{sp.side} px: phase-2 training {1 / sp.train:,.0f}, validation {1 / sp.valid:,.0f}, "
                 f"frozen forward {1 / sp.forward:,.0f}" for sp in speeds.values()),
             f"  {'':44s} {'expected':>10s} {'worst case':>11s}"]
    lines += [f"  {c.what:44s} {_t(c.expected):>10s} {_t(c.worst):>11s}" for c in times]
    lines.append(f"  {'wall time':44s} {_t(sum(c.expected for c in times)):>10s} "
                 f"{_t(sum(c.worst for c in times)):>11s}")
    lines += [f"  {c.what:44s} {_b(c.expected):>10s} {_b(c.worst):>11s}" for c in disk]
    lines.append("  expected: typical pruning and early stopping; worst: none of either, nothing cached "
                 "(src/estimate.py). Nothing was started: no study, no run.")
    if opts.workers > 1:
        lines.append(f"  for one process: --workers {opts.workers} share this machine's cores or device, which "
                     f"shortens the trials' part by less than {opts.workers}x (docs/scale-out.md)")
    lines.append(f"estimate wall_s {sum(c.expected for c in times):.1f} {sum(c.worst for c in times):.1f} "
                 f"disk_bytes {sum(c.expected for c in disk):.0f} {sum(c.worst for c in disk):.0f}")
    return "\n".join(lines)
