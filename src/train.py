"""The one training engine for both phases and any fixed config; knows nothing of Optuna or MLflow.

`fit_two_phase` is the recipe, told in order: freeze the backbone, fit the head, unfreeze, fit
everything with a head lr and a lower backbone lr. `fit_phase` fits whatever the optimizer holds,
with early stopping on validation accuracy, and restores the best state. Logging and pruning come
in through `on_epoch(EpochResult)` and `on_phase_end(PhaseResult, model)`; an exception raised
there (e.g. optuna.TrialPruned) stops training and propagates.
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
from .device import autocast, to_device
from .errors import Diverged

FINITE_CHECK_EVERY = 25  # batches between checks for a NaN/inf loss (each check is a host sync)


@dataclass(frozen=True)
class EpochResult:
    phase: int
    epoch: int          # epoch within the phase, from 1
    step: int           # phase-aligned: phase-1 epoch e is e, phase-2 epoch e is max_epochs_phase1 + e
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


def evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None = None,
             keep_mistakes: int = 0) -> Evaluation:
    """Mean loss, accuracy and predictions over a loader, in eval mode, without gradients
    (under autocast to `amp` when given); with `keep_mistakes`, also that many of the most
    confidently wrong predictions with their images."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    preds, targets = [], []
    worst = _WorstMistakes(keep_mistakes) if keep_mistakes else None
    with torch.inference_mode(), autocast(device, amp):
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


def train_epoch(model: nn.Module, loader, optimizer, device, amp: torch.dtype | None = None,
                label_smoothing: float = 0.0, scheduler=None) -> tuple[float, float]:
    """One pass over the training loader; returns (mean loss, accuracy). The loss is smoothed by
    `label_smoothing` (training only: `evaluate` stays plain cross-entropy); `scheduler` steps
    after every optimizer step."""
    M.train_mode(model)
    # Accumulate on the device: no .item() (a host sync) inside the loop.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for batch, (images, labels) in enumerate(loader, 1):
        images, labels = to_device(images, labels, device)
        with autocast(device, amp):
            logits = model(images).float()
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if batch % FINITE_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            break  # diverged: no use finishing the epoch (the caller raises `Diverged`)
    seen = max(seen, 1)
    return loss_sum.item() / seen, correct.item() / seen


def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """Adam, or AdamW (decoupled decay) when a group has a `weight_decay` (`model.param_groups`);
    fused where this torch supports it (on CPU it is 2-3x faster per step than the default, which
    matters when the step costs as much as a small batch)."""
    kind = torch.optim.AdamW if any(g.get("weight_decay", 0) > 0 for g in groups) else torch.optim.Adam
    try:
        return kind(groups, fused=True)
    except (RuntimeError, TypeError):
        return kind(groups)


