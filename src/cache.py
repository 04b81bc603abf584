"""Entries on disk under `cache_dir()` that every trial and later sweep share, and the decode-once
image store (the phase-1 feature cache, src/features.py, keeps its entries the same way).

Images: train/valid images are decoded once per (file list, side), resized (shorter side =
side) and center-cropped to side x side, and kept as one uint8 N x side x side x 3 `.npy`
that is memory-mapped, so a 13,500-image set at 224 px never needs to sit in RAM. Training
transforms (`data.build_transform`) run on these arrays; the eval transform's resize is then
a no-op and its center crop matches the decode-every-time path.

Every entry is written atomically (src/files.py), then a small `.json` with its shape and a
CRC-32 is written last. An entry without its json, of the wrong shape, or whose CRC does not
match is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision

from . import data as D
from .files import remove_dead_temps, write_atomic, write_json_atomic

log = logging.getLogger("tlsweep")
VERSION = 1
_verified: set[str] = set()   # entries whose CRC this process already checked


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:24]


def _crc(array: np.ndarray) -> int:
    flat = array.reshape(-1).view(np.uint8)
    crc, step = 0, 1 << 26
    for start in range(0, flat.size, step):
        crc = zlib.crc32(flat[start:start + step], crc)
    return crc


def _load(path: Path, dtype, shape: tuple | None = None) -> tuple[np.ndarray, dict] | None:
    """(the entry, memory-mapped, and its json) if complete and intact (of `shape` when given);
    None (and a warning) otherwise."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(meta["shape"]) if shape is None else tuple(shape)
        array = np.load(path, mmap_mode="r")
        ok = array.shape == shape and array.dtype == np.dtype(dtype) and tuple(meta["shape"]) == shape
        if ok and str(path) not in _verified:
            ok = _crc(array) == meta["crc32"]
    except (OSError, ValueError, KeyError, EOFError):
        ok = False
    if not ok:
        log.warning("cache entry %s is corrupt or partial; rebuilding it", path)
        meta_path.unlink(missing_ok=True)
        return None
    _verified.add(str(path))
    return array, meta


def cached(path: Path, dtype, write, shape: tuple | None = None) -> tuple[np.ndarray, dict]:
    """(entry, its json) at `path` if complete and intact; else `write(tmp)` makes it under a temp
    name (and may return extra json fields), it is renamed into place, and its json is written
    last (the json marks it complete)."""
    found = _load(path, dtype, shape)
    if found is not None:
        return found
    remove_dead_temps(path.parent)
    meta = {}

    def write_entry(tmp: Path) -> None:
        extra = write(tmp) or {}
        array = np.load(tmp, mmap_mode="r")
        meta.update({"shape": list(array.shape), "dtype": str(array.dtype), "crc32": _crc(array), **extra})
        del array  # closes the map of the temp name

    write_atomic(path, write_entry)
    write_json_atomic(path.with_suffix(".json"), meta)
    _verified.add(str(path))
    return np.load(path, mmap_mode="r"), meta  # mapped under its final name, which workers reopen


@dataclass
class Decoded:
    """A split decoded once: the array (rows follow the entries), the rows that could be read,
    the files that could not (relative path -> reason), and how many were upscaled."""
    array: np.ndarray
    rows: list[int]
    bad: dict[str, str]
    upscaled: int
    upscaled_examples: list[str]


def store_decode(side: int):
    """What the image store keeps of a file: resized to `side` (shorter side), center-cropped square."""
    return D.T.Compose([D.T.ToImage(), D.T.Resize(side, antialias=True), D.T.CenterCrop(side)])


def decode_split(root: Path, entries, side: int, workers: int = 0) -> Decoded:
    """uint8 N x side x side x 3 for the entries, decoded once and memory-mapped; unreadable
    files are left as zero rows and listed (the caller decides whether there are too many)."""
    decode = store_decode(side)
    key = cache_key("images", D.content_key(root, entries), side, repr(decode), D.DECODE_VERSION,
                    torch.__version__, torchvision.__version__, PIL.__version__)
    shape = (len(entries), side, side, 3)
    write = lambda tmp: _decode_into(tmp, root, entries, decode, shape, workers)  # noqa: E731
    array, meta = cached(D.cache_dir() / "images" / f"{key}.npy", np.uint8, write, shape)
    bad = dict(meta.get("bad", {}))
    index = {rel: i for i, (rel, _) in enumerate(entries)}
    skipped = {index[rel] for rel in bad}
    return Decoded(array, [i for i in range(len(entries)) if i not in skipped], bad,
                   meta.get("upscaled", 0), meta.get("upscaled_examples", []))


def _decode_into(tmp: Path, root: Path, entries, decode, shape, workers: int) -> dict:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    side = shape[1]
    # The "label" of each item is its row, so skipped files leave their row (zeros) behind.
    # Own generator: filling a cache must not move the global RNG, or a trial's augmentation
    # would depend on whether the cache was warm.
    rows = [(rel, i) for i, (rel, _) in enumerate(entries)]
    dataset = D.ImageList(root, rows, decode, skip_bad=True, with_size=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers,
                                         generator=torch.Generator(), collate_fn=D.collate_skipping)
    bad, upscaled = {}, []
    for batch, skipped in loader:
        bad.update({b.path: b.reason for b in skipped})
        if batch is None:
            continue
        images, index, (widths, heights) = batch
        out[index.numpy()] = images.permute(0, 2, 3, 1).numpy()
        upscaled += [entries[i][0] + f" ({w}x{h})" for i, w, h in
                     zip(index.tolist(), widths.tolist(), heights.tolist()) if min(w, h) < side]
    out.flush()
    return {"bad": bad, "upscaled": len(upscaled), "upscaled_examples": upscaled[:3]}


