"""Decode-once image store and phase-1 feature cache, on disk under `cache_dir()`.

Images: train/valid images are decoded once per (file list, side), resized (shorter side =
side) and center-cropped to side x side, and kept as one uint8 N x side x side x 3 `.npy`
that is memory-mapped, so a 13,500-image set at 224 px never needs to sit in RAM. Training
transforms (`data.build_transform`) run on these arrays; the eval transform's resize is then
a no-op and its center crop matches the decode-every-time path.

Features: in phase 1 the backbone is frozen and in eval mode, so its output is a pure function
of the input. Each augmentation level has views: view e of image i is the level's transform
seeded by (study seed, level, e, i), so every trial that reaches epoch e sees the same view,
and the features of a view are computed once and shared by all trials and later sweeps.
Level "none" has a single view. Validation features are computed once.

Every entry is written to a temp name and renamed, then a small `.json` with its shape and a
CRC-32 is written last. An entry without its json, of the wrong shape, or whose CRC does not
match is rebuilt, never used.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from torch import nn

from . import data as D
from .recovery import process_alive
from .train import to_device

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


def _temp_name(path: Path) -> Path:
    """A temp name no other process picks; it names this host and process, so a later run can
    tell the leftovers of a killed writer (`remove_dead_temps`) from a live writer's file."""
    return path.with_name(f".{path.stem}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy")


def _host() -> str:
    return socket.gethostname().replace(".", "-")  # dots would split the temp name wrongly


def remove_dead_temps(folder: Path) -> int:
    """Delete temp files whose writer (a process on this host) is gone: what kill -9 leaves."""
    host, removed = _host(), 0
    for tmp in Path(folder).glob(".*.tmp.npy"):
        parts = tmp.name.split(".")
        try:
            writer_host, pid = parts[-5], int(parts[-4])
        except (IndexError, ValueError):
            continue
        if writer_host == host and not process_alive(pid):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _cached(path: Path, dtype, write, shape: tuple | None = None) -> tuple[np.ndarray, dict]:
    """(entry, its json) at `path` if complete and intact; else `write(tmp)` makes it under a temp
    name no other process can pick (and may return extra json fields), and it is renamed into
    place before its json is written last (the json marks it complete). A failed or interrupted
    write leaves no temp file behind (a killed one is removed by a later `remove_dead_temps`)."""
    found = _load(path, dtype, shape)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent)
    tmp = _temp_name(path)
    try:
        extra = write(tmp) or {}
        array = np.load(tmp, mmap_mode="r")
        meta = {"shape": list(array.shape), "dtype": str(array.dtype), "crc32": _crc(array), **extra}
        del array  # closes the map of the temp name
        _fsync(tmp)
        os.replace(tmp, path)
        D.write_json_atomic(path.with_suffix(".json"), meta)
        _verified.add(str(path))
        return np.load(path, mmap_mode="r"), meta  # mapped under its final name, which workers reopen
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@dataclass
class Decoded:
    """A split decoded once: the array (rows follow the entries), the rows that could be read,
    the files that could not (relative path -> reason), and how many were upscaled."""
    array: np.ndarray
    rows: list[int]
    bad: dict[str, str]
    upscaled: int
    upscaled_examples: list[str]


def decode_split(root: Path, entries, side: int, workers: int = 0) -> Decoded:
    """uint8 N x side x side x 3 for the entries, decoded once and memory-mapped; unreadable
    files are left as zero rows and listed (the caller decides whether there are too many)."""
    decode = D.T.Compose([D.T.ToImage(), D.T.Resize(side, antialias=True), D.T.CenterCrop(side)])
    key = cache_key("images", D.content_key(root, entries), side, repr(decode), D.DECODE_VERSION,
                    torch.__version__, torchvision.__version__, PIL.__version__)
    shape = (len(entries), side, side, 3)
    write = lambda tmp: _decode_into(tmp, root, entries, decode, shape, workers)  # noqa: E731
    array, meta = _cached(D.cache_dir() / "images" / f"{key}.npy", np.uint8, write, shape)
    bad = dict(meta.get("bad", {}))
    index = {rel: i for i, (rel, _) in enumerate(entries)}
    skipped = {index[rel] for rel in bad}
    return Decoded(array, [i for i in range(len(entries)) if i not in skipped], bad,
                   meta.get("upscaled", 0), meta.get("upscaled_examples", []))