WARMUP_FRACTION = 0.05  # of a phase's optimizer steps: the cosine schedule's linear warmup


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps: int):
    """None for "constant"; for "cosine", each group's lr rises linearly over the first
    WARMUP_FRACTION of `steps` (at least one step) and then follows a half cosine to 0 at `steps`
    (the phase's max epochs times its batches: early stopping may end the phase before)."""
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}")
    warmup = max(1, math.ceil(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit_phase(model: nn.Module, train_loader, valid_loader, optimizer: torch.optim.Optimizer, *,
              max_epochs: int, patience: int, device: torch.device, phase: int = 1, first_step: int = 1,
              on_epoch: Callable[[EpochResult], None] | None = None, amp: torch.dtype | None = None,
              keep_mistakes: int = 0, label_smoothing: float = 0.0, lr_schedule: str = "constant") -> PhaseResult:
    """Fit what `optimizer` holds, with early stopping on validation accuracy; the best state is
    restored (with its validation predictions and, if asked, its `keep_mistakes` worst mistakes).
    `phase` and `first_step` only label the epochs (`EpochResult`); `lr_schedule` and
    `label_smoothing`: see `make_scheduler` and `train_epoch`."""
    result = PhaseResult(phase)
    best_state, since_best = None, 0
    scheduler = None if lr_schedule == "constant" else make_scheduler(
        optimizer, lr_schedule, max_epochs * max(1, len(train_loader)))
    for epoch in range(1, max_epochs + 1):
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, device, amp, label_smoothing, scheduler)
        # Weights can turn non-finite while the loss stays finite (a NaN gradient at the last step,
        # or where a weight never meets an image: oneDNN's bf16 conv backward gives garbage
        # gradients at the padding of a stride-2 conv on a 1x1 map); such a model is never kept.
        finite = torch.stack([torch.isfinite(t).all() for t in (*model.parameters(), *model.buffers())
                              if t.is_floating_point()]).all().item()
        if not math.isfinite(train_loss) or not finite:
            lrs = ", ".join(f"{g['name']} {g['lr']:.3g}" for g in optimizer.param_groups)
            why = (f"training loss became {train_loss}", "the learning rate is too high for this trial") if not \
                math.isfinite(train_loss) else ("weights became non-finite (NaN/inf)", "the learning rate is too high "
                                                "for this trial, or bf16 failed at this image size (try --precision fp32)")
            raise Diverged(f"{why[0]} in phase {phase}, epoch {epoch} (lr {lrs}): {why[1]}")
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


@dataclass(frozen=True)
class PhaseInputs:
    """What a phase fits: the model's head on cached backbone features (phase 1), the model after
    its frozen stages on their cached outputs (phase 2, src/prefix.py), or the model on images."""
    module: nn.Module
    train: object       # loader of (features or images, labels), one view per pass
    valid: object


RECIPE = ("head_lr", "backbone_lr_ratio", "patience", "max_epochs_phase1", "max_epochs_phase2",
          "phase2_head_lr_factor", "weight_decay", "label_smoothing", "lr_schedule", "unfreeze")


def recipe(cfg) -> dict:
    """`fit_two_phase`'s keyword arguments from a `config.TrialConfig` (the rest is the data's)."""
    return {name: getattr(cfg, name) for name in RECIPE}


def fit_two_phase(model: nn.Module, train_loader, valid_loader, *, head_lr: float,
                  backbone_lr_ratio: float, patience: int, max_epochs_phase1: int,
                  max_epochs_phase2: int, device: torch.device, phase2_head_lr_factor: float = 1.0,
                  weight_decay: float = 0.0, label_smoothing: float = 0.0, lr_schedule: str = "constant",
                  unfreeze: str | int = "all", phase1: PhaseInputs | None = None,
                  phase2: PhaseInputs | None = None, on_epoch=None, on_phase_end=None,
                  amp: torch.dtype | None = None, keep_mistakes: int = 0) -> tuple[PhaseResult, PhaseResult]:
    """The recipe: fit the head on a frozen backbone, then fine-tune (all of it, or its last
    `unfreeze` stages).

    Steps are phase-aligned: phase-1 epoch e is step e, phase-2 epoch e is step
    `max_epochs_phase1 + e`, whenever phase 1 stopped, so a step means the same phase and epoch
    in every trial. `phase1` and `phase2` say what each phase fits (default: the model on the
    image loaders; `phase2` must train every parameter that `unfreeze` leaves trainable).
    `amp` (see `device.amp_dtype`) and `keep_mistakes` (the best model's most confidently wrong
    validation predictions, with their images: from `valid_loader`) apply to phase 2 only: phase
    1 may see features, not images, and runs in fp32, so cached and recomputed phase 1 agree on
    every device (a linear head on features costs next to nothing anyway)."""
    model.to(device, memory_format=torch.channels_last)
    head = phase1 or PhaseInputs(model, train_loader, valid_loader)
    done = on_phase_end or (lambda result, model: None)
    fit = dict(patience=patience, device=device, on_epoch=on_epoch, label_smoothing=label_smoothing,
               lr_schedule=lr_schedule)

    # Phase 1: the backbone frozen (BatchNorm statistics too), the head alone learns.
    M.freeze_backbone(model)
    head_only = make_optimizer(M.param_groups(head.module, head_lr, weight_decay=weight_decay))
    result1 = fit_phase(head.module, head.train, head.valid, head_only, max_epochs=max_epochs_phase1,
                        phase=1, **fit)
    done(result1, model)

    # Phase 2: from phase 1's best state, the backbone (or its last stages) learns too, at a lower lr.
    M.unfreeze(model, unfreeze)
    tail = phase2 or PhaseInputs(model, train_loader, valid_loader)
    held = {id(p) for p in tail.module.parameters()}  # a suffix holds every stage that unfreeze trains
    assert all(id(p) in held for p in model.parameters() if p.requires_grad), "phase 2 leaves out trained stages"
    both = make_optimizer(M.param_groups(model, head_lr * phase2_head_lr_factor, head_lr * backbone_lr_ratio,
                                         weight_decay=weight_decay))
    on_images = tail.module is model
    result2 = fit_phase(tail.module, tail.train, tail.valid, both, max_epochs=max_epochs_phase2, phase=2,
                        first_step=max_epochs_phase1 + 1, amp=amp, keep_mistakes=keep_mistakes if on_images else 0,
                        **fit)
    if keep_mistakes and not on_images:  # the mistakes are shown as images: one pass over them
        result2.valid_mistakes = evaluate(model, valid_loader, device, amp, keep_mistakes).mistakes
    done(result2, model)
    return result1, result2
