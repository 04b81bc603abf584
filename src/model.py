"""Build backbone + head, resolve pretrained weights, freeze/unfreeze, parameter groups.

The head is the backbone's last `nn.Linear` (resnet `fc`, mobilenet/efficientnet
`classifier[-1]`), replaced by a fresh `Linear(features, n_classes)`; everything else is
"backbone". Weights: "imagenet" loads the torchvision enum's file through torch.hub's cache
($TORCH_HOME/hub/checkpoints/<file>), a path loads a local state dict, "none" is random init.
"""
from __future__ import annotations

import math
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from .errors import UserError
from .files import write_atomic

SUPPORTED = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")
DOWNLOAD_TIMEOUT_S = 30


class WeightsUnavailable(UserError):
    """ImageNet weights are neither cached nor downloadable."""


# Families whose torchvision models are plain CNNs with one Linear classifier and any input size.
# Left out: googlenet/inception (extra outputs in train mode), vit/swin/maxvit (fixed input
# size), squeezenet/alexnet/vgg (no single final Linear on pooled features, or huge heads).
FAMILIES = ("resnet", "resnext", "wide_resnet", "mobilenet", "efficientnet", "regnet", "convnext",
            "densenet", "shufflenet", "mnasnet")


def check_backbone(name: str) -> None:
    if name not in list_models(module=__import__("torchvision").models):
        raise UserError(f"unknown backbone {name!r}; use a torchvision classification model, "
                        f"e.g. one of {list(SUPPORTED)}")
    if not name.startswith(FAMILIES):
        raise UserError(f"backbone {name!r} is not supported (extra outputs in training or a fixed "
                        f"input size); use a model of the families {list(FAMILIES)}")


def norm_stats(backbone: str) -> tuple[list[float], list[float]]:
    """The mean/std the backbone's pretrained weights expect (its own transforms say)."""
    preset = get_model_weights(backbone).DEFAULT.transforms()
    return list(preset.mean), list(preset.std)


def expected_cache_file(backbone: str) -> Path:
    url = get_model_weights(backbone).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _imagenet_state(backbone: str) -> dict:
    weights = get_model_weights(backbone).DEFAULT
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # never hang on a network that drops packets
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # network errors, and torch.load's many ways to reject a bad file
        cache = expected_cache_file(backbone)
        if cache.is_file():
            raise WeightsUnavailable(
                f"cached ImageNet file {cache} for {backbone} cannot be loaded ({exc}); it is damaged: "
                f"delete it and copy {weights.url} there again, or pass --weights PATH") from exc
        raise WeightsUnavailable(
            f"ImageNet weights for {backbone} are not cached and could not be downloaded ({exc}).\n"
            f"  Fix 1: copy {weights.url} to {cache} (TORCH_HOME={cache.parents[2]}).\n"
            f"  Fix 2: pass --weights PATH with a local state dict of {backbone}.\n"
            f"  (--weights none trains from random init, which is much worse.)") from exc
    finally:
        socket.setdefaulttimeout(old)


def _file_state(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file; pass a state dict saved with "
                        f"torch.save(model.state_dict(), PATH), 'imagenet' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise UserError(f"--weights {path} is not a loadable state dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier: the last nn.Linear in the module tree."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Linear classifier to replace")
    return names[-1]


def _load_backbone_state(model: nn.Module, state: dict, source: str) -> None:
    """Load all but the classifier (its size is the source's class count, not ours)."""
    head = head_name(model) + "."
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = [k for k in own if not k.startswith(head) and k not in body]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and body[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"weights from {source} do not fit this backbone: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}; pick the matching --backbone")
    model.load_state_dict(body, strict=False)


def build_model(backbone: str, n_classes: int, weights: str = "imagenet") -> nn.Module:
    """Backbone with the requested weights and a fresh `Linear(features, n_classes)` head."""
    check_backbone(backbone)
    model = get_model(backbone, weights=None)
    if weights == "imagenet":
        _load_backbone_state(model, _imagenet_state(backbone), f"the {backbone} ImageNet file")
    elif weights != "none":
        _load_backbone_state(model, _file_state(Path(weights).expanduser()), weights)
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old: nn.Linear = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, n_classes))
    return model


def head_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule(head_name(model)).parameters())


def backbone_params(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_params(model)}
    return [p for p in model.parameters() if id(p) not in head]


def freeze_backbone(model: nn.Module) -> None:
    """Only the head learns: the backbone's parameters stop requiring grad (and `train_mode`
    keeps it in eval mode, so its BatchNorm statistics stay put too)."""
    for p in backbone_params(model):
        p.requires_grad_(False)
    for p in head_params(model):
        p.requires_grad_(True)


