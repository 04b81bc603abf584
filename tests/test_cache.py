"""Decode-once images and the phase-1 feature cache: same results as no cache, shared, self-healing."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from conftest import write_images
from src import cache as C
from src import data as D
from src import features as F
from src import model as M
from src.config import Fixed, TrialConfig
from src.pipeline import Pipeline, refold
from src.train import fit_phase, make_optimizer


def _setup(root, use_cache, image_size=16):
    splits = D.find_splits(root)
    fixed = Fixed(backbone="resnet18", weights="none", image_size=image_size, batch_size=8,
                  max_epochs_phase1=3, max_epochs_phase2=1, seed=3)
    return Pipeline(splits=splits, fixed=fixed, weights="none", device=torch.device("cpu"), loader_workers=0,
                    use_cache=use_cache), splits


def _cfg(splits, level, trial_seed=11):
    return TrialConfig("resnet18", "none", 16, 8, 3, 1, 1.0, 1e-2, 0.1, 5, level, trial_seed,
                       tuple(splits.classes))


def _phase1(pipeline, cfg, epochs=3):
    model = pipeline.model(cfg.seed)
    head = pipeline.loaders(cfg, model).phase1
    M.freeze_backbone(model)
    optimizer = make_optimizer(M.param_groups(head.module, cfg.head_lr))
    result = fit_phase(head.module, head.train, head.valid, optimizer, phase=1, max_epochs=epochs,
                       patience=10, device=torch.device("cpu"))
    return result, model


@pytest.mark.parametrize("level", ["none", "light", "strong", "frame"])
def test_cached_phase1_matches_recomputing_the_backbone(flat_folder, level):
    cached, splits = _setup(flat_folder, True)
    plain, _ = _setup(flat_folder, False)
    with_cache, model_a = _phase1(cached, _cfg(splits, level))
    without, model_b = _phase1(plain, _cfg(splits, level))
    for a, b in zip(with_cache.history, without.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4, abs=1e-5)
        assert a.valid_loss == pytest.approx(b.valid_loss, rel=1e-4, abs=1e-5)
        assert a.train_acc == b.train_acc and a.valid_acc == b.valid_acc
    assert torch.allclose(model_a.fc.weight, model_b.fc.weight, atol=1e-4)
    # the backbone is untouched and identical in both (drawn from the study seed)
    assert torch.equal(model_a.conv1.weight, model_b.conv1.weight)


def _feature_files():
    return sorted((D.cache_dir() / "features").glob("*.npy"))


def test_views_are_filled_lazily_and_shared_by_trials(flat_folder):
    pipeline, splits = _setup(flat_folder, True)
    _phase1(pipeline, _cfg(splits, "light", trial_seed=1), epochs=2)
    assert len(_feature_files()) == 1 + 2  # valid + views 0 and 1: only the epochs reached
    first = {p: p.stat().st_mtime_ns for p in _feature_files()}
    _phase1(pipeline, _cfg(splits, "light", trial_seed=2), epochs=3)  # another trial, same level
    files = _feature_files()
    assert len(files) == 1 + 3
    assert all(first[p] == p.stat().st_mtime_ns for p in first)  # reused, not recomputed
    _phase1(pipeline, _cfg(splits, "none", trial_seed=3), epochs=3)
    assert len(_feature_files()) == 4 + 1  # level "none" has a single view


def test_features_survive_a_restart_and_depend_on_what_changes_them(flat_folder):
    pipeline, splits = _setup(flat_folder, True)
    _phase1(pipeline, _cfg(splits, "light"), epochs=1)
    n = len(_feature_files())
    C._verified.clear()  # a new process

    def no_extraction(self, dataset):
        raise AssertionError("features were computed again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F.FeatureCache, "_extract", no_extraction)
        again, _ = _setup(flat_folder, True)
        _phase1(again, _cfg(splits, "light"), epochs=1)
    assert len(_feature_files()) == n
    bigger, _ = _setup(flat_folder, True, image_size=24)  # other image size: other features
    _phase1(bigger, TrialConfig(**{**_cfg(splits, "light").__dict__, "image_size": 24}), epochs=1)
    assert len(_feature_files()) == 2 * n


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_json"])
def test_damaged_cache_entries_are_rebuilt_never_used(flat_folder, damage, caplog):
    pipeline, splits = _setup(flat_folder, True)
    reference, _ = _phase1(pipeline, _cfg(splits, "light"), epochs=2)
    for path in _feature_files() + sorted((D.cache_dir() / "images").glob("*.npy")):
        blob = path.read_bytes()
        if damage == "truncate":      # a crash mid-write of an older, non-atomic writer
            path.write_bytes(blob[: len(blob) // 2])
        elif damage == "garbage":     # same size, wrong bytes
            path.write_bytes(blob[:128] + bytes(len(blob) - 128))
        else:                         # completion marker never written (and the data is bad)
            path.with_suffix(".json").unlink()
            path.write_bytes(blob[:128] + bytes(len(blob) - 128))
    C._verified.clear()
    fresh, _ = _setup(flat_folder, True)
    result, _ = _phase1(fresh, _cfg(splits, "light"), epochs=2)
    assert [r.train_loss for r in result.history] == pytest.approx([r.train_loss for r in reference.history])
    if damage != "no_json":
        assert "corrupt or partial" in caplog.text


def test_images_are_decoded_once_and_memory_mapped(flat_folder, monkeypatch):
    splits = D.find_splits(flat_folder)
    first = C.decode_split(splits.root, splits.train, 18).array
    assert isinstance(first, np.memmap) and first.shape == (len(splits.train), 18, 18, 3)
    C._verified.clear()

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(D, "load_rgb", no_decoding)
    again = C.decode_split(splits.root, splits.train, 18).array
    assert isinstance(again, np.memmap) and np.array_equal(first, again)


def test_stored_eval_images_match_decoding_each_time(tmp_path):
    root = write_images(tmp_path / "odd", per_class=4, size=29)
    splits = D.find_splits(root)
    mean, std = [0.5] * 3, [0.25] * 3
    tf = D.build_transform("none", 16, mean, std, train=False)
    stored = C.StoredImages(C.decode_split(root, splits.train, round(16 / 0.875)).array, [0] * len(splits.train), tf)
    direct = D.ImageList(root, splits.train, tf)
    for i in range(len(splits.train)):
        assert torch.equal(stored[i][0], direct[i][0])


def _two_phases(pipeline, cfg):
    from src.train import fit_two_phase

    model = pipeline.model(cfg.seed)
    data = pipeline.loaders(cfg, model)
    p1, p2 = fit_two_phase(model, data.train, data.valid, head_lr=cfg.head_lr, backbone_lr_ratio=0.1, patience=5,
                           max_epochs_phase1=2, max_epochs_phase2=1, device=torch.device("cpu"),
                           phase1=data.phase1)
    return [v for r in p1.history + p2.history for v in (r.train_loss, r.valid_loss, r.valid_acc)]


def test_a_trial_does_not_depend_on_the_cache_being_warm_or_on(flat_folder, monkeypatch):
    monkeypatch.setattr(F, "folded", lambda net: None)  # the same arithmetic; folding is checked apart (below)
    cached, splits = _setup(flat_folder, True)
    cold = _two_phases(cached, _cfg(splits, "medium"))
    warm = _two_phases(cached, _cfg(splits, "medium"))   # every feature now comes from the cache
    plain, _ = _setup(flat_folder, False)
    uncached = _two_phases(plain, _cfg(splits, "medium"))
    assert warm == pytest.approx(cold, rel=1e-5, abs=1e-6)
    assert uncached == pytest.approx(cold, rel=1e-4, abs=1e-5)


def test_cache_keys_follow_order_and_edits(flat_folder):
    splits = D.find_splits(flat_folder)
    train = list(splits.train)
    key = D.content_key(flat_folder, train)
    assert D.content_key(flat_folder, train[::-1]) != key  # rows follow the order
    moved = flat_folder / train[0][0]
    os.utime(moved, ns=(moved.stat().st_atime_ns, moved.stat().st_mtime_ns + 10**9))
    assert D.content_key(flat_folder, train) != key  # edited in place, same size


def test_view_seeding_leaves_the_global_rng_alone(flat_folder):
    pipeline, splits = _setup(flat_folder, False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    dataset = pipeline._dataset("train", "strong", True)
    dataset[0]
    assert torch.equal(torch.get_rng_state(), before)


def test_stored_images_reach_spawned_workers_as_a_file_name_not_pixels(flat_folder):
    """Workers started by spawn/forkserver unpickle the dataset: it must reopen the memory map,
    not carry a copy of every decoded image."""
    import pickle

    splits = D.find_splits(flat_folder)
    array = C.decode_split(splits.root, splits.train, 64).array
    tf = D.build_transform("light", 56, [0.5] * 3, [0.25] * 3, train=True)
    dataset = C.StoredImages(array, [y for _, y in splits.train], tf, F.view_seed_fn(0, "light"))
    dataset.epoch = 2
    blob = pickle.dumps(dataset)
    assert len(blob) < array.nbytes / 10
    copy = pickle.loads(blob)
    assert isinstance(copy.array, np.memmap) and np.array_equal(copy.array, array)
    assert copy.epoch == 2 and torch.equal(copy[3][0], dataset[3][0])  # same seeded view
    plain = C.StoredImages(np.array(array), dataset.labels, tf)  # an in-memory array still pickles whole
    assert isinstance(pickle.loads(pickle.dumps(plain)).array, np.ndarray)


@pytest.mark.slow
def test_a_spawned_worker_serves_the_same_views(flat_folder):
    splits = D.find_splits(flat_folder)
    array = C.decode_split(splits.root, splits.train, 18).array
    tf = D.build_transform("strong", 16, [0.5] * 3, [0.25] * 3, train=True)
    dataset = C.StoredImages(array, [y for _, y in splits.train], tf, F.view_seed_fn(0, "strong"))
    here = torch.cat([x for x, _ in torch.utils.data.DataLoader(dataset, batch_size=8)])
    spawned = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([x for x, _ in spawned]), here)


def _wide_images(root, n=3):
    """30 x 20 images (aspect 1.5) whose outer columns are red (left) and blue (right)."""
    from PIL import Image

    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full((20, 30, 3), 60 + 40 * c + i, np.uint8)
            pixels[:, :3] = (255, 0, 0)
            pixels[:, -3:] = (0, 0, 255)
            image = Image.fromarray(pixels)
            (image.transpose(Image.Transpose.ROTATE_90) if i == 0 else image).save(root / name / f"{i}.png")
    return root


def test_frames_keep_the_whole_image_and_match_decoding_each_time(tmp_path):
    root = _wide_images(tmp_path / "wide")
    entries = [(f"{c}/{i}.png", k) for k, c in enumerate(("cat", "dog")) for i in range(3)]
    side = D.stored_side(16)  # 18: a 30 x 20 image becomes 27 x 18, within the 1.5 cap
    frames = C.decode_frames(root, entries, side)
    assert frames.array.shape == (6, side, 27, 3) and frames.lengths == [27] * 6
    assert frames.portrait == [True, False, False] * 2  # the rotated ones, stored transposed
    square = C.decode_split(root, entries, side).array
    red = lambda a: bool(((a[..., 0] > 200) & (a[..., 2] < 50)).any())  # noqa: E731
    assert red(frames.array[1]) and not red(square[1])  # the frame keeps the edges the square cuts
    for level in ("frame", "frame_light"):
        tf = D.build_transform(level, 16, [0.5] * 3, [0.25] * 3, train=True)
        stored = C.StoredFrames(frames, [k for _, k in entries], tf, F.view_seed_fn(0, level))
        direct = D.ImageList(root, entries, tf, F.view_seed_fn(0, level))
        for epoch in (0, 2):
            stored.epoch = direct.epoch = epoch
            for i in range(len(entries)):
                assert torch.equal(stored[i][0], direct[i][0]), (level, epoch, i)


def test_frames_are_decoded_only_when_a_frame_level_is_used(tmp_path):
    root = _wide_images(tmp_path / "wide", n=6)
    pipeline, splits = _setup(root, True)
    frames = lambda: sorted((D.cache_dir() / "frames").glob("*.npy"))  # noqa: E731
    _phase1(pipeline, _cfg(splits, "light"), epochs=1)
    assert frames() == []
    result, _ = _phase1(pipeline, _cfg(splits, "frame"), epochs=1)
    assert len(frames()) == 1 and result.epochs == 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_clean_phase1_trains_on_the_one_unaugmented_view_whatever_the_level(flat_folder, use_cache):
    """phase1_views = "clean": phase 1 of a trial at any level trains on the evaluation transform's
    one view (level "none"), so it gives what a level-"none" trial gives, and extracts no view of its
    own level; with "augmented" the level's views are what it trains on."""
    pipeline, splits = _setup(flat_folder, use_cache)
    entries = lambda: sorted((D.cache_dir() / "features").glob("*.npy"))  # noqa: E731
    clean, _ = _phase1(pipeline, dataclasses.replace(_cfg(splits, "strong"), phase1_views="clean"))
    made = entries()
    plain, _ = _phase1(pipeline, _cfg(splits, "none"))
    for a, b in zip(clean.history, plain.history, strict=True):
        assert (a.train_loss, a.valid_loss) == (b.train_loss, b.valid_loss)
    assert entries() == made  # the clean run had made the none trial's entries, and no others
    if use_cache:
        assert len(made) == 2  # the one train view and the validation features
    augmented, _ = _phase1(pipeline, _cfg(splits, "strong"))
    assert augmented.history[0].train_loss != plain.history[0].train_loss  # other inputs
    assert len(entries()) == len(made) + 3 * use_cache  # its level's 3 views (3 phase-1 epochs)


