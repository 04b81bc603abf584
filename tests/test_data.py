"""Splits (flat and given layouts), errors that name the path, image decoding, transforms,
loaders and the demo data."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from conftest import write_images
from src import splits as S
from src.errors import UserError
from src.data import (AUG_LEVELS, SPLIT_FILE, DataError, build_transform, cache_dir, demo_data_dir,
                      ImageList, find_splits, load_rgb, loader)

CLASSES = ("cat", "dog", "owl")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _files_by_class(root: Path) -> dict[str, set[str]]:
    return {c: {str(p.relative_to(root)) for p in (root / c).iterdir()} for c in CLASSES}


def _as_sets(splits) -> dict[str, set]:
    return {n: set(getattr(splits, n)) for n in ("train", "valid", "test")}


# --- flat layout --------------------------------------------------------------------------------

def test_flat_split_is_stratified_complete_and_written_down(tmp_path):
    root = write_images(tmp_path / "flat", per_class=20)
    splits = find_splits(root, seed=1)
    assert splits.layout == "flat" and splits.classes == CLASSES and splits.root == root
    sets = _as_sets(splits)
    # disjoint, and together exactly the files on disk
    assert not (sets["train"] & sets["valid"]) and not (sets["train"] & sets["test"])
    assert not (sets["valid"] & sets["test"])
    everything = {(rel, CLASSES.index(c)) for c, rels in _files_by_class(root).items() for rel in rels}
    assert sets["train"] | sets["valid"] | sets["test"] == everything
    # stratified 70/15/15: every class in every split, in proportion
    for name, per_class in (("train", 14), ("valid", 3), ("test", 3)):
        counts = Counter(y for _, y in getattr(splits, name))
        assert counts == {0: per_class, 1: per_class, 2: per_class}, (name, counts)
    # labels agree with the folder the file is in
    for rel, y in splits.train + splits.valid + splits.test:
        assert rel.split("/")[0] == CLASSES[y]
    # written down next to the data, as file lists
    assert splits.split_file == root / SPLIT_FILE and splits.split_file.is_file()
    doc = json.loads(splits.split_file.read_text())
    assert doc["seed"] == 1
    for name in ("train", "valid", "test"):
        assert {(r, CLASSES.index(c)) for r, c in doc[name]} == sets[name]


def test_flat_split_is_seeded(tmp_path):
    a = find_splits(write_images(tmp_path / "a", per_class=20), seed=5)
    b = find_splits(write_images(tmp_path / "b", per_class=20), seed=5)
    c = find_splits(write_images(tmp_path / "c", per_class=20), seed=6)
    assert _as_sets(a) == _as_sets(b)           # same files, same seed: same split
    assert _as_sets(a)["test"] != _as_sets(c)["test"]  # the seed matters (so the next test can fail)


def test_recorded_split_wins_over_a_different_seed(tmp_path):
    root = write_images(tmp_path / "flat", per_class=20)
    first = find_splits(root, seed=5)
    text = (root / SPLIT_FILE).read_text()
    again = find_splits(root, seed=6)
    assert _as_sets(again) == _as_sets(first)
    assert again.train == first.train and again.test == first.test  # same order too
    assert (root / SPLIT_FILE).read_text() == text                 # not rewritten


def test_read_only_data_dir_falls_back_to_the_cache_dir(tmp_path, monkeypatch):
    root = write_images(tmp_path / "flat", per_class=10)
    real = S.write_json_atomic
    refused = []

    def no_write_in_data_dir(path, obj):
        if Path(path).parent == root:
            refused.append(path)
            raise PermissionError(13, "Read-only file system", str(path))
        real(path, obj)

    monkeypatch.setattr(S, "write_json_atomic", no_write_in_data_dir)
    first = find_splits(root, seed=0)
    assert refused == [root / SPLIT_FILE]
    assert not (root / SPLIT_FILE).exists()
    assert first.split_file.is_file()
    assert first.split_file.parent == cache_dir() / "splits"
    assert str(first.split_file).startswith(str(tmp_path / "cache"))  # TLSWEEP_CACHE from conftest
    # a later run (any seed) finds the fallback file and reuses it
    again = find_splits(root, seed=99)
    assert again.split_file == first.split_file
    assert _as_sets(again) == _as_sets(first)


def test_no_writable_place_for_the_split_is_a_data_error(tmp_path, monkeypatch):
    root = write_images(tmp_path / "flat", per_class=5)

    def refuse(path, obj):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(S, "write_json_atomic", refuse)
    with pytest.raises(DataError, match=str(root)):
        find_splits(root)


def test_flat_split_refuses_when_a_recorded_file_is_gone(tmp_path):
    root = write_images(tmp_path / "flat", per_class=10)
    splits = find_splits(root)
    victim = root / splits.test[0][0]
    victim.unlink()
    with pytest.raises(DataError) as info:
        find_splits(root)
    assert str(root / SPLIT_FILE) in str(info.value) and victim.name in str(info.value)


def test_flat_class_with_fewer_than_three_images_is_named(tmp_path):
    root = write_images(tmp_path / "flat", per_class=5)
    write_images(root, classes=("rare",), per_class=2)
    with pytest.raises(DataError, match="rare"):
        find_splits(root)


# --- given layout -----------------------------------------------------------------------------

@pytest.mark.parametrize("valid_name", ["valid", "val"])
def test_given_layout_is_used_as_given(split_folder, valid_name):
    if valid_name != "valid":
        (split_folder / "valid").rename(split_folder / valid_name)
    splits = find_splits(split_folder, seed=123)
    assert splits.layout == "given" and splits.classes == CLASSES and splits.split_file is None
    for name, folder, per_class in (("train", "train", 8), ("valid", valid_name, 3), ("test", "test", 3)):
        entries = getattr(splits, name)
        assert Counter(y for _, y in entries) == {0: per_class, 1: per_class, 2: per_class}
        for rel, y in entries:
            parts = Path(rel).parts
            assert parts[0] == folder and parts[1] == CLASSES[y]
            assert (split_folder / rel).is_file()
    assert not (split_folder / SPLIT_FILE).exists()


def test_non_image_files_are_ignored_and_counted(split_folder):
    (split_folder / "train" / "cat" / "notes.txt").write_text("not an image")
    (split_folder / "valid" / "dog" / "labels.csv").write_text("a,b")
    (split_folder / "test" / "owl" / ".DS_Store").write_bytes(b"\0")  # hidden: skipped, not counted
    splits = find_splits(split_folder)
    assert splits.ignored_files == 2
    assert splits.summary()["ignored_non_image_files"] == 2
    names = [Path(r).name for r, _ in splits.train + splits.valid + splits.test]
    assert "notes.txt" not in names and "labels.csv" not in names and ".DS_Store" not in names
    assert len(splits.train) == 24 and len(splits.valid) == 9 and len(splits.test) == 9


def test_non_image_files_in_flat_layout_are_ignored_and_counted(tmp_path):
    root = write_images(tmp_path / "flat", per_class=5)
    (root / "cat" / "readme.md").write_text("x")
    splits = find_splits(root)
    assert splits.ignored_files == 1
    assert all(not r.endswith(".md") for r, _ in splits.train + splits.valid + splits.test)


# --- errors name the path -----------------------------------------------------------------------

def test_missing_data_directory(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(DataError) as info:
        find_splits(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, UserError)


def test_given_layout_without_test_split(split_folder):
    shutil.rmtree(split_folder / "test")
    with pytest.raises(DataError) as info:
        find_splits(split_folder)
    assert str(split_folder / "test") in str(info.value)


@pytest.mark.parametrize("layout", ["given", "flat"])
def test_class_folder_without_images(tmp_path, split_folder, layout):
    root = split_folder if layout == "given" else write_images(tmp_path / "flat", per_class=5)
    empty = (root / "train" / "dog") if layout == "given" else (root / "dog")
    shutil.rmtree(empty)
    empty.mkdir()
    (empty / "only.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        find_splits(root)
    assert str(empty) in str(info.value)


def test_class_sets_that_differ_across_splits_name_the_classes(split_folder):
    shutil.rmtree(split_folder / "test" / "owl")
    write_images(split_folder / "valid", classes=("emu",), per_class=2)
    with pytest.raises(DataError) as info:
        find_splits(split_folder)
    msg = str(info.value)
    assert "owl" in msg and "emu" in msg and str(split_folder) in msg
    assert "cat" not in msg.split("missing", 1)[1]  # only the classes that are missing


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_image_is_an_error_naming_the_file(tmp_path, fmt, ext):
    rng = np.random.default_rng(0)
    path = tmp_path / f"broken{ext}"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(path, fmt)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def test_not_an_image_at_all_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("<html>404</html>")
    with pytest.raises(DataError, match="fake.png"):
        load_rgb(path)


# --- decoding to RGB --------------------------------------------------------------------------

def _save(tmp_path, im: Image.Image, name: str) -> Path:
    path = tmp_path / name
    im.save(path)
    return path


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    out = load_rgb(_save(tmp_path, Image.fromarray(arr, "L"), "g.png"))
    assert out.mode == "RGB" and out.size == (4, 4)
    got = np.asarray(out)
    for ch in range(3):
        assert np.array_equal(got[..., ch], arr)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (200, 10, 20, 255)   # opaque: kept
    arr[0, 1] = (0, 0, 0, 0)         # transparent: white, not black
    arr[1, 0] = (0, 0, 0, 128)       # half-transparent black: mid gray
    arr[1, 1] = (255, 0, 0, 255)
    got = np.asarray(load_rgb(_save(tmp_path, Image.fromarray(arr, "RGBA"), "a.png"))).astype(int)
    assert got.shape == (2, 2, 3)
    assert tuple(got[0, 0]) == (200, 10, 20)
    assert tuple(got[0, 1]) == (255, 255, 255)
    assert all(abs(v - 127) <= 2 for v in got[1, 0])
    assert tuple(got[1, 1]) == (255, 0, 0)


def test_palette_becomes_its_colours(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    im.putdata([0, 1, 1])
    got = np.asarray(load_rgb(_save(tmp_path, im, "p.png")))
    assert got.shape == (1, 3, 3)
    assert got[0].tolist() == [[10, 20, 30], [200, 100, 50], [200, 100, 50]]


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 0, 0, 0] + [0, 0, 0] * 254)
    im.putdata([0, 1])
    im.info["transparency"] = 1
    got = np.asarray(load_rgb(_save(tmp_path, im, "pt.png")))
    assert got[0].tolist() == [[10, 20, 30], [255, 255, 255]]


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    arr = np.array([[0, 65535], [32768, 65535]], dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    path = _save(tmp_path, src, "deep.png")
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    got = np.asarray(load_rgb(path)).astype(int)
    assert got.shape == (2, 2, 3)
    assert (got[0, 0] == 0).all() and (got[0, 1] == 255).all() and (got[1, 1] == 255).all()
    assert all(abs(v - 128) <= 1 for v in got[1, 0])


def test_deep_images_scale_by_bit_depth_not_by_their_own_maximum(tmp_path):
    twelve_bit = Image.fromarray(np.array([[0, 4095], [2048, 100]], dtype=np.uint16))
    got = np.asarray(load_rgb(_save(tmp_path, twelve_bit, "12bit.png"))).astype(int)[..., 0]
    assert got[0, 1] == 255 and abs(got[1, 0] - 128) <= 1 and abs(got[1, 1] - 6) <= 1
    dim = Image.fromarray(np.array([[0, 200]], dtype=np.uint16))  # 8-bit values in a 16-bit file
    assert np.asarray(load_rgb(_save(tmp_path, dim, "dim.png")))[0, 1, 0] == 200  # not stretched


def test_rgb_is_returned_unchanged(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    got = load_rgb(_save(tmp_path, Image.fromarray(arr, "RGB"), "rgb.png"))
    assert np.array_equal(np.asarray(got), arr)


# --- transforms ---------------------------------------------------------------------------------

def _photo(w=40, h=24, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def test_eval_transform_is_deterministic_and_the_same_for_every_level():
    img = _photo()
    ref = build_transform("none", 16, IMAGENET_MEAN, IMAGENET_STD, train=False)(img)
    assert ref.shape == (3, 16, 16) and ref.dtype == torch.float32
    for level in AUG_LEVELS:
        tf = build_transform(level, 16, IMAGENET_MEAN, IMAGENET_STD, train=False)
        torch.manual_seed(0)
        a = tf(img)
        torch.manual_seed(1)
        b = tf(img)
        assert torch.equal(a, b), level
        assert torch.equal(a, ref), level


def test_none_train_transform_is_the_eval_transform():
    img = _photo()
    ev = build_transform("none", 16, IMAGENET_MEAN, IMAGENET_STD, train=False)
    tr = build_transform("none", 16, IMAGENET_MEAN, IMAGENET_STD, train=True)
    for seed in range(5):
        torch.manual_seed(seed)
        assert torch.equal(tr(img), ev(img))


@pytest.mark.parametrize("level", list(AUG_LEVELS))
@pytest.mark.parametrize("size", [16, 32])
def test_every_level_yields_the_crop_size(level, size):
    tf = build_transform(level, size, IMAGENET_MEAN, IMAGENET_STD, train=True)
    for seed, img in enumerate([_photo(40, 24), _photo(12, 50), _photo(8, 8)]):
        torch.manual_seed(seed)
        out = tf(img)
        assert out.shape == (3, size, size) and out.dtype == torch.float32, (level, img.size)


def _first_bright_column(image: torch.Tensor, row: int) -> int | None:
    cols = (image[0, row] > 128).nonzero()
    return int(cols[0]) if len(cols) else None


def test_a_search_size_trials_translations_are_the_full_sizes_scaled():
    """strong's TrivialAugmentWide translates up to 32 px at the full size; a trial at half the
    side (aug_side = twice its size) draws the same operation and bin, shifted half as far."""
    from src.data import ScaledTrivialAugmentWide
    edge = torch.zeros(3, 32, 32, dtype=torch.uint8)
    edge[:, :, 16:] = 255
    full, half = T.TrivialAugmentWide(), ScaledTrivialAugmentWide(0.5)
    shifts = []
    for seed in range(600):
        torch.manual_seed(seed)
        a = full(edge)
        torch.manual_seed(seed)
        b = half(edge)
        if torch.equal(a, b):
            continue  # not a translation: every other operation is the full size's own
        ca, cb = _first_bright_column(a, 16), _first_bright_column(b, 16)
        if ca not in (None, 0, 16) and cb is not None:  # the edge moved and stayed inside (0: pushed past)
            shifts.append((ca - 16, cb - 16))
    assert len(shifts) > 10
    assert all(abs(h) == abs(f) // 2 and (h == 0 or (h > 0) == (f > 0)) for f, h in shifts), shifts
    assert max(abs(f) for f, _ in shifts) > 8  # the full size's shifts reach past the half's largest ones
    # picklable for a loader's worker processes, and still scaled after
    space = pickle.loads(pickle.dumps(half))._AUGMENTATION_SPACE
    assert [space[name][0](31, 32, 32).max() for name in ("TranslateX", "TranslateY")] == [16, 16]


def _stripe_starts(tf, draws=300) -> set[int]:
    img = np.zeros((18, 18, 3), dtype=np.uint8)
    img[:, 8:10] = 255  # a centred stripe: a flip leaves it where it is, a crop's shift moves it
    starts = set()
    for seed in range(draws):
        torch.manual_seed(seed)
        out = tf(Image.fromarray(img, "RGB"))
        cols = (out[0, 8] > 0).nonzero()
        starts.add(int(cols[0]) if len(cols) else None)
    return starts


def test_the_seed_levels_padding_is_the_full_sizes_share_of_the_image():
    """seed's RandomCrop pads 8 px at the full size; at half the side (aug_side = 32 for a 16 px
    trial) 4 px, so the stripe lands at the centre's column +-4, not +-8."""
    full = build_transform("seed", 16, [0.5] * 3, [0.5] * 3, train=True)
    half = build_transform("seed", 16, [0.5] * 3, [0.5] * 3, train=True, aug_side=32)
    assert _stripe_starts(half) == set(range(7 - 4, 7 + 4 + 1))
    assert min(_stripe_starts(full) - {None}) < 3 and max(_stripe_starts(full) - {None}) > 11
    # at its own size every level's transform is the one it was (the caches' keys hold): torchvision's own
    for level in AUG_LEVELS:
        assert repr(build_transform(level, 16, [0.5] * 3, [0.5] * 3, True, aug_side=16)) == repr(
            build_transform(level, 16, [0.5] * 3, [0.5] * 3, True))
    assert "RandomCrop(size=(16, 16), padding=[8, 8, 8, 8]" in repr(full)
    assert "\n      TrivialAugmentWide(interpolation=nearest, num_magnitude_bins=31)\n" in repr(
        build_transform("strong", 16, [0.5] * 3, [0.5] * 3, True))