def stages(model: nn.Module, probe_px: int = 128) -> list[list[str]]:
    """The backbone's natural stages, earliest first: runs of consecutive blocks (modules with
    parameters, in forward order) whose output has the same resolution. A block is a child module
    whose own children all work at one resolution (ResNet's `layer3`, MobileNetV2's
    `features.7`); a container spanning several is opened. So ResNet: stem, layer1..layer4 (5);
    MobileNetV2 and EfficientNet: 5 (at 1/2, 1/4, 1/8, 1/16, 1/32 of the input); ConvNeXt: 4."""
    heights: dict[str, int] = {}

    def seen(name: str):
        def hook(module, args, out) -> None:  # returns None: the output passes unchanged
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                heights.setdefault(name, out.shape[-2])
        return hook

    hooks = [m.register_forward_hook(seen(name)) for name, m in model.named_modules() if name]
    was_training, p = model.training, next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, probe_px, probe_px, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    def blocks(prefix: str, module: nn.Module) -> list[str]:
        out = []
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full not in heights:
                continue  # no spatial output: the classifier and what flattens into it
            inner = {heights[f"{full}.{n}"] for n, _ in child.named_children() if f"{full}.{n}" in heights}
            out += blocks(f"{full}.", child) if len(inner) > 1 else [full]
        return out

    runs: list[list[str]] = []
    for name in blocks("", model):
        if not any(True for _ in model.get_submodule(name).parameters()):
            continue  # activations and pooling: nothing to freeze
        if runs and heights[runs[-1][-1]] == heights[name]:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


def unfreeze(model: nn.Module, last: str | int = "all") -> None:
    """Everything learns ("all"), or all but the backbone's first stages (`stages`): the last
    `last` stages, what follows them (e.g. a projection before the classifier) and the head. The
    earlier stages stay frozen, and `train_mode` keeps them in eval mode (BatchNorm, dropout)."""
    model.requires_grad_(True)
    if last == "all":
        return
    found = stages(model)
    if not 1 <= int(last) <= len(found):
        raise UserError(f"unfreeze = {last!r}: {type(model).__name__} has {len(found)} stages; "
                        f"use \"all\" or a number from 1 to {len(found)}")
    for name in (n for stage in found[:len(found) - int(last)] for n in stage):
        model.get_submodule(name).requires_grad_(False)


def train_mode(model: nn.Module) -> None:
    """Train mode for what learns. A frozen backbone stays in eval mode as a whole: BatchNorm
    running stats are not parameters, so requires_grad=False alone would let them drift, and its
    dropout is off too. With only its last stages unfrozen, every module whose parameters are all
    frozen (the earlier stages, with their BatchNorm and stochastic depth) stays in eval mode."""
    if any(p.requires_grad for p in backbone_params(model)):
        model.train()
        for module in model.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
        return
    model.eval()
    model.get_submodule(head_name(model)).train()


def param_groups(model: nn.Module, head_lr: float, backbone_lr: float = 0.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of what learns: the head at `head_lr`, and the backbone at its own lr
    once (some of) it is unfrozen (a frozen backbone has no group). With `weight_decay`, each
    group is split: decay on weights, none on biases and norm layers' weights (the parameters of
    one dimension), as is usual for AdamW."""
    named = [("head", head_params(model), head_lr),
             ("backbone", [p for p in backbone_params(model) if p.requires_grad], backbone_lr)]
    groups = []
    for name, params, lr in named:
        if not params:
            continue
        if weight_decay <= 0:
            groups.append({"params": params, "lr": lr, "name": name})
            continue
        decay, plain = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
        groups += [{"params": ps, "lr": lr, "name": name, "weight_decay": wd}
                   for ps, wd in ((decay, weight_decay), (plain, 0.0)) if ps]
    return groups


def make_checkpoint(model: nn.Module, config: dict, phase: int, epoch: int, valid_acc: float) -> dict:
    """A checkpoint carries its own config, so `model_from_checkpoint` needs nothing else."""
    return {"format": 1, "config": config, "phase": phase, "epoch": epoch, "valid_acc": valid_acc,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_checkpoint(checkpoint: dict, path: Path) -> Path:
    """Written atomically: a crash never leaves a file that loads as valid."""
    return write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's dict (weights only, no pickled code); a damaged one is a UserError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"config", "state_dict"} - set(ckpt)
        if missing:
            raise KeyError(f"no {sorted(missing)}")
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be loaded ({exc}); it is damaged or not ours") from exc
    return ckpt


class Ensemble(nn.Module):
    """Members whose class probabilities are averaged. It returns the log of that mean, so argmax,
    cross-entropy (the NLL of the mean probability) and softmax (the mean probabilities themselves)
    work as on one model's logits. Its state dict holds `members.<i>.<member's key>`."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([m(x).float().log_softmax(1) for m in self.members])
        return torch.logsumexp(logp, 0) - math.log(len(self.members))


def model_from_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the model (random init, then the saved state) and return it with its config; an
    ensemble's config says how many members (`ensemble_size`, all of the config's backbone)."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    build = lambda: build_model(config["backbone"], len(config["classes"]), weights="none")  # noqa: E731
    model = Ensemble([build() for _ in range(config["ensemble_size"])]) if config.get("ensemble_size") else build()
    model.load_state_dict(ckpt["state_dict"])
    return model, config