def _with_running_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` with batch-norm statistics and affines far from their init, so folding them changes
    the convolutions' weights (real weights have such; random init's make folding nearly identity)."""
    g = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_cached_forward_passes_run_with_batch_norms_folded_and_compute_the_same(flat_folder, backbone):
    splits = D.find_splits(flat_folder)
    fixed = Fixed(backbone=backbone, weights="none", image_size=32, batch_size=8, max_epochs_phase1=1,
                  max_epochs_phase2=1, seed=3)
    base = _with_running_stats(M.build_model(backbone, len(splits.classes), "none"))
    pipe = Pipeline(splits=splits, fixed=fixed, weights="none", device=torch.device("cpu"), loader_workers=0,
                    base=base)
    pipe.features.train_view("light", 0)  # makes and checks the folded copy
    fast = pipe.features.fast
    assert fast is not None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in pipe.features.extractor.modules())  # left as it was
    runs = {"folded": 0, "unfolded": 0}
    fast.register_forward_hook(lambda *a: runs.__setitem__("folded", runs["folded"] + 1))
    pipe.features.extractor.register_forward_hook(lambda *a: runs.__setitem__("unfolded", runs["unfolded"] + 1))
    view = np.array(pipe.features.train_view("light", 1))
    assert runs == {"folded": 1, "unfolded": 0}  # one batch of 128 or fewer, by the folded copy alone
    dataset = pipe._dataset("train", "light", True)
    dataset.epoch = 1
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        want = pipe.features.extractor(images).numpy()
    assert np.abs(view - want).max() <= 1e-5 * np.abs(want).max()
    # a confirmation fold's cache reuses the copy, made and checked once
    fold = refold(pipe, list(range(len(dataset))), pipe.rows["valid"])
    assert fold.features.fast is fast and fold.features.checked


class _Wrong(torch.nn.Module):
    def __init__(self, net, broken: bool):
        super().__init__()
        self.net, self.broken = net, broken

    def forward(self, x):
        if self.broken:
            raise RuntimeError("this copy cannot run")
        return self.net(x) * 1.01


@pytest.mark.parametrize("broken,why", [(False, "relative error 0.01"), (True, "RuntimeError: this copy cannot run")])
def test_a_fold_that_computes_otherwise_or_fails_is_dropped_with_a_warning(flat_folder, monkeypatch, caplog,
                                                                           broken, why):
    monkeypatch.setattr(F, "folded", lambda net: _Wrong(net, broken))
    pipeline, splits = _setup(flat_folder, True)
    view = np.array(pipeline.features.train_view("light", 0))
    assert pipeline.features.fast is None
    assert "computes otherwise" in caplog.text and why in caplog.text and "unfolded" in caplog.text
    dataset = pipeline._dataset("train", "light", True)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        assert np.allclose(view, pipeline.features.extractor(images).numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_that_cannot_be_traced_is_run_unfolded():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # data-dependent control flow: fx cannot trace it

    assert F.folded(Branchy().eval()) is None
    assert F.folded(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()) is not None
