"""What a trial trains on: its model and loaders, built from caches the whole sweep shares.

With caches on (the default), images are decoded once per sweep (`cache.decode_split`) and
phase 1 trains the head on cached backbone features (`features.FeatureCache`). With caches off,
every epoch decodes files and runs the frozen backbone again; both paths serve the same
phase-1 views, so they give the same phase-1 metrics, up to float rounding (the cached passes fold
the batch norms, `features.folded`; tests/test_cache.py checks this).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from . import cache as C
from . import data as D
from . import features as F
from . import model as M
from .config import Fixed, TrialConfig
from .device import default_loader_workers
from .errors import DataError, UserError
from .files import remove_dead_temps
from .inputs import feature_cache, head_inputs, prefix_inputs
from .train import PhaseInputs

log = logging.getLogger("tlsweep")
DEFAULT_MAX_BAD_FRACTION = 0.01  # of a split's images that may be unreadable (skipped) before it is a fault


def initial_model(backbone: str, n_classes: int, weights: str, study_seed: int) -> nn.Module:
    """The sweep's starting model: its weights (ImageNet, a file, or random init drawn from the
    study seed, so it is shared like the cached features); built once, copied per trial."""
    torch.manual_seed(study_seed)
    return M.build_model(backbone, n_classes, weights)


@dataclass(frozen=True)
class TrialData:
    """What one trial trains on: phase 2's image loaders, what phase 1 fits (and phase 2, when not
    the images), and the log of the unreadable files it skips per split."""
    train: object
    valid: object
    phase1: PhaseInputs
    unreadable: dict[str, D.BadImageLog]
    phase2: PhaseInputs | None = None  # phase 2 on its frozen prefix's cached outputs (`prefix_inputs`)

    def skipped(self) -> dict[str, dict[str, str]]:
        """Split -> {relative path: reason} of the files this trial skipped so far."""
        return D.skipped(self.unreadable)


def decode_once(splits: D.Splits, image_size: int, workers: int, max_bad_fraction: float):
    """Decode train and valid once: (split -> `cache.Decoded`, split -> the log of its unreadable
    files). Unreadable files are skipped (too many stops the sweep: every trial would see the same
    ones), images smaller than the stored square are upscaled; both are warned of."""
    side = D.stored_side(image_size)
    decoded, logs = {}, {}
    for name in ("train", "valid"):
        entries = getattr(splits, name)
        dec = decoded[name] = C.decode_split(splits.root, entries, side, workers)
        logs[name] = D.BadImageLog(name, len(entries), max_bad_fraction, error=DataError, root=splits.root)
        if dec.bad:
            log.warning("%d of %d %s images cannot be read and are skipped, e.g. %s",
                        len(dec.bad), len(entries), name, "; ".join(list(dec.bad)[:3]))
            logs[name].add(D.BadImage(p, why) for p, why in dec.bad.items())
        if dec.upscaled:
            log.warning("%d of %d %s images are smaller than the %d px square they are resized to "
                        "(--image-size %d / 0.875) and are upscaled, e.g. %s", dec.upscaled,
                        len(entries), name, side, image_size, "; ".join(dec.upscaled_examples))
    return decoded, logs


def checked_frames(splits: D.Splits, image_size: int, workers: int, square: C.Decoded) -> C.Frames:
    """The train split's whole frames (`cache.decode_frames`); the same files as its squares."""
    frames = C.decode_frames(splits.root, splits.train, D.stored_side(image_size), workers)
    if frames.rows != square.rows:  # the same files, read twice: only if one changed in between
        raise DataError(f"the train images under {splits.root} changed while the sweep read them (unreadable "
                        f"now or before: {sorted(set(frames.bad) ^ set(square.bad))[:3]}); run the sweep again")
    return frames


