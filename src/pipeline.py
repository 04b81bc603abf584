"""What a trial trains on: its model and loaders, built from caches the whole sweep shares.

With caches on (the default), images are decoded once per sweep (`cache.decoded_images`) and
phase 1 trains the head on cached backbone features (`cache.FeatureCache`). With caches off,
every epoch decodes files and runs the frozen backbone again; both paths serve the same
phase-1 views, so they give the same phase-1 metrics (tests/test_cache.py checks this).
"""
from __future__ import annotations

import copy
import hashlib
import os

import numpy as np
import torch
import torchvision
from torch import nn

from . import cache as C
from . import data as D
from . import model as M
from .config import Fixed, TrialConfig


def default_workers(device: torch.device) -> int:
    """DataLoader workers: none on CPU (compute needs the cores), most cores on a GPU box."""
    return 0 if device.type != "cuda" else max(1, min(8, (os.cpu_count() or 2) - 1))


def initial_model(backbone: str, n_classes: int, weights: str, study_seed: int) -> nn.Module:
    """The sweep's starting model: its weights (ImageNet, a file, or random init drawn from the
    study seed, so it is shared like the cached features); built once, copied per trial."""
    torch.manual_seed(study_seed)
    return M.build_model(backbone, n_classes, weights)


class Pipeline:
    def __init__(self, splits: D.Splits, fixed: Fixed, weights: str, mean, std, device: torch.device,
                 workers: int | None = None, use_cache: bool = True, base: nn.Module | None = None):
        self.splits, self.fixed, self.weights, self.mean, self.std = splits, fixed, weights, mean, std
        self.device, self.use_cache = device, use_cache
        self.workers = default_workers(device) if workers is None else workers
        self.base = base if base is not None else initial_model(fixed.backbone, len(splits.classes), weights, fixed.seed)
        self.head = M.head_name(self.base)
        self.train_labels = [y for _, y in splits.train]
        self.valid_labels = [y for _, y in splits.valid]
        self.arrays, self.features, self.valid_features = None, None, None
        if use_cache:
            side = D.stored_side(fixed.image_size)
            self.arrays = {name: C.decoded_images(splits.root, getattr(splits, name), side, self.workers)
                           for name in ("train", "valid")}
            self.features = C.FeatureCache(
                C.feature_extractor(self.base, self.head), self.model_key(),
                self.arrays["train"], self.train_labels, self._dataset("valid", "none", False),
                self.transform, fixed.seed, device, workers=self.workers)

    def model_key(self) -> dict:
        """Everything the phase-1 features depend on (the level and view go in the entry name).
        The backbone's state identifies its weights, whatever their source."""
        state = hashlib.sha256()
        for name, tensor in self.base.state_dict().items():
            if not name.startswith(self.head + "."):
                state.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        return {"train": D.content_key(self.splits.root, self.splits.train),
                "valid": D.content_key(self.splits.root, self.splits.valid),
                "device": self.device.type,  # GPU kernels (TF32 and the like) give other low bits
                "backbone": self.fixed.backbone, "image_size": self.fixed.image_size,
                "backbone_state": state.hexdigest()[:16],
                "transforms": {lvl: repr(self.transform(lvl)) for lvl in D.AUG_LEVELS},
                "versions": [torch.__version__, torchvision.__version__], "mean": self.mean, "std": self.std}

    def model(self, trial_seed: int) -> nn.Module:
        """A copy of the starting model with a fresh head drawn from the trial's own seed."""
        model = copy.deepcopy(self.base)
        torch.manual_seed(trial_seed)
        model.get_submodule(self.head).reset_parameters()
        return model

    def transform(self, level: str):
        """The train transform of a level ("none" is the evaluation transform)."""
        return D.build_transform(level, self.fixed.image_size, self.mean, self.std, train=level != "none")

    def _dataset(self, split: str, level: str, views: bool):
        entries = getattr(self.splits, split)
        transform = self.transform(level if split == "train" else "none")
        view_seed = C.view_seed_fn(self.fixed.seed, level) if views else None
        if self.arrays is not None:
            return C.StoredImages(self.arrays[split], [y for _, y in entries], transform, view_seed)
        return D.ImageList(self.splits.root, entries, transform, view_seed)

    def _loader(self, dataset, batch_size: int, train: bool, seed: int = 0):
        return D.loader(dataset, batch_size, train, seed, self.workers, self.device.type == "cuda")

    def loaders(self, cfg: TrialConfig, model: nn.Module):
        """(phase-2 train loader, valid loader, phase-1 inputs (module, train, valid))."""
        bs = cfg.batch_size
        train = self._loader(self._dataset("train", cfg.aug_strength, False), bs, True, cfg.seed)
        valid = self._loader(self._dataset("valid", "none", False), bs * 2, False)
        if self.features is None:
            views = self._loader(self._dataset("train", cfg.aug_strength, True), bs, True, cfg.seed)
            return train, valid, (model, C.ViewEpochs(views), valid)
        head = model.get_submodule(self.head)
        if self.valid_features is None:
            self.valid_features = torch.from_numpy(np.array(self.features.valid()))
        valid_features = torch.utils.data.TensorDataset(self.valid_features, torch.as_tensor(self.valid_labels))
        phase1_train = C.FeatureEpochs(self.features, cfg.aug_strength, bs, torch.Generator().manual_seed(cfg.seed))
        return train, valid, (head, phase1_train, self._loader(valid_features, bs * 2, False))