@pytest.mark.parametrize("level", [lv for lv in AUG_LEVELS if lv != "none"])
def test_train_levels_other_than_none_augment(level):
    img = _photo(40, 40)
    ev = build_transform(level, 32, IMAGENET_MEAN, IMAGENET_STD, train=False)(img)
    tf = build_transform(level, 32, IMAGENET_MEAN, IMAGENET_STD, train=True)
    torch.manual_seed(0)
    draws = [tf(img) for _ in range(8)]
    assert any(not torch.equal(d, ev) for d in draws)
    assert any(not torch.equal(d, draws[0]) for d in draws[1:])


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), ([0.1, 0.5, 0.9], [0.5, 0.25, 0.125])])
def test_normalization_uses_the_given_mean_and_std(mean, std):
    gray = Image.new("RGB", (30, 20), (128, 128, 128))
    out = build_transform("none", 16, mean, std, train=False)(gray)
    for ch in range(3):
        expected = (128 / 255 - mean[ch]) / std[ch]
        assert torch.allclose(out[ch], torch.full((16, 16), expected), atol=1e-5), (ch, out[ch][0, 0], expected)


def test_unknown_augmentation_level_is_a_user_error():
    with pytest.raises(UserError, match="extreme"):
        build_transform("extreme", 16, IMAGENET_MEAN, IMAGENET_STD, train=True)


