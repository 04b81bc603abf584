"""The feature caches: what a frozen network makes of each training view, on disk (phase 1's
backbone features; phase 2's frozen-prefix outputs, src/prefix.py, from view PHASE2_FIRST_VIEW on).

In phase 1 the backbone is frozen and in eval mode, so its output is a pure function of the
input. Each augmentation level has views: view e of image i is the level's transform seeded by
(study seed, level, e, i), so every trial that reaches epoch e sees the same view, and the
features of a view are computed once and shared by all trials and later sweeps. Level "none"
has a single view. Validation features are computed once. Entries are kept like every cache
entry (src/cache.py: atomic, with a json holding shape and CRC-32 written last). The passes run
the network with its batch norms folded into its convolutions (`folded`): the same function up
to float rounding, faster.
"""
from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from . import data as D
from .cache import StoredImages, cache_key, cached
from .device import autocast, to_device


log = logging.getLogger("tlsweep")
_WARNED: set[str] = set()  # entries whose clipping was said once per process
PHASE2_FIRST_VIEW = 10_000  # phase-2 epoch e serves view PHASE2_FIRST_VIEW + e: other draws than phase 1's
FOLD_TOLERANCE = 1e-4  # relative error a folded copy may show on two images in fp32 (folding itself: ~1e-6)
UNCHECKED = object()  # a `FeatureCache.fast` not yet made: its first pass makes and checks it


def _view_seed(base: int, single_view: bool, epoch: int, i: int) -> int:
    return (base + 1_000_003 * (0 if single_view else epoch) + i) % (2**63)


def view_seed_fn(study_seed: int, level: str):
    """Seed of view `epoch` of image i: shared by every trial of the same level and study seed.
    A partial of a module function, not a lambda, so spawned DataLoader workers can unpickle it."""
    base = int(cache_key("view", study_seed, level), 16) % (2**31)
    return functools.partial(_view_seed, base, level == "none")


class ViewEpochs:
    """A train loader whose k-th pass (k = 0, 1, ...) serves view `first_view` + k of every
    image: the image path of both phases, the same views as `FeatureEpochs`."""

    def __init__(self, loader: torch.utils.data.DataLoader, first_view: int = 0):
        # Workers must be re-created each pass to see the new epoch: never persistent ones.
        assert not loader.persistent_workers, "ViewEpochs needs non-persistent DataLoader workers"
        self.loader, self.epoch = loader, first_view

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.dataset.epoch = self.epoch
        self.epoch += 1
        yield from self.loader


def feature_extractor(model: nn.Module, head: str) -> nn.Module:
    """The frozen model minus its classifier: what the head sees in phase 1."""
    body = copy.deepcopy(model)
    parent_name, _, attr = head.rpartition(".")
    setattr(body.get_submodule(parent_name) if parent_name else body, attr, nn.Identity())
    return body.eval().requires_grad_(False)


def folded(net: nn.Module) -> nn.Module | None:
    """A copy of frozen, eval-mode `net` with each batch norm folded into the convolution (or linear
    layer) before it (torch.fx's `fuse`, re-tracing through torchvision's blocks, so their eval-mode
    behaviour is baked in: the copy only ever runs frozen): the same function up to float rounding
    (relative error ~1e-6 in fp32), without the batch norms' own memory-bound pass. For MobileNetV2
    on this CPU a cached view takes 0.56-0.91x the time (`benchmarks/bench_fold.py`). What every
    cached frozen forward pass runs (phase 1's features, phase 2's prefix outputs; `FeatureCache`
    checks it on its first batch). Made on the CPU, outside inference mode. None where `net` cannot
    be traced."""
    try:
        with torch.inference_mode(False):
            return fuse(copy.deepcopy(net).cpu(), inplace=True).eval().requires_grad_(False)
    except Exception as exc:  # fx cannot trace some models (data-dependent control flow): run them as they are
        log.debug("%s cannot be traced to fold its batch norms (%s: %s): run unfolded", type(net).__name__,
                  type(exc).__name__, exc)
        return None