class Pipeline:
    """The data and starting model every trial of a sweep shares (decoded images and cached
    features with caches on), and each trial's model copy and loaders."""

    def __init__(self, *, splits: D.Splits, fixed: Fixed, weights: str, device: torch.device,
                 loader_workers: int | None = None, use_cache: bool = True, base: nn.Module | None = None,
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, aug_side: int | None = None):
        self.splits, self.fixed, self.weights, self.device = splits, fixed, weights, device
        self.aug_side = aug_side or fixed.image_size  # a search size's full size: `data.build_transform`
        self.mean, self.std = M.norm_stats(fixed.backbone)  # the backbone's own statistics
        self.max_bad_fraction = max_bad_fraction
        self.workers = default_loader_workers(device) if loader_workers is None else loader_workers
        self.base = base if base is not None else initial_model(fixed.backbone, len(splits.classes), weights, fixed.seed)
        self.head = M.head_name(self.base)
        self.decoded, self.features, self.valid_features, self.frames = None, None, None, None
        self.prefixes: dict = {}  # (unfreeze, amp) -> phase 2's frozen prefix cache (`inputs.prefix_cache`)
        self.whole = None  # a re-split pipeline's original (`refold`)
        self.rows = {name: list(range(len(getattr(splits, name)))) for name in ("train", "valid")}
        self.decode_logs: dict[str, D.BadImageLog] = {}  # the decode pass's unreadable files (caches on)
        if use_cache:
            for folder in ("images", "frames", "features"):  # what writers killed mid-write left behind
                remove_dead_temps(D.cache_dir() / folder)
            self._decode_once()
            self.features = feature_cache(self, F.feature_extractor(self.base, self.head), self.model_key())

    def _decode_once(self) -> None:
        self.decoded, self.decode_logs = decode_once(self.splits, self.fixed.image_size, self.workers,
                                                     self.max_bad_fraction)
        self.rows = {name: dec.rows for name, dec in self.decoded.items()}

    def train_frames(self) -> C.Frames:
        """The train split's whole frames (caches on), decoded once: at start-up when the search
        offers a frame level, else the first time one asks."""
        if self.frames is None:
            self.frames = (pool_frames(self) if self.whole is not None else
                           checked_frames(self.splits, self.fixed.image_size, self.workers, self.decoded["train"]))
        return self.frames

    def labels(self, split: str) -> list[int]:
        entries = getattr(self.splits, split)
        return [entries[r][1] for r in self.rows[split]]

    def bad_images(self) -> dict[str, dict[str, str]]:
        """Split -> {relative path: reason} of the files the decode pass skipped (caches on)."""
        return D.skipped(self.decode_logs)

    def model_key(self) -> dict:
        """Everything the phase-1 features depend on (the level and view go in the entry name).
        The backbone's state identifies its weights, whatever their source."""
        state = hashlib.sha256()
        for name, tensor in self.base.state_dict().items():
            if not name.startswith(self.head + "."):
                state.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        return {"train": D.content_key(self.splits.root, self.splits.train), "train_rows": len(self.rows["train"]),
                "valid": D.content_key(self.splits.root, self.splits.valid),
                "device": self.device.type,  # GPU kernels (TF32 and the like) give other low bits
                "backbone": self.fixed.backbone, "image_size": self.fixed.image_size,
                "backbone_state": state.hexdigest()[:16],
                # the square levels (a frame level's transform goes in its entries' names instead,
                # so adding levels leaves the existing entries' key as it was)
                "transforms": {lvl: repr(self.transform(lvl)) for lvl in D.AUG_LEVELS if lvl not in D.FRAME_LEVELS},
                "versions": [torch.__version__, torchvision.__version__], "mean": self.mean, "std": self.std}

    def model(self, trial_seed: int) -> nn.Module:
        """A copy of the starting model with a fresh head drawn from the trial's own seed."""
        model = copy.deepcopy(self.base)
        torch.manual_seed(trial_seed)
        model.get_submodule(self.head).reset_parameters()
        return model

    def transform(self, level: str):
        """The train transform of a level ("none" is the evaluation transform)."""
        return D.build_transform(level, self.fixed.image_size, self.mean, self.std, train=level != "none",
                                 aug_side=self.aug_side)

    def _dataset(self, split: str, level: str, views: bool):
        """The split's images from the decoded store (cache on) or decoded each time from files."""
        transform = self.transform(level if split == "train" else "none")
        view_seed = F.view_seed_fn(self.fixed.seed, level) if views else None
        if self.decoded is not None and split == "train" and level in D.FRAME_LEVELS:
            return C.StoredFrames(self.train_frames(), self.labels(split), transform, view_seed)
        if self.decoded is not None:
            return C.StoredImages(self.decoded[split].array, self.labels(split), transform, view_seed, self.rows[split])
        return D.ImageList(self.splits.root, getattr(self.splits, split), transform, view_seed, skip_bad=True)

    def _loader(self, dataset, batch_size: int, train: bool, seed: int = 0, log: D.BadImageLog | None = None):
        pin = self.device.type == "cuda"
        if not isinstance(dataset, D.ImageList):
            return D.loader(dataset, batch_size, train, seed, self.workers, pin)
        # Files decoded each time: one that fails mid-epoch is skipped and counted for this trial.
        return D.SkippingLoader(D.loader(dataset, batch_size, train, seed, self.workers, pin,
                                         collate_fn=D.collate_skipping), log)

    def _logs(self) -> dict[str, D.BadImageLog]:
        """Where unreadable files go: the decode pass's logs (caches on), or new ones (decoding now)."""
        return self.decode_logs if self.decoded is not None else {
            name: D.BadImageLog(name, len(getattr(self.splits, name)), self.max_bad_fraction, root=self.splits.root)
            for name in ("train", "valid")}

    def valid_loader(self, batch_size: int):
        """The validation images under the evaluation transform (what every trial is judged on)."""
        return self._loader(self._dataset("valid", "none", False), batch_size, False, log=self._logs()["valid"])

    def image_loaders(self, cfg: TrialConfig, logs: dict | None = None) -> tuple:
        """Phase 2's loaders: the train images (the trial's level, views from `PHASE2_FIRST_VIEW` on,
        its seed's order), the valid ones."""
        logs, bs = logs or self._logs(), cfg.batch_size
        train = self._loader(self._dataset("train", cfg.aug_strength, True), bs, True, cfg.seed, logs["train"])
        return (F.ViewEpochs(train, first_view=F.PHASE2_FIRST_VIEW),
                self._loader(self._dataset("valid", "none", False), bs * 2, False, log=logs["valid"]))

    def loaders(self, cfg: TrialConfig, model: nn.Module, head_at: Pipeline | None = None,
                amp: torch.dtype | None = None) -> TrialData:
        """The trial's loaders, phase 1's inputs (`head_inputs`): its own, or `head_at`'s (the
        search size's cached features, src/confirm.py), and phase 2's (`prefix_inputs`, at `amp`)."""
        logs = self._logs()
        train, valid = self.image_loaders(cfg, logs)
        phase1 = head_inputs(head_at, cfg, model) if head_at is not None else head_inputs(self, cfg, model, valid, logs)
        return TrialData(train, valid, phase1, logs, prefix_inputs(self, cfg, model, amp))


