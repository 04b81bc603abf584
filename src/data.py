"""Decode images, build transforms by augmentation strength, datasets and loaders, demo data.
Splits (finding, sealing, fingerprinting them) live in `src/splits.py`, re-exported here."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2 as T

from .config import AUG_LEVELS, FRAME_LEVELS, MAX_ASPECT
from .errors import UnreadableImages, UserError
from .files import remove_dead_temps, write_atomic
from .splits import (IMAGE_EXTS, SPLIT_FILE, SPLITS, DataError, Splits, cache_dir,  # noqa: F401
                     content_key, find_splits, fingerprint)

DECODE_VERSION = 1  # bump when load_rgb's output changes: decoded-image caches depend on it
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently gray

def load_rgb(path: Path) -> Image.Image:
    """Decode any image as 3-channel RGB: grayscale, 16-bit, palette and alpha included."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                peak = float(arr.max()) if arr.size else 0.0
                # Scale by the bit depth that holds the data (8, 12, 16 bit), never per-image contrast.
                if im.mode == "F" and peak <= 1.0:
                    top = 1.0
                elif peak <= 255:
                    top = 255.0
                else:
                    top = 2.0 ** math.ceil(math.log2(peak + 1)) - 1
                im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
            if im.mode == "P":
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA"):
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im.convert("RGBA"))
            return im.convert("RGB")
    except Exception as exc:  # PIL raises many types for a damaged file (OSError, DecompressionBombError, struct.error, ...)
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}; replace or delete the file") from exc


class CapAspect(torch.nn.Module):
    """Center-crop the longer side to at most `ratio` times the shorter (deterministic)."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, image):
        h, w = image.shape[-2:]
        cap = round(self.ratio * min(h, w))
        return T.functional.center_crop(image, [min(h, cap), min(w, cap)]) if max(h, w) > cap else image

    def __repr__(self) -> str:
        return f"CapAspect(ratio={self.ratio})"


def _scaled_shift(magnitudes, scale: float, bins: int, height: int, width: int):
    return magnitudes(bins, height, width) * scale


class ScaledTrivialAugmentWide(T.TrivialAugmentWide):
    """TrivialAugmentWide with its translations (up to 32 px) scaled by `scale`: a search-size
    model's share of the full-size model's shift, not a shift twice as large relative to its image."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale  # the only state: picklable for a loader's worker processes

    @property
    def _AUGMENTATION_SPACE(self):  # name -> (magnitudes(bins, height, width), signed), read by forward
        space = dict(T.TrivialAugmentWide._AUGMENTATION_SPACE)
        for name in ("TranslateX", "TranslateY"):
            space[name] = (functools.partial(_scaled_shift, space[name][0], self.scale), space[name][1])
        return space


