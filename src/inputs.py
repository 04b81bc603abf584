"""What each phase of a trial fits, from a pipeline's caches (src/pipeline.py): phase 1's head on
cached backbone features (or the model on the same views, decoded every epoch), and phase 2's
model after its frozen stages on their cached outputs (src/prefix.py; or the whole model on images).
"""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
from torch import nn

from . import data as D
from . import features as F
from . import prefix as P
from .config import TrialConfig
from .train import PhaseInputs


def feature_cache(pipe, extractor: nn.Module, key: dict, **how) -> F.FeatureCache:
    """The cache of what `extractor` makes of a pipeline's train views and valid images, under
    `key`: phase 1's features, or (`how`: `FeatureCache`'s dtype, amp, batch, fold_from) phase 2's prefix outputs."""
    return F.FeatureCache(
        extractor, key, lambda level: pipe._dataset("train", level, True), pipe.labels("train"),
        pipe._dataset("valid", "none", False), pipe.fixed.seed, pipe.device, workers=pipe.workers,
        level_tags={lvl: "-" + hashlib.sha256(repr(pipe.transform(lvl)).encode()).hexdigest()[:12]
                    for lvl in D.FRAME_LEVELS}, **how)


def head_inputs(pipe, cfg: TrialConfig, model: nn.Module, valid=None, logs: dict | None = None) -> PhaseInputs:
    """What phase 1 fits on `pipe`: the head on cached features (caches on), or the model on the
    same views decoded every epoch, judged on `valid` (default: `pipe`'s validation loader). The
    views are the trial's augmentation level's, or with `phase1_views = "clean"` the one view of
    level "none" (src/fidelity.py PHASE1_VIEWS)."""
    bs, logs = cfg.batch_size, logs or pipe._logs()
    level = "none" if cfg.phase1_views == "clean" else cfg.aug_strength
    if pipe.features is None:
        views = pipe._loader(pipe._dataset("train", level, True), bs, True, cfg.seed, logs["train"])
        return PhaseInputs(model, F.ViewEpochs(views), valid if valid is not None else pipe.valid_loader(bs * 2))
    if pipe.valid_features is None:
        pipe.valid_features = torch.from_numpy(np.array(pipe.features.valid()))
    valid_features = torch.utils.data.TensorDataset(pipe.valid_features, torch.as_tensor(pipe.labels("valid")))
    phase1_train = F.FeatureEpochs(pipe.features, level, bs, torch.Generator().manual_seed(cfg.seed))
    return PhaseInputs(model.get_submodule(pipe.head), phase1_train, pipe._loader(valid_features, bs * 2, False))


def prefix_cache(pipe, unfreeze, amp: torch.dtype | None) -> tuple | None:
    """(cut, the cache of the frozen prefix's outputs up to block `cut`, the valid outputs as a
    dataset) for phase 2 with `unfreeze` stages trained, computed under `amp` (as phase 2 would);
    None where everything trains, caches are off, or the model is not cut there (src/prefix.py).
    Made once per pipeline, depth and precision."""
    if (unfreeze, amp) in pipe.prefixes:
        return pipe.prefixes[unfreeze, amp]
    cut = P.cut_for(pipe.base, unfreeze) if pipe.features is not None else None
    halves = P.checked_split(copy.deepcopy(pipe.base), cut, pipe.fixed.image_size, unfreeze) if cut else None
    found = None
    if halves is not None:
        # the trial's batch: at 128 px on the CPU here, batches of 128 ran 1.7-2x slower than 32
        cache = feature_cache(pipe, halves[0].eval().requires_grad_(False),
                              {**pipe.features.model_key, "prefix": cut, "amp": str(amp)}, dtype=P.STORED_AS,
                              amp=amp, batch_size=pipe.fixed.batch_size)
        valid = cache.valid()  # memory-mapped: read in chunks
        top = max(float(np.abs(valid[i:i + 256]).max()) for i in range(0, len(valid), 256))
        if top < P.FP16_LIMIT:  # else float16 clipped them: phase 2 runs on images
            found = (cut, cache, F.Rows(valid, pipe.labels("valid")))
    pipe.prefixes[unfreeze, amp] = found
    return found


def prefix_inputs(pipe, cfg: TrialConfig, model: nn.Module, amp: torch.dtype | None) -> PhaseInputs | None:
    """Phase 2 on its frozen prefix's cached outputs (`prefix_cache`): `model` after the cut, the
    train views from `PHASE2_FIRST_VIEW` on in the image loader's order, the valid outputs."""
    found = prefix_cache(pipe, cfg.unfreeze, amp)
    if found is None:
        return None
    cut, cache, valid = found
    train = F.FeatureEpochs(cache, cfg.aug_strength, cfg.batch_size, torch.Generator().manual_seed(cfg.seed),
                            first_view=F.PHASE2_FIRST_VIEW)
    return PhaseInputs(P.suffix_of(model, cut), train, pipe._loader(valid, cfg.batch_size * 2, False))
