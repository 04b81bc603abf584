"""--precision auto on a CPU: measured once per backbone, side and batch, kept, and then reused."""
from __future__ import annotations

import json

import pytest
import torch

from src import precision
from src.splits import cache_dir

CPU = torch.device("cpu")


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)


def test_auto_keeps_bf16_only_where_it_was_measured_faster_by_the_margin(native, monkeypatch):
    speeds = {("resnet18", 64): {"fp32": 100.0, "bf16": 180.0}, ("mobilenet_v2", 64): {"fp32": 250.0, "bf16": 140.0},
              ("mobilenet_v2", 128): {"fp32": 72.0, "bf16": 75.0},  # 1.04x: below the margin, fp32
              ("mobilenet_v2", 96): {"fp32": 100.0, "bf16": 120.0}}  # 1.2x: within the steps' noise, fp32
    measured = []

    def measure(backbone, side, batch, eval_share):
        measured.append((backbone, side))
        return speeds[backbone, side]

    monkeypatch.setattr(precision, "measure", measure)
    picks = {key: precision.pick(CPU, "auto", *key, 32) for key in speeds}
    assert picks == {("resnet18", 64): torch.bfloat16, ("mobilenet_v2", 64): None, ("mobilenet_v2", 128): None,
                     ("mobilenet_v2", 96): None}
    kept = json.loads((cache_dir() / "precision.json").read_text())
    assert sorted(v["picked"] for v in kept.values()) == ["bf16", "fp32", "fp32", "fp32"]
    assert all(f"torch {torch.__version__}" in key and "batch 32" in key for key in kept)
    # later sweeps on this machine (and --workers, resumed studies) reuse the choice: nothing is measured
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("measured again"))
    assert {key: precision.pick(CPU, "auto", *key, 32) for key in speeds} == picks
    assert measured == list(speeds)


def test_a_choice_kept_under_another_margin_follows_the_margin_of_today(native, monkeypatch):
    """An entry measured when the margin was 1.05x (bf16 kept at 1.10x) is read by its ratio: fp32
    now, with nothing measured again; one far beyond the margin stays bf16."""
    key = lambda side: (f"{precision.cpu_model()} | torch {torch.__version__} | mobilenet_v2 | {side} px | "  # noqa: E731
                        "batch 32 | valid/train 0.5")
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "precision.json").write_text(json.dumps({
        key(128): {"fp32": 100.0, "bf16": 110.0, "bf16_vs_fp32": 1.1, "picked": "bf16"},
        key(224): {"fp32": 100.0, "bf16": 180.0, "bf16_vs_fp32": 1.8, "picked": "bf16"}}))
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("measured again"))
    assert precision.pick(CPU, "auto", "mobilenet_v2", 128, 32) is None
    assert precision.pick(CPU, "auto", "mobilenet_v2", 224, 32) == torch.bfloat16


def test_auto_measures_nothing_where_the_cpu_has_no_native_bf16_and_the_flag_wins(monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("measured"))
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.pick(CPU, "auto", "resnet18", 64, 32) is None  # emulated bf16: fp32
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.pick(CPU, "fp32", "resnet18", 64, 32) is None
    assert precision.pick(CPU, "bf16", "mobilenet_v2", 64, 32) == torch.bfloat16
    assert not (cache_dir() / "precision.json").exists()


def test_a_damaged_choice_file_is_measured_again_not_a_crash(native, monkeypatch):
    (cache_dir()).mkdir(parents=True, exist_ok=True)
    (cache_dir() / "precision.json").write_text('{"half a fi')
    monkeypatch.setattr(precision, "measure", lambda *a: {"fp32": 100.0, "bf16": 200.0})
    assert precision.pick(CPU, "auto", "resnet18", 32, 8) == torch.bfloat16
    assert len(json.loads((cache_dir() / "precision.json").read_text())) == 1


def test_the_measurement_times_both_precisions_on_the_real_backbone():
    speed = precision.measure("resnet18", 32, 4)  # random init, every stage trainable, a few steps
    assert set(speed) == {"fp32", "bf16"} and min(speed.values()) > 0


@pytest.mark.parametrize("bf16_vs_fp32,rounds", [(2.0, 2), (0.5, 2), (1.1, 3), (1.15, 3)])
def test_two_clear_rounds_end_the_measurement_and_near_the_margin_all_rounds_run(monkeypatch, bf16_vs_fp32, rounds):
    calls = []

    def images_per_s(model, amp, side, batch, n_classes, train):  # the timer alone is replaced
        calls.append(amp)
        return 100.0 * (bf16_vs_fp32 if amp is not None else 1.0)

    monkeypatch.setattr(precision, "_images_per_s", images_per_s)
    speed = precision.measure("resnet18", 32, 4)
    assert len(calls) == rounds * 2 * 3  # per round: fp32 and bf16, each two training kinds and validation
    assert speed["bf16"] / speed["fp32"] == pytest.approx(bf16_vs_fp32)