def build_transform(level: str, image_size: int, mean, std, train: bool, aug_side: int | None = None) -> T.Compose:
    """Train transform for an augmentation level, or the (never augmented) eval transform.

    The levels' pixel amounts (seed's padding of 8 px, strong's translations of up to 32 px) are
    set for a model at `aug_side` px (default: `image_size`). A search-size trial passes the full
    size, so its shifts are the full-size model's scaled by image_size / aug_side, the same share
    of the image (a 64 px trial for 128 px: padding 4, translations up to 16 px; padding at least
    1 px, rounded half to even). Every other
    amount is a share of the image already, or a size-free angle or colour."""
    if level not in AUG_LEVELS:
        raise UserError(f"aug_strength {level!r} is not one of {list(AUG_LEVELS)}")
    side = stored_side(image_size)
    level = level if train else "none"
    # Every square level starts from the S x S center square (S = size / 0.875), a frame level
    # from the whole frame (shorter side S): exactly what the decode-once stores hold, so stored
    # and decoded-each-time inputs give identical tensors.
    start = ([T.Resize(side, antialias=True), CapAspect(MAX_ASPECT)] if level in FRAME_LEVELS
             else [T.Resize(side, antialias=True), T.CenterCrop(side)])
    flip = T.RandomHorizontalFlip()
    rrc = lambda lo, **kw: T.RandomResizedCrop(image_size, scale=(lo, 1.0), antialias=True, **kw)  # noqa: E731
    scale = image_size / (aug_side or image_size)
    pad = max(1, round(8 * scale))  # the full size's own amounts when scale is 1: its caches' keys are unchanged
    augment = T.TrivialAugmentWide() if scale == 1 else ScaledTrivialAugmentWide(scale)
    steps = {
        "none": [T.CenterCrop(image_size)],
        "light": [rrc(0.6), flip],
        "seed": [T.CenterCrop(image_size), flip, T.RandomCrop(image_size, padding=pad)],
        "medium": [rrc(0.35), flip, T.ColorJitter(0.2, 0.2, 0.2)],
        "strong": [rrc(0.2), flip, augment],
        "frame_light": [rrc(0.35, ratio=(3 / 4, 4 / 3)), flip],
        "frame": [rrc(0.08, ratio=(3 / 4, 4 / 3)), flip],
    }[level]
    return T.Compose([T.ToImage(), *start, *steps, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def eval_transform(config: dict) -> T.Compose:
    """The evaluation transform a checkpoint's config names: the final test's, and so the one
    every use of a scored model applies (src/served.py, src/predict.py, src/export.py)."""
    return build_transform("none", config["image_size"], config["mean"], config["std"], train=False)


def stored_side(image_size: int) -> int:
    """Side of the square every image is resized/center-cropped to before cropping to image_size."""
    return round(image_size / 0.875)


def apply_transform(transform, image, view_seed, epoch: int, i: int):
    """`transform(image)`, with its randomness seeded by `view_seed(epoch, i)` when one is given,
    so view `epoch` of image i is the same in every trial (and in the feature cache)."""
    if view_seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also reset (and leak) the CUDA/MPS RNG.
        torch.default_generator.manual_seed(view_seed(epoch, i))
        return transform(image)


@dataclass(frozen=True)
class BadImage:
    """What a dataset gives instead of an image it cannot decode (with `skip_bad`)."""
    path: str      # relative to the data root
    reason: str


class ImageList(torch.utils.data.Dataset):
    """(image tensor, label) for a list of (relative path, label) under `root`, decoded each time.
    `skip_bad`: an unreadable file gives a `BadImage` (see `collate_skipping`) instead of an error;
    `with_size`: items are (image, label, (width, height) of the file)."""

    def __init__(self, root: Path, entries, transform, view_seed=None, skip_bad: bool = False,
                 with_size: bool = False):
        self.root, self.entries, self.transform = Path(root), list(entries), transform
        self.view_seed, self.epoch, self.skip_bad, self.with_size = view_seed, 0, skip_bad, with_size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        rel, label = self.entries[i]
        try:
            image = load_rgb(self.root / rel)
        except DataError as exc:
            if not self.skip_bad:
                raise
            cause = exc.__cause__
            return BadImage(rel, f"{type(cause).__name__}: {cause}" if cause else str(exc))
        out = apply_transform(self.transform, image, self.view_seed, self.epoch, i)
        return (out, label, image.size) if self.with_size else (out, label)


def collate_skipping(items):
    """(default collate of the readable items or None, [BadImage, ...]); a module function so
    spawned DataLoader workers can unpickle it."""
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [it for it in items if isinstance(it, BadImage)]
    return (torch.utils.data.default_collate(good) if good else None), bad


class BadImageLog:
    """Unreadable images met in one split: skipped, counted and named; more than `max_fraction`
    of the split is a fault (of the trial, or of the sweep when found while decoding once)."""

    def __init__(self, split: str, total: int, max_fraction: float, error=UnreadableImages, root=None):
        self.split, self.total, self.max_fraction, self.error = split, total, max_fraction, error
        self.root = Path(root) if root is not None else None
        self.found: dict[str, str] = {}   # relative path -> why it could not be read

    def add(self, bad) -> None:
        for b in bad:
            self.found.setdefault(b.path, b.reason)
        if len(self.found) > self.max_fraction * self.total:
            raise self.error(
                f"{len(self.found)} of {self.total} {self.split} images cannot be read, more than "
                f"--max-bad-fraction {self.max_fraction:g}; e.g. {self.examples()}. Replace or delete "
                f"them, or raise --max-bad-fraction")

    def examples(self, n: int = 3) -> str:
        name = (lambda p: self.root / p) if self.root is not None else (lambda p: p)
        return "; ".join(f"{name(p)} ({why})" for p, why in list(self.found.items())[:n])


def skipped(logs: dict[str, "BadImageLog"]) -> dict[str, dict[str, str]]:
    """Split -> {relative path: reason} of the files the logs met (splits without any left out)."""
    return {name: dict(lg.found) for name, lg in logs.items() if lg.found}


class SkippingLoader:
    """Iterates a loader built with `collate_skipping`: yields the readable (images, labels)
    batches and hands the unreadable images to `log` (which raises if there are too many)."""

    def __init__(self, loader: torch.utils.data.DataLoader, log: BadImageLog):
        self.loader, self.log = loader, log
        self.dataset, self.persistent_workers = loader.dataset, loader.persistent_workers

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, bad in self.loader:
            if bad:
                self.log.add(bad)
            if batch is not None:
                yield batch


def loader(dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
           pin_memory: bool = False, generator: torch.Generator | None = None,
           collate_fn=None) -> torch.utils.data.DataLoader:
    """Shuffled, seeded (or by the `generator` given), last partial batch dropped when training
    (BatchNorm needs > 1 sample)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, generator=generator,
        drop_last=train and len(dataset) > batch_size, num_workers=num_workers,
        pin_memory=pin_memory, collate_fn=collate_fn)


def skipping_loader(root, entries, transform, batch_size: int, train: bool, log: BadImageLog,
                    seed: int = 0, num_workers: int = 0, pin_memory: bool = False,
                    view_seed=None) -> SkippingLoader:
    """A loader that decodes files each time and skips (and logs) the ones it cannot read."""
    dataset = ImageList(root, entries, transform, view_seed, skip_bad=True)
    return SkippingLoader(loader(dataset, batch_size, train, seed, num_workers, pin_memory,
                                 collate_fn=collate_skipping), log)


def demo_data_dir() -> Path:
    """scikit-learn's bundled digits (1,797 8x8 scans, 10 classes) as a flat image folder, once."""
    target = cache_dir() / "demo-digits"
    if (target / "9").is_dir():
        return target
    from sklearn.datasets import load_digits

    remove_dead_temps(target.parent, target.name)  # a writer killed mid-way left it
    digits = load_digits()

    def write(tmp: Path) -> None:
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            (tmp / str(label)).mkdir(parents=True, exist_ok=True)
            arr = (pixels / 16.0 * 255.0).round().astype(np.uint8)
            Image.fromarray(arr, "L").save(tmp / str(label) / f"{i:04d}.png")

    try:
        write_atomic(target, write)  # a crash never leaves a half-written demo folder
    except OSError:
        if not (target / "9").is_dir():  # else another process made it first
            raise
    return target
