"""Phase 2 on its frozen prefix's cached outputs (src/prefix.py): the cut model computes what the
whole one does, trains the same stages, matches running the whole model on the same views, and
its cache is shared by trials."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from src import data as D
from src import features as F
from src import model as M
from src import prefix as P
from src.config import Fixed, TrialConfig
from src.inputs import feature_cache
from src.pipeline import Pipeline
from src.train import fit_two_phase


@pytest.mark.parametrize("backbone,unfreeze", [("resnet18", 1), ("resnet18", 2), ("mobilenet_v2", 1),
                                               ("mobilenet_v2", 3), ("efficientnet_b0", 2)])
def test_a_cut_model_computes_what_the_whole_model_does_and_holds_what_phase2_trains(backbone, unfreeze):
    torch.manual_seed(0)
    model = M.build_model(backbone, 4, "none")
    cut = P.cut_for(model, unfreeze)
    prefix, suffix = P.checked_split(model, cut, 64)
    x = torch.randn(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), model(x), atol=1e-5)
    M.unfreeze(model, unfreeze)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    # the suffix holds the model's own parameters (no copy): exactly the ones phase 2 trains
    assert {id(p) for p in suffix.parameters()} == trained
    assert not {id(p) for p in prefix.parameters()} & trained


def test_no_cut_where_its_output_is_larger_than_the_image_or_nothing_is_frozen():
    model = M.build_model("resnet18", 4, "none")
    assert P.cut_for(model, "all") is None
    # resnet18 with 3 stages trained starts from layer1's output: 64 x 16 x 16 > 3 x 64 x 64
    assert P.checked_split(model, P.cut_for(model, 3), 64) is None
    assert P.checked_split(model, P.cut_for(model, 1), 64) is not None


def _pipeline(root, use_cache):
    fixed = Fixed(backbone="resnet18", weights="none", image_size=32, batch_size=8, max_epochs_phase1=1,
                  max_epochs_phase2=2, seed=3)
    return Pipeline(splits=D.find_splits(root), fixed=fixed, weights="none", device=torch.device("cpu"),
                    loader_workers=0, use_cache=use_cache)


def _cfg(pipe, level="light", unfreeze=1, seed=11):
    return TrialConfig("resnet18", "none", 32, 8, 1, 2, 1.0, 1e-2, 0.5, 5, level, seed, unfreeze=unfreeze,
                       classes=tuple(pipe.splits.classes))


def _train(pipe, cfg):
    model = pipe.model(cfg.seed)
    data = pipe.loaders(cfg, model)
    _, phase2 = fit_two_phase(model, data.train, data.valid, head_lr=cfg.head_lr,
                              backbone_lr_ratio=cfg.backbone_lr_ratio, patience=5, max_epochs_phase1=1,
                              max_epochs_phase2=2, device=torch.device("cpu"), unfreeze=cfg.unfreeze,
                              phase1=data.phase1, phase2=data.phase2, keep_mistakes=4)
    return model, data, phase2


# float32 entries, the prefix unfolded: the same arithmetic, every epoch agrees (folding's rounding
# is checked apart: test_cache.py); float16, folded as in a sweep: its rounding (3 significant
# digits) agrees at the first epoch, after which 21 tiny images at a high lr amplify any difference
@pytest.mark.parametrize("stored,rel,epochs", [(np.float32, 1e-4, 2), (np.float16, 5e-2, 1)])
def test_phase2_on_cached_prefix_outputs_matches_the_whole_model_on_the_same_views(flat_folder, monkeypatch,
                                                                                 stored, rel, epochs):
    monkeypatch.setattr(P, "STORED_AS", stored)  # float32: the same arithmetic; float16: its rounding
    if stored is np.float32:
        monkeypatch.setattr(F, "folded", lambda net: None)
    cached, plain = _pipeline(flat_folder, True), _pipeline(flat_folder, False)
    model_a, data_a, a = _train(cached, _cfg(cached))
    model_b, data_b, b = _train(plain, _cfg(plain))
    assert data_a.phase2 is not None and data_b.phase2 is None  # the control runs the whole model
    assert len(a.history) == len(b.history) == 2
    for x, y in zip(a.history[:epochs], b.history[:epochs]):
        assert x.train_loss == pytest.approx(y.train_loss, rel=rel)
        assert x.valid_loss == pytest.approx(y.valid_loss, rel=rel)
    base = cached.base
    assert torch.equal(model_a.layer3[0].conv1.weight, base.layer3[0].conv1.weight)  # frozen stages never move
    assert torch.equal(model_a.layer3[0].bn1.running_mean, base.layer3[0].bn1.running_mean)
    assert not torch.equal(model_a.layer4[0].conv1.weight, base.layer4[0].conv1.weight)  # the trained one does
    if stored is np.float32:
        assert torch.allclose(model_a.layer4[0].conv1.weight, model_b.layer4[0].conv1.weight, atol=1e-3)
    # the mistakes shown are images the model saw, from one pass of the whole model
    assert a.valid_mistakes.images.shape[1:] == (3, 32, 32)


def _entries():
    return {p: p.stat().st_mtime_ns for p in (D.cache_dir() / "features").glob("*.npy")}


def test_prefix_outputs_are_stored_once_per_view_and_depth_in_float16_and_shared_by_trials(flat_folder):
    pipe = _pipeline(flat_folder, True)
    _train(pipe, _cfg(pipe, seed=1))
    first = _entries()
    _train(pipe, _cfg(pipe, seed=2))  # another trial, same level and depth: nothing new
    assert _entries() == first
    halves = [np.load(p, mmap_mode="r") for p in first]
    assert {a.dtype for a in halves} == {np.dtype(np.float32), np.dtype(np.float16)}
    assert sum(a.dtype == np.float16 for a in halves) == 1 + 2  # valid + views of phase-2 epochs 1 and 2
    _train(pipe, _cfg(pipe, unfreeze=2, seed=3))  # another depth: its own entries
    assert len(_entries()) == len(first) + 3
    _train(pipe, _cfg(pipe, unfreeze="all", seed=4))  # everything trains: no prefix
    assert len(_entries()) == len(first) + 3


def test_no_cut_where_the_prefix_holds_what_phase2_trains():
    model = M.build_model("resnet18", 4, "none")
    # cut before layer4 but two stages trained: layer3 would sit in the frozen cache
    assert P.checked_split(model, P.cut_for(model, 1), 64, unfreeze=2) is None
    assert P.checked_split(model, P.cut_for(model, 2), 64, unfreeze=2) is not None


def test_outputs_beyond_float16_are_clipped_counted_and_said(flat_folder, caplog):
    pipe = _pipeline(flat_folder, True)
    loud = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    torch.nn.init.constant_(loud[1].weight, 1e3)  # every output is far beyond 65,504
    cache = feature_cache(pipe, loud, {"test": "loud"}, dtype=np.float16, batch_size=4)
    with caplog.at_level("WARNING", logger="tlsweep"):
        out = cache.valid()
    assert out.dtype == np.float16 and np.isfinite(out.astype(np.float32)).all()
    assert float(np.abs(out.astype(np.float32)).max()) == float(np.finfo(np.float16).max)
    meta = json.loads(next((D.cache_dir() / "features").glob("*.json")).read_text())
    assert meta["clipped"] == out.size and meta["shape"] == [len(pipe.labels("valid")), 4]
    assert f"{out.size} outputs of valid were beyond" in caplog.text


def test_rows_of_a_read_only_map_are_writable_copies(tmp_path):
    # a cached float32 view is a read-only memory map: each row must come out as a copy (torch
    # warns on a non-writable array, and a write through the tensor must never reach the cache)
    np.save(tmp_path / "view.npy", np.ones((3, 4), np.float32))
    cached = np.load(tmp_path / "view.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row, label = F.Rows(cached, [0, 1, 2])[1]
    row += 1
    assert (row.dtype, int(label), row.tolist()) == (torch.float32, 1, [2.0] * 4)
    assert cached[1].tolist() == [1.0] * 4