class StoredImages(torch.utils.data.Dataset):
    """(transformed image, label) from a decoded uint8 array. With `view_seed(epoch, i)` set,
    the random transform of image i in epoch `self.epoch` is seeded, so it is reproducible."""

    def __init__(self, array: np.ndarray, labels, transform, view_seed=None, rows=None):
        # `rows`: which rows to serve (the readable ones), labels given for those rows. Views are
        # seeded by the row, as the decode-each-time path seeds them by the file's index.
        self.array, self.labels, self.transform, self.view_seed = array, list(labels), transform, view_seed
        self.rows = list(rows) if rows is not None else None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn or forkserver (Windows, macOS, Python >= 3.14 on
        # Linux) get the dataset pickled: send the file name, not gigabytes of pixels per worker.
        state = dict(self.__dict__)
        if isinstance(self.array, np.memmap) and self.array.filename:
            state["array"] = Path(self.array.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["array"], Path):
            state["array"] = np.load(state["array"], mmap_mode="r")
        self.__dict__.update(state)

    def image(self, row: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[row])).permute(2, 0, 1)  # copy: the memmap is read-only

    def __getitem__(self, i: int):
        row = i if self.rows is None else self.rows[i]
        return D.apply_transform(self.transform, self.image(row), self.view_seed, self.epoch, row), self.labels[i]


class Pooled:
    """Several decoded arrays read as one, rows of the first then of the next (no copy): the
    train + valid pool that confirmation runs re-split (src/confirm.py). Indexed like an array by
    a row, or a (row, ...) tuple."""

    def __init__(self, *arrays):
        self.arrays = list(arrays)
        self.starts = np.cumsum([0] + [len(a) for a in arrays]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key):
        row, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of a pool of {len(self)}")
        part = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.arrays[part][(row - self.starts[part], *rest)]

    def __getstate__(self) -> dict:  # spawned DataLoader workers: file names, not pixels
        return {"arrays": [Path(a.filename) if isinstance(a, np.memmap) and a.filename else a for a in self.arrays],
                "starts": self.starts}

    def __setstate__(self, state: dict) -> None:
        self.arrays = [np.load(a, mmap_mode="r") if isinstance(a, Path) else a for a in state["arrays"]]
        self.starts = state["starts"]


# -- whole frames (the frame levels) --------------------------------------------------------------
@dataclass
class Frames:
    """A split's whole frames decoded once: shorter side `side`, longer side cut evenly to at most
    MAX_ASPECT x side, kept landscape in one uint8 N x side x W x 3 array (a portrait frame
    transposed), each row's longer length and orientation beside it."""
    array: np.ndarray
    lengths: list[int]
    portrait: list[bool]
    rows: list[int]
    bad: dict[str, str]


def decode_frames(root: Path, entries, side: int, workers: int = 0) -> Frames:
    decode = D.T.Compose([D.T.ToImage(), D.T.Resize(side, antialias=True), D.CapAspect(D.MAX_ASPECT)])
    key = cache_key("frames", D.content_key(root, entries), side, repr(decode), D.DECODE_VERSION,
                    torch.__version__, torchvision.__version__, PIL.__version__)
    shape = (len(entries), side, round(D.MAX_ASPECT * side), 3)
    write = lambda tmp: _frames_into(tmp, root, entries, decode, shape, workers)  # noqa: E731
    array, meta = cached(D.cache_dir() / "frames" / f"{key}.npy", np.uint8, write, shape)
    bad = dict(meta.get("bad", {}))
    index = {rel: i for i, (rel, _) in enumerate(entries)}
    skipped = {index[rel] for rel in bad}
    return Frames(array, list(meta["lengths"]), list(meta["portrait"]),
                  [i for i in range(len(entries)) if i not in skipped], bad)


def collate_list(items):
    """(the readable items as a list, [BadImage, ...]): frames differ in size, so no stacking."""
    return [it for it in items if not isinstance(it, D.BadImage)], [it for it in items if isinstance(it, D.BadImage)]


def _frames_into(tmp: Path, root: Path, entries, decode, shape, workers: int) -> dict:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    lengths, portrait = [0] * len(entries), [False] * len(entries)
    dataset = D.ImageList(root, [(rel, i) for i, (rel, _) in enumerate(entries)], decode, skip_bad=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers,
                                         generator=torch.Generator(), collate_fn=collate_list)
    bad = {}
    for good, skipped in loader:
        bad.update({b.path: b.reason for b in skipped})
        for image, i in good:
            h, w = image.shape[-2:]
            portrait[i] = bool(h > w)
            frame = (image.transpose(-1, -2) if h > w else image).permute(1, 2, 0).numpy()  # side x length x 3
            lengths[i] = frame.shape[1]
            out[i, :, :frame.shape[1]] = frame
    out.flush()
    return {"bad": bad, "lengths": lengths, "portrait": portrait}


class StoredFrames(StoredImages):
    """(transformed frame, label) from decoded whole frames (`decode_frames`)."""

    def __init__(self, frames: Frames, labels, transform, view_seed=None):
        super().__init__(frames.array, labels, transform, view_seed, frames.rows)
        self.lengths, self.portrait = frames.lengths, frames.portrait

    def image(self, row: int) -> torch.Tensor:
        frame = torch.from_numpy(np.array(self.array[row, :, :self.lengths[row]])).permute(2, 0, 1)
        return frame.transpose(-1, -2).contiguous() if self.portrait[row] else frame