class FeatureCache:
    """Phase-1 features of one frozen model on one decoded dataset, per (level, view)."""

    def __init__(self, extractor: nn.Module, model_key: dict, train_views, train_labels,
                 valid: StoredImages, study_seed: int, device: torch.device,
                 batch_size: int = 128, workers: int = 0, level_tags: dict | None = None, dtype=np.float32,
                 amp: torch.dtype | None = None, fold_from: FeatureCache | None = None):
        # train_views(level): the train images under the level's transform with seeded views;
        # train_labels: theirs; level_tags: extra entry-name parts of levels outside `model_key`;
        # dtype: how entries are stored, amp: the autocast they are computed in (phase 2's prefix
        # outputs: float16, in the phase's own precision; phase 1's features: float32, in fp32);
        # fold_from: a cache of the same extractor whose folded copy this one shares
        self.extractor = extractor.to(device, memory_format=torch.channels_last)
        # `extractor` folded (None: run as it is), made and checked by the first `_forward`
        self.fast = fold_from.fast if fold_from is not None else UNCHECKED
        self.dtype, self.amp = np.dtype(dtype), amp
        self.model_key, self.device = model_key, device
        self.train_views, self.train_labels, self.level_tags = train_views, list(train_labels), level_tags or {}
        self.valid_images, self.study_seed = valid, study_seed
        self.batch_size, self.workers = batch_size, workers

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """The extractor's output, by its folded copy where that computes the same on the first
        two images it is given (on the CPU in fp32: bf16's rounding, or TF32's on a GPU, differs
        by more between any two orders of the same arithmetic); else, warned once per cache, the
        extractor itself from then on."""
        if not self.checked:
            self.fast = self._checked_fold(images[:2])
        return (self.fast if self.fast is not None else self.extractor)(images)

    @property
    def checked(self) -> bool:
        return self.fast is not UNCHECKED

    def _checked_fold(self, probe: torch.Tensor) -> nn.Module | None:
        with torch.inference_mode(False):
            net = self.extractor if self.device.type == "cpu" else copy.deepcopy(self.extractor).cpu()
        fast = folded(net)
        if fast is None:
            return None
        try:
            with torch.inference_mode(False), torch.no_grad(), autocast(torch.device("cpu"), None):
                x = probe.detach().float().cpu().clone()
                want, got = net(x), fast(x)
            error = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
        except Exception as exc:  # the copy traced but does not run: the extractor as it is
            error, why = float("nan"), f"{type(exc).__name__}: {exc}"
        else:
            why = f"relative error {error:.2g} on two images"
        if error <= FOLD_TOLERANCE:
            return fast.to(self.device, memory_format=torch.channels_last)
        log.warning("%s with its batch norms folded computes otherwise (%s): its cached outputs are computed "
                    "unfolded (slower)", type(self.extractor).__name__, why)
        return None

    def _extract(self, dataset, tmp) -> dict:
        """The extractor's outputs on `dataset`, written to `tmp` (.npy) as they come: a large split's
        prefix outputs never sit whole in memory. Outputs beyond a narrower dtype's range are
        clipped (never an inf) and counted in the entry's json (`clipped`)."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator())  # leave the global RNG alone
        limit = float(np.finfo(self.dtype).max)
        state = {"out": None, "row": 0, "clipped": 0}
        chunks = []

        def flush():  # one host sync per ~64 M outputs, not one per batch
            got = torch.cat(chunks).float()
            chunks.clear()
            if self.dtype != np.float32:
                state["clipped"] += int((got.abs() > limit).sum())
                got = got.clamp(-limit, limit)
            got = got.cpu().numpy()
            if state["out"] is None:
                state["out"] = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype,
                                                         shape=(len(dataset), *got.shape[1:]))
            state["out"][state["row"]:state["row"] + len(got)] = got
            state["row"] += len(got)

        # Phase 1's features in fp32 even on CUDA: a one-off cost, and they must not carry bf16 rounding.
        with torch.inference_mode(), autocast(self.device, self.amp):
            for images, labels in loader:
                chunks.append(self._forward(to_device(images, labels, self.device)[0]))
                if sum(c.numel() for c in chunks) >= 2**26:
                    flush()
            if chunks:
                flush()
        if state["out"] is None:
            raise ValueError("no images to extract features from")
        state["out"].flush()
        del state["out"]  # closes the map before the temp is renamed
        return {"clipped": state["clipped"]} if state["clipped"] else {}

    def _entry(self, name: str, dataset) -> np.ndarray:
        path = D.cache_dir() / "features" / f"{cache_key('features', self.model_key, name)}.npy"
        array, meta = cached(path, self.dtype, lambda tmp: self._extract(dataset, tmp))
        if meta.get("clipped") and str(path) not in _WARNED:
            _WARNED.add(str(path))
            log.warning("%d outputs of %s were beyond %s's range and clipped to it (%s)", meta["clipped"], name,
                        self.dtype, path)
        return array

    def valid(self) -> np.ndarray:
        return self._entry("valid", self.valid_images)

    def train_view(self, level: str, epoch: int) -> np.ndarray:
        view = 0 if level == "none" else epoch
        dataset = self.train_views(level)
        dataset.epoch = view
        return self._entry(f"train/{level}{self.level_tags.get(level, '')}/view{view}/seed{self.study_seed}", dataset)


class Rows(torch.utils.data.Dataset):
    """(row i as float32, label i) of a cached entry, read from its memory map one row at a time:
    a view of a large split's prefix outputs never has to sit in RAM as float32."""

    def __init__(self, array: np.ndarray, labels):
        self.array, self.labels = array, torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        # a copy: a read-only map's row would make torch warn that the tensor is not writable
        return torch.from_numpy(np.array(self.array[i], dtype=np.float32)), self.labels[i]

    # Spawned or forkserver DataLoader workers (see StoredImages) reopen the map by its file name.
    __getstate__, __setstate__ = StoredImages.__getstate__, StoredImages.__setstate__


class FeatureEpochs:
    """A train loader over cached features whose k-th pass serves view `first_view` + k (see
    `ViewEpochs`), as float32."""

    def __init__(self, cache: FeatureCache, level: str, batch_size: int, generator: torch.Generator,
                 first_view: int = 0):
        self.cache, self.level, self.batch_size, self.generator = cache, level, batch_size, generator
        self.labels = torch.as_tensor(cache.train_labels)
        self.epoch = first_view

    def __len__(self) -> int:
        """Batches per pass, as `data.loader` makes them (last partial batch dropped)."""
        n, bs = len(self.labels), self.batch_size
        return n // bs if n > bs else 1

    def __iter__(self):
        view = self.cache.train_view(self.level, self.epoch)
        self.epoch += 1
        # One generator across epochs, drawn exactly like the image loader's: same shuffles.
        yield from D.loader(Rows(view, self.labels), self.batch_size, train=True, generator=self.generator)