# -- the train + valid pool, re-split (src/confirm.py) ---------------------------------------------
def pool(pipe: Pipeline) -> list[tuple[int, int]]:
    """(pool row, label) of every readable train and valid image: train row r is pool row r,
    valid row r is pool row len(train entries) + r."""
    n = len(pipe.splits.train)
    return ([(r, y) for r, y in zip(pipe.rows["train"], pipe.labels("train"))]
            + [(n + r, y) for r, y in zip(pipe.rows["valid"], pipe.labels("valid"))])


def refold(pipe: Pipeline, train_rows: list[int], valid_rows: list[int]) -> Pipeline:
    """The pipeline on another split of the pool (pool rows, see `pool`): the same starting
    model, decoded images (read in place, not copied or decoded again) and device; phase-1
    features of its own, cached under a key that names the rows. Needs the caches."""
    if pipe.decoded is None:
        raise UserError("re-split runs (--confirm-top) read the decoded images: drop --no-cache")
    fold = copy.copy(pipe)
    entries = pipe.splits.train + pipe.splits.valid
    fold.splits = dataclasses.replace(pipe.splits, train=entries, valid=entries)
    fold.rows = {"train": list(train_rows), "valid": list(valid_rows)}
    array = C.Pooled(pipe.decoded["train"].array, pipe.decoded["valid"].array)
    fold.decoded = {name: dataclasses.replace(pipe.decoded[name], array=array, rows=fold.rows[name], bad={})
                    for name in ("train", "valid")}
    fold.frames, fold.valid_features, fold.whole, fold.prefixes = None, None, pipe, {}
    rows = hashlib.sha256(repr((fold.rows["train"], fold.rows["valid"])).encode()).hexdigest()[:16]
    fold.features = feature_cache(fold, pipe.features.extractor, {**fold.model_key(), "rows": rows},
                                  fold_from=pipe.features)  # folded and checked once
    return fold


def resized(pipe: Pipeline, fixed: Fixed) -> Pipeline:
    """The same sweep's pipeline at other fixed settings (the full size of a search size): the
    same splits, starting model, device and loader workers; images decoded (and features cached)
    at its own size."""
    return Pipeline(splits=pipe.splits, fixed=fixed, weights=pipe.weights, device=pipe.device,
                    loader_workers=pipe.workers, use_cache=pipe.decoded is not None, base=pipe.base,
                    max_bad_fraction=pipe.max_bad_fraction)


def pool_frames(fold: Pipeline) -> C.Frames:
    """A re-split pipeline's train frames: the whole frames of train and valid, pooled."""
    whole = fold.whole
    train = whole.train_frames()
    valid = C.decode_frames(whole.splits.root, whole.splits.valid, D.stored_side(fold.fixed.image_size), fold.workers)
    if valid.rows != whole.rows["valid"]:
        raise DataError(f"the valid images under {whole.splits.root} changed while the sweep read them; "
                        f"run the sweep again")
    return C.Frames(C.Pooled(train.array, valid.array), train.lengths + valid.lengths,
                    train.portrait + valid.portrait, fold.rows["train"], {})
