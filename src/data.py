"""Find and validate splits, build transforms by augmentation strength, loaders, demo data.

Layouts accepted by `find_splits(DIR)`:
  DIR/{train, valid|val, test}/<class>/<images>   used as given;
  DIR/<class>/<images>                            split once (stratified, seeded, 70/15/15 by
                                                  default) and written to DIR/.tlsweep-split.json
                                                  (or the cache dir if DIR is read-only), which
                                                  every later run reuses, so the test set never moves.
Only file names and sizes of the test split are read here; image bytes of the test split are
read by `final_test` alone.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2 as T

from .config import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_FILE = ".tlsweep-split.json"
SPLITS = ("train", "valid", "test")
DECODE_VERSION = 1  # bump when load_rgb's output changes: decoded-image caches depend on it
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently gray

# Augmentation levels, weakest to strongest. Every level starts from the image resized (shorter
# side S = size / 0.875) and center-cropped to S x S, and ends at size x size; "none" is exactly
# the evaluation transform; "seed" is the seed recipe's flip + RandomCrop(pad 8).
AUG_LEVELS = {
    "none":   "center crop (the evaluation transform)",
    "light":  "RandomResizedCrop(scale 0.6-1) + horizontal flip",
    "seed":   "center crop, horizontal flip + RandomCrop(pad 8)",
    "medium": "RandomResizedCrop(scale 0.35-1) + flip + ColorJitter(0.2, 0.2, 0.2)",
    "strong": "RandomResizedCrop(scale 0.2-1) + flip + TrivialAugmentWide",
}


class DataError(UserError):
    """The data on disk is not usable as it is (names the path)."""


@dataclass(frozen=True)
class Splits:
    root: Path                                   # every entry path is relative to this
    layout: str                                  # "given" or "flat"
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    valid: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]            # names only: nothing but final_test opens these
    split_file: Path | None = None               # where a flat layout's split is written down
    ignored_files: int = 0                       # non-image files skipped while listing

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """Split name -> `fingerprint` of its files, computed once."""
        return {name: fingerprint(self.root, getattr(self, name)) for name in SPLITS}

    def record(self) -> dict:
        """The split written down: file lists per split plus a fingerprint of each."""
        rec = {"root": str(self.root), "layout": self.layout, "classes": list(self.classes)}
        for name in SPLITS:
            rec[name] = [[p, y] for p, y in getattr(self, name)]
            rec[f"{name}_fingerprint"] = self.fingerprints[name]
        return rec

    def summary(self) -> dict:
        counts = {name: {c: 0 for c in self.classes} for name in SPLITS}
        for name in SPLITS:
            for _, y in getattr(self, name):
                counts[name][self.classes[y]] += 1
        return {"root": str(self.root), "layout": self.layout, "n_classes": len(self.classes),
                "classes": list(self.classes), "counts": {n: len(getattr(self, n)) for n in SPLITS},
                "counts_per_class": counts, "ignored_non_image_files": self.ignored_files,
                "fingerprint": dict(self.fingerprints)}


def _hash_files(root: Path, entries, exact: bool) -> str:
    """sha256 over (relative path, label, size) per file; stats files, never opens them.
    `exact` adds the folder, modification times and the order of the entries."""
    h = hashlib.sha256(str(Path(root).resolve()).encode() if exact else b"")
    for rel, label in (entries if exact else sorted(entries)):
        st = os.stat(Path(root) / rel)
        fields = [rel, str(label), str(st.st_size)] + ([str(st.st_mtime_ns)] if exact else [])
        h.update(("\0".join(fields) + "\n").encode())
    return h.hexdigest()[:16]


def fingerprint(root: Path, entries) -> str:
    """Which files, labels and sizes a split has, in any order or folder (records, resume checks)."""
    return _hash_files(root, entries, exact=False)


def content_key(root: Path, entries) -> str:
    """Also the folder, modification times and ORDER (rows of a cached array follow it): what
    a cache of decoded pixels must depend on."""
    return _hash_files(root, entries, exact=True)


def _list_class_dir(class_dir: Path) -> tuple[list[Path], int]:
    images, ignored = [], 0
    for p in sorted(class_dir.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix.lower() in IMAGE_EXTS:
                images.append(p)
            else:
                ignored += 1
    return images, ignored


def _scan(split_dir: Path) -> tuple[dict[str, list[Path]], int]:
    """Class name -> image paths under `split_dir/<class>/`; errors name the empty dir."""
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<images>")
    found, ignored = {}, 0
    for d in class_dirs:
        images, skipped = _list_class_dir(d)
        ignored += skipped
        if not images:
            raise DataError(f"class folder {d} has no images (extensions {sorted(IMAGE_EXTS)}); "
                            f"add images or remove the folder")
        found[d.name] = images
    return found, ignored


def _given_layout(root: Path) -> Splits:
    valid_dir = root / "valid" if (root / "valid").is_dir() else root / "val"
    dirs = {"train": root / "train", "valid": valid_dir, "test": root / "test"}
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if missing:
        raise DataError(f"{root} looks like a split layout (has train/) but lacks {missing}; "
                        f"provide train/, valid/ (or val/) and test/, or a flat <class>/ layout")
    scanned, ignored = {}, 0
    for name, d in dirs.items():
        scanned[name], skipped = _scan(d)
        ignored += skipped
    names = {n: set(s) for n, s in scanned.items()}
    if not names["train"] == names["valid"] == names["test"]:
        every = names["train"] | names["valid"] | names["test"]
        diff = {n: sorted(every - names[n]) for n in SPLITS if every - names[n]}
        raise DataError(f"class sets differ across splits in {root}: missing {diff}; "
                        f"every split needs the same class folders")
    classes = tuple(sorted(names["train"]))
    lists = {n: tuple((str(p.relative_to(root)), classes.index(c))
                      for c in classes for p in scanned[n][c]) for n in SPLITS}
    return Splits(root, "given", classes, lists["train"], lists["valid"], lists["test"],
                  ignored_files=ignored)


def cache_dir() -> Path:
    """Where demo data and fallback split files live: $TLSWEEP_CACHE or ~/.cache/tlsweep."""
    return Path(os.environ.get("TLSWEEP_CACHE", Path.home() / ".cache" / "tlsweep"))


def _split_file_candidates(root: Path) -> list[Path]:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / SPLIT_FILE, cache_dir() / "splits" / f"{key}.json"]


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp name in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _stratified(found: dict[str, list[Path]], root: Path, seed: int, fractions) -> dict:
    rng = random.Random(seed)
    out = {n: [] for n in SPLITS}
    for c in sorted(found):
        rels = [str(p.relative_to(root)) for p in found[c]]
        if len(rels) < 3:
            raise DataError(f"class {c!r} in {root} has {len(rels)} image(s); a flat folder needs at "
                            f"least 3 per class to give train, valid and test one each")
        rng.shuffle(rels)
        n_valid = max(1, round(len(rels) * fractions[1]))
        n_test = max(1, round(len(rels) * fractions[2]))
        out["test"] += [[r, c] for r in rels[:n_test]]
        out["valid"] += [[r, c] for r in rels[n_test:n_test + n_valid]]
        out["train"] += [[r, c] for r in rels[n_test + n_valid:]]
    return out


def _flat_layout(root: Path, seed: int, fractions) -> Splits:
    found, ignored = _scan(root)
    existing = next((p for p in _split_file_candidates(root) if p.is_file()), None)
    if existing is None:
        lists = _stratified(found, root, seed, fractions)
        doc = {"seed": seed, "fractions": list(fractions), **lists}
        errors = []
        for target in _split_file_candidates(root):
            try:
                write_json_atomic(target, doc)
                existing = target
                break
            except OSError as exc:  # read-only data folder: fall back to the cache dir
                errors.append(f"{target}: {exc}")
        if existing is None:
            raise DataError(f"cannot record the split of {root}: {'; '.join(errors)}. Make the data folder "
                            f"writable or set TLSWEEP_CACHE to a writable folder")
    doc = json.loads(existing.read_text())
    classes = tuple(sorted({c for n in SPLITS for _, c in doc[n]}))
    gone = [r for n in SPLITS for r, _ in doc[n] if not (root / r).is_file()]
    if gone:
        raise DataError(f"{len(gone)} file(s) in the recorded split {existing} are gone, e.g. {gone[:3]}; "
                        f"restore them (the test split must not change)")
    if set(found) != set(classes):
        raise DataError(f"class folders in {root} {sorted(found)} differ from the recorded split "
                        f"{existing} {list(classes)}; restore the folders")
    lists = {n: tuple((r, classes.index(c)) for r, c in doc[n]) for n in SPLITS}
    return Splits(root, "flat", classes, lists["train"], lists["valid"], lists["test"],
                  split_file=existing, ignored_files=ignored)


def find_splits(data_dir: str | Path, seed: int = 0, fractions=(0.70, 0.15, 0.15)) -> Splits:
    """Find train/valid/test under `data_dir` (either layout); errors name the path and the fix."""
    root = Path(data_dir).expanduser().resolve()  # recorded paths must work from any directory
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; pass --data DIR with "
                        f"DIR/<class>/<images> or DIR/{{train,valid,test}}/<class>/<images>")
    if (root / "train").is_dir():
        return _given_layout(root)
    return _flat_layout(root, seed, fractions)


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
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; replace or delete the file") from exc


def build_transform(level: str, image_size: int, mean, std, train: bool) -> T.Compose:
    """Train transform for an augmentation level, or the (never augmented) eval transform."""
    if level not in AUG_LEVELS:
        raise UserError(f"aug_strength {level!r} is not one of {list(AUG_LEVELS)}")
    side = stored_side(image_size)
    # Every level starts from the S x S center square (S = size / 0.875): exactly what the
    # decode-once store holds, so stored and decoded-each-time inputs give identical tensors.
    square = [T.Resize(side, antialias=True), T.CenterCrop(side)]
    flip = T.RandomHorizontalFlip()
    rrc = lambda lo: T.RandomResizedCrop(image_size, scale=(lo, 1.0), antialias=True)  # noqa: E731
    steps = {
        "none": [T.CenterCrop(image_size)],
        "light": [rrc(0.6), flip],
        "seed": [T.CenterCrop(image_size), flip, T.RandomCrop(image_size, padding=8)],
        "medium": [rrc(0.35), flip, T.ColorJitter(0.2, 0.2, 0.2)],
        "strong": [rrc(0.2), flip, T.TrivialAugmentWide()],
    }[level if train else "none"]
    return T.Compose([T.ToImage(), *square, *steps, T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean, std)])


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


class ImageList(torch.utils.data.Dataset):
    """(image tensor, label) for a list of (relative path, label) under `root`, decoded each time."""

    def __init__(self, root: Path, entries, transform, view_seed=None):
        self.root, self.entries, self.transform = Path(root), list(entries), transform
        self.view_seed, self.epoch = view_seed, 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        rel, label = self.entries[i]
        image = load_rgb(self.root / rel)
        return apply_transform(self.transform, image, self.view_seed, self.epoch, i), label


def make_loader(root, entries, transform, batch_size: int, train: bool, seed: int = 0,
                num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A loader that decodes image files each time (see `loader` for any dataset)."""
    return loader(ImageList(root, entries, transform), batch_size, train, seed, num_workers, pin_memory)


def loader(dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
           pin_memory: bool = False, generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """Shuffled, seeded (or by the `generator` given), last partial batch dropped when training
    (BatchNorm needs > 1 sample)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, generator=generator,
        drop_last=train and len(dataset) > batch_size, num_workers=num_workers,
        pin_memory=pin_memory)


def demo_data_dir() -> Path:
    """scikit-learn's bundled digits (1,797 8x8 scans, 10 classes) as a flat image folder, once."""
    target = cache_dir() / "demo-digits"
    if (target / "9").is_dir():
        return target
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = target.with_name(f".demo-digits.{os.getpid()}.tmp")
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        (tmp / str(label)).mkdir(parents=True, exist_ok=True)
        arr = (pixels / 16.0 * 255.0).round().astype(np.uint8)
        Image.fromarray(arr, "L").save(tmp / str(label) / f"{i:04d}.png")
    try:
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written demo folder
    except OSError:
        if not (target / "9").is_dir():
            raise
    return target
