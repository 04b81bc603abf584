"""The one training engine for both phases and any fixed config; knows nothing of Optuna or MLflow.

`fit_phase` trains one phase with early stopping on validation accuracy and restores the best
state; `fit_two_phase` is the recipe: phase 1 (frozen backbone, BatchNorm in eval mode, head
only), then phase 2 from phase 1's best state (all trainable, a new optimizer with a head group
at head_lr and a backbone group at head_lr * backbone_lr_ratio). Logging and pruning come in
through `on_epoch(EpochResult)` and `on_phase_end(PhaseResult, model)`; an exception raised there
(e.g. optuna.TrialPruned) stops training and propagates.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import model as M
from .config import TrialFault

FINITE_CHECK_EVERY = 25  # batches between checks for a NaN/inf loss (each check is a host sync)


class Diverged(TrialFault):
    """The training loss became NaN or infinite: the learning rate is too high for this trial."""

    kind = "diverged"


@dataclass(frozen=True)
class EpochResult:
    phase: int
    epoch: int          # epoch within the phase, from 1
    step: int           # global epoch counter across both phases, from 1; only increases
    train_loss: float
    train_acc: float
    valid_loss: float
    valid_acc: float
    lrs: dict           # optimizer group name -> lr


@dataclass
class PhaseResult:
    phase: int
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_acc: float = -1.0
    best_valid_loss: float = float("inf")
    valid_preds: list[int] = field(default_factory=list)    # best epoch's validation predictions
    valid_targets: list[int] = field(default_factory=list)
    valid_mistakes: Mistakes | None = None                  # best epoch's, when asked for
    last_step: int = 0

    @property
    def epochs(self) -> int:
        return len(self.history)


@dataclass
class Mistakes:
    """The most confidently wrong predictions of an evaluation, most confident first: the images
    as the model saw them (N, 3, H, W, normalized), true and predicted classes, and the predicted
    class's probability."""
    images: np.ndarray
    targets: list[int]
    preds: list[int]
    confidences: list[float]

    def __len__(self) -> int:
        return len(self.targets)


class _WorstMistakes:
    """Keeps the `keep` most confident wrong predictions seen so far, on the device: no host
    sync per batch, and at most `keep` + one batch of images held."""

    def __init__(self, keep: int):
        self.keep, self.images, self.conf, self.targets, self.preds = keep, None, None, None, None

    def add(self, images, labels, logits) -> None:
        conf, preds = logits.softmax(1).max(1)
        conf = torch.where(preds != labels, conf, torch.full_like(conf, -1.0))  # right ones never win
        if len(conf) > self.keep:  # only this batch's own best candidates are copied
            top = conf.topk(self.keep).indices
            images, labels, conf, preds = images[top], labels[top], conf[top], preds[top]
        if self.images is not None:
            images, conf = torch.cat([self.images, images]), torch.cat([self.conf, conf])
            labels, preds = torch.cat([self.targets, labels]), torch.cat([self.preds, preds])
        top = conf.topk(min(self.keep, len(conf))).indices
        self.images, self.conf, self.targets, self.preds = images[top], conf[top], labels[top], preds[top]

    def result(self) -> Mistakes:
        if self.images is None:
            return Mistakes(np.zeros((0, 3, 1, 1), np.float32), [], [], [])
        wrong = (self.conf >= 0).cpu()
        return Mistakes(self.images.float().cpu()[wrong].contiguous().numpy(), self.targets.cpu()[wrong].tolist(),
                        self.preds.cpu()[wrong].tolist(), self.conf.cpu()[wrong].tolist())


@dataclass(frozen=True)
class Evaluation:
    loss: float
    acc: float
    preds: list[int]
    targets: list[int]
    mistakes: Mistakes | None = None  # when `evaluate(keep_mistakes=...)` asked for them


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively: CUDA GPUs that say so; CPUs with AVX512-BF16
    or AMX (elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation to exclude
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so guarded
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype for fine-tuning and evaluation: bf16 (no loss scaling needed) when asked, or
    with "auto" where the hardware does it natively; None means fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """Non-blocking copies (from pinned memory); image batches channels_last, the layout the
    convolution libraries are fastest in (cuDNN, and oneDNN on CPU: 1.2-1.8x for inference here)."""
    layout = torch.channels_last if images.dim() == 4 else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=layout), labels.to(device, non_blocking=True)


def evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None = None,
             keep_mistakes: int = 0) -> Evaluation:
    """Mean loss, accuracy and predictions over a loader, in eval mode, without gradients
    (under autocast to `amp` when given); with `keep_mistakes`, also that many of the most
    confidently wrong predictions with their images."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    preds, targets = [], []
    worst = _WorstMistakes(keep_mistakes) if keep_mistakes else None
    with torch.inference_mode(), _autocast(device, amp):
        for images, labels in loader:
            images, labels = to_device(images, labels, device)
            logits = model(images).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
            preds.append(logits.argmax(1))
            targets.append(labels)
            if worst is not None:
                worst.add(images, labels, logits)
    preds_t, targets_t = torch.cat(preds).cpu(), torch.cat(targets).cpu()
    n = max(len(targets_t), 1)
    return Evaluation(loss_sum.item() / n, (preds_t == targets_t).float().mean().item(),
                      preds_t.tolist(), targets_t.tolist(), worst.result() if worst is not None else None)


def train_epoch(model: nn.Module, phase: int, loader, optimizer, device,
                amp: torch.dtype | None = None) -> tuple[float, float]:
    """One pass over the training loader; returns (mean loss, accuracy)."""
    M.train_mode(model, phase)
    # Accumulate on the device: no .item() (a host sync) inside the loop.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for batch, (images, labels) in enumerate(loader, 1):
        images, labels = to_device(images, labels, device)
        with _autocast(device, amp):
            logits = model(images).float()
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if batch % FINITE_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            break  # diverged: no use finishing the epoch (the caller raises `Diverged`)
    seen = max(seen, 1)
    return loss_sum.item() / seen, correct.item() / seen


def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """Adam, fused where this torch supports it (on CPU it is 2-3x faster per step than the
    default, which matters when the step costs as much as a small batch)."""
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups)


def fit_phase(model: nn.Module, phase: int, train_loader, valid_loader, *, head_lr: float,
              backbone_lr: float, max_epochs: int, patience: int, device: torch.device,
              first_step: int = 1, on_epoch: Callable[[EpochResult], None] | None = None,
              amp: torch.dtype | None = None, keep_mistakes: int = 0) -> PhaseResult:
    """Train one phase with early stopping on validation accuracy; the best state is restored
    (with its validation predictions and, if asked, its `keep_mistakes` worst mistakes)."""
    M.set_trainable(model, phase)
    optimizer = make_optimizer(M.param_groups(model, phase, head_lr, backbone_lr))
    result = PhaseResult(phase)
    best_state, since_best = None, 0
    for epoch in range(1, max_epochs + 1):
        train_loss, train_acc = train_epoch(model, phase, train_loader, optimizer, device, amp)
        if not math.isfinite(train_loss):
            lrs = ", ".join(f"{g['name']} {g['lr']:.3g}" for g in optimizer.param_groups)
            raise Diverged(f"training loss became {train_loss} in phase {phase}, epoch {epoch} (lr {lrs}): "
                           f"the learning rate is too high for this trial")
        ev = evaluate(model, valid_loader, device, amp, keep_mistakes)
        step = first_step + epoch - 1
        record = EpochResult(phase, epoch, step, train_loss, train_acc, ev.loss, ev.acc,
                             {g["name"]: g["lr"] for g in optimizer.param_groups})
        result.history.append(record)
        result.last_step = step
        if ev.acc > result.best_valid_acc:
            result.best_epoch, result.best_valid_acc, result.best_valid_loss = epoch, ev.acc, ev.loss
            result.valid_preds, result.valid_targets, result.valid_mistakes = ev.preds, ev.targets, ev.mistakes
            best_state, since_best = copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(record)
        if since_best >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def fit_two_phase(model: nn.Module, train_loader, valid_loader, *, head_lr: float,
                  backbone_lr_ratio: float, patience: int, max_epochs_phase1: int,
                  max_epochs_phase2: int, device: torch.device, phase2_head_lr_factor: float = 1.0,
                  phase1_inputs: tuple | None = None, on_epoch=None, on_phase_end=None,
                  amp: torch.dtype | None = None, keep_mistakes: int = 0) -> tuple[PhaseResult, PhaseResult]:
    """The recipe: fit the head on a frozen backbone, then fine-tune everything.

    `phase1_inputs=(head, feature_train_loader, feature_valid_loader)` trains phase 1 on cached
    backbone features instead of images: same result, since the frozen eval-mode backbone is a
    pure function of its input, and `head` is the model's own classifier module.

    `keep_mistakes` (phase 2 only: phase 1 may see features, not images) keeps that many of the
    best epoch's most confidently wrong validation predictions with their images.

    `amp` (see `amp_dtype`) applies to phase 2 only. Phase 1 always runs in fp32: its cached
    features are fp32, so cached and recomputed phase 1 agree on every device, and a linear
    head on features costs next to nothing anyway."""
    model.to(device, memory_format=torch.channels_last)
    results = []
    step = 1
    for phase, max_epochs in ((1, max_epochs_phase1), (2, max_epochs_phase2)):
        lr = head_lr * (phase2_head_lr_factor if phase == 2 else 1.0)
        module, train_data, valid_data = model, train_loader, valid_loader
        if phase == 1 and phase1_inputs is not None:
            module, train_data, valid_data = phase1_inputs
        result = fit_phase(module, phase, train_data, valid_data, head_lr=lr,
                           backbone_lr=head_lr * backbone_lr_ratio, max_epochs=max_epochs,
                           patience=patience, device=device, first_step=step, on_epoch=on_epoch,
                           amp=amp if phase == 2 else None, keep_mistakes=keep_mistakes if phase == 2 else 0)
        if on_phase_end is not None:
            on_phase_end(result, model)
        results.append(result)
        step = result.last_step + 1
    return results[0], results[1]