def decoded_images(root: Path, entries, side: int, workers: int = 0) -> np.ndarray:
    return decode_split(root, entries, side, workers).array


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

    def __getitem__(self, i: int):
        row = i if self.rows is None else self.rows[i]
        image = torch.from_numpy(np.array(self.array[row])).permute(2, 0, 1)  # copy: the memmap is read-only
        return D.apply_transform(self.transform, image, self.view_seed, self.epoch, row), self.labels[i]


def _view_seed(base: int, single_view: bool, epoch: int, i: int) -> int:
    return (base + 1_000_003 * (0 if single_view else epoch) + i) % (2**63)


def view_seed_fn(study_seed: int, level: str):
    """Seed of view `epoch` of image i: shared by every trial of the same level and study seed.
    A partial of a module function, not a lambda, so spawned DataLoader workers can unpickle it."""
    base = int(cache_key("view", study_seed, level), 16) % (2**31)
    return functools.partial(_view_seed, base, level == "none")


class ViewEpochs:
    """A train loader whose k-th pass (k = 0, 1, ...) serves view k of every image: the
    uncached phase-1 path, same views as `FeatureEpochs`."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        # Workers must be re-created each pass to see the new epoch: never persistent ones.
        assert not loader.persistent_workers, "ViewEpochs needs non-persistent DataLoader workers"
        self.loader, self.epoch = loader, 0

    def __iter__(self):
        self.loader.dataset.epoch = self.epoch
        self.epoch += 1
        yield from self.loader


def feature_extractor(model: nn.Module, head: str) -> nn.Module:
    """The frozen model minus its classifier: what the head sees in phase 1."""
    import copy

    body = copy.deepcopy(model)
    parent_name, _, attr = head.rpartition(".")
    setattr(body.get_submodule(parent_name) if parent_name else body, attr, nn.Identity())
    return body.eval().requires_grad_(False)


class FeatureCache:
    """Phase-1 features of one frozen model on one decoded dataset, per (level, view)."""

    def __init__(self, extractor: nn.Module, model_key: dict, train_array: np.ndarray, train_labels,
                 valid: StoredImages, transform_for, study_seed: int, device: torch.device,
                 batch_size: int = 128, workers: int = 0, train_rows=None):
        self.extractor = extractor.to(device, memory_format=torch.channels_last)
        self.model_key, self.device = model_key, device
        # labels of `train_rows` (the readable rows; all when None)
        self.train_array, self.train_labels, self.train_rows = train_array, list(train_labels), train_rows
        self.valid_images, self.transform_for, self.study_seed = valid, transform_for, study_seed
        self.batch_size, self.workers = batch_size, workers

    def _extract(self, dataset) -> np.ndarray:
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator())  # leave the global RNG alone
        chunks = []
        # fp32 even on CUDA: a one-off cost, and features must not carry bf16 rounding.
        with torch.inference_mode():
            for images, labels in loader:
                chunks.append(self.extractor(to_device(images, labels, self.device)[0]))
        return torch.cat(chunks).float().cpu().numpy()  # one host sync, at the end

    def _entry(self, name: str, dataset) -> np.ndarray:
        path = D.cache_dir() / "features" / f"{cache_key('features', self.model_key, name)}.npy"
        return _cached(path, np.float32, lambda tmp: np.save(tmp, self._extract(dataset)))[0]

    def valid(self) -> np.ndarray:
        return self._entry("valid", self.valid_images)

    def train_view(self, level: str, epoch: int) -> np.ndarray:
        view = 0 if level == "none" else epoch
        dataset = StoredImages(self.train_array, self.train_labels, self.transform_for(level),
                               view_seed_fn(self.study_seed, level), self.train_rows)
        dataset.epoch = view
        return self._entry(f"train/{level}/view{view}/seed{self.study_seed}", dataset)


class FeatureEpochs:
    """A train loader over cached features whose k-th pass serves view k (see `ViewEpochs`)."""

    def __init__(self, cache: FeatureCache, level: str, batch_size: int, generator: torch.Generator):
        self.cache, self.level, self.batch_size, self.generator = cache, level, batch_size, generator
        self.labels = torch.as_tensor(cache.train_labels)
        self.epoch = 0

    def __iter__(self):
        features = torch.from_numpy(np.array(self.cache.train_view(self.level, self.epoch)))
        self.epoch += 1
        # One generator across epochs, drawn exactly like the image loader's: same shuffles.
        dataset = torch.utils.data.TensorDataset(features, self.labels)
        yield from D.loader(dataset, self.batch_size, train=True, generator=self.generator)