# --- loaders ----------------------------------------------------------------------------------

def test_loader_yields_labelled_batches(split_folder):
    splits = find_splits(split_folder)
    tf = build_transform("none", 16, IMAGENET_MEAN, IMAGENET_STD, train=False)
    train = loader(ImageList(split_folder, splits.train, tf), batch_size=5, train=True, seed=3)
    batches = list(train)
    assert [len(y) for _, y in batches] == [5, 5, 5, 5]          # 24 images, last partial dropped
    assert batches[0][0].shape == (5, 3, 16, 16)
    order = [y.tolist() for _, y in batches]
    again = [y.tolist() for _, y in loader(ImageList(split_folder, splits.train, tf), 5, True, seed=3)]
    assert order == again                                       # seeded shuffle
    valid = list(loader(ImageList(split_folder, splits.valid, tf), batch_size=4, train=False))
    assert [len(y) for _, y in valid] == [4, 4, 1]              # eval keeps every image
    assert torch.cat([y for _, y in valid]).tolist() == [y for _, y in splits.valid]  # in order


# --- demo data ------------------------------------------------------------------------------------

def test_demo_data_is_written_once(tmp_path):
    root = demo_data_dir()
    assert root.parent == cache_dir() and str(root).startswith(str(tmp_path / "cache"))
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == [str(i) for i in range(10)]
    files = sorted(root.rglob("*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as im:
        assert im.size == (8, 8)
    stamps = {p: p.stat().st_mtime_ns for p in [root, *files[::97]]}
    os.utime(files[0], ns=(1, 1))  # a marker a rewrite would erase
    assert demo_data_dir() == root
    assert files[0].stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != files[0])
    assert len(list(root.rglob("*.png"))) == 1797
    assert not [p for p in cache_dir().iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_a_killed_demo_writer_leaves_nothing_the_next_run_keeps(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    half = cache_dir() / f".demo-digits.{dead.pid}.tmp" / "3"
    half.mkdir(parents=True)
    (half / "0001.png").write_bytes(b"\x89PNG half")
    live = cache_dir() / f".demo-digits.{os.getppid()}.tmp"  # a live process: a writer still at work
    live.mkdir()
    root = demo_data_dir()
    assert len(list(root.rglob("*.png"))) == 1797
    assert not half.parent.exists() and live.exists()
