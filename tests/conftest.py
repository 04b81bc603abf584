"""Shared test fixtures: tiny real image folders made on the fly, isolated caches."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image


def write_images(root, classes=("cat", "dog", "owl"), per_class=9, size=20, seed=0):
    """Write `per_class` PNGs per class under root/<class>/; each class has its own colour so
    the task is learnable. Returns root."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.uint8)
            base[..., ci % 3] = 200
            noise = rng.integers(0, 50, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise, "RGB").save(root / name / f"{name}_{i:03d}.png")
    return root


def sweep_args(tmp_path, data, trials=2, *extra):
    """A tiny, fast sweep (random init, 16 px, 2 epochs per phase) on SQLite stores in tmp_path.
    In fp32: at 16 px resnet18's last stage starts with a stride-2 conv on a 1x1 map, where oneDNN's
    bf16 conv backward gives garbage (NaN) gradients on CPUs with native bf16 (from 32 px on that
    map is 2x2), and such a trial fails as diverged."""
    return ["--data", str(data), "--trials", str(trials), "--weights", "none", "--image-size", "16",
            "--batch-size", "8", "--max-epochs", "2", "--precision", "fp32", "--storage", f"sqlite:///{tmp_path}/optuna.db",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--study-name", "s", *extra]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root ./mlruns lands in tmp
    return tmp_path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Demo data, split fallbacks and torch hub live under the test's tmp dir."""
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def flat_folder(tmp_path):
    return write_images(tmp_path / "flat")


@pytest.fixture
def split_folder(tmp_path):
    root = tmp_path / "given"
    for split, n in (("train", 8), ("valid", 3), ("test", 3)):
        write_images(root / split, per_class=n, seed=len(split) + n)
    return root


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download weights fails like an offline machine, wherever the tests run
    (CI may have network); returns the URLs that were attempted."""
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known (test: offline)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return calls
