"""Each figure on tiny data: the values drawn are the hand-computed ones, the labels and axes are
right, and the files are real PNGs."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from src import figures as F
from src.train import EpochResult, Mistakes, evaluate

CLASSES = ["ant", "bee", "cat", "dog"]
# 6 images: ant 2 right + 1 as bee; bee 1 right + 1 as cat; cat 1 right; dog none.
TARGETS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 2, 2]
COUNTS = [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
ROWS = [[2 / 3, 1 / 3, 0, 0], [0, 1 / 2, 1 / 2, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def _ticks(labels):
    return [t.get_text() for t in labels]


def test_confusion_counts_and_row_normalized_heatmap_match_the_hand_computed_ones(tmp_path):
    cm = F.confusion(TARGETS, PREDS, 4)
    assert cm.tolist() == COUNTS
    fig = F.confusion_figure(cm, CLASSES, "valid")
    ax = fig.axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), ROWS)
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert _ticks(ax.get_xticklabels()) == CLASSES and _ticks(ax.get_yticklabels()) == CLASSES
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0.67", "0.33", "0.50", "0.50", "1.00"])
    assert "6 images" in ax.get_title()
    csv_path, png_path = F.write_confusion(cm, CLASSES, tmp_path / "cm", "valid")
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", *CLASSES]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == COUNTS and [r[0] for r in rows[1:]] == CLASSES
    with Image.open(png_path) as im:
        assert im.format == "PNG" and min(im.size) >= 400


def test_a_large_class_does_not_hide_a_small_one():
    # 1000 images of a class all right, 10 of another half wrong: counts would colour the small
    # class's 5 mistakes like nothing; by row it is half its images.
    cm = np.array([[1000, 0], [5, 5]])
    drawn = np.asarray(F.confusion_figure(cm, ["big", "small"], "t").axes[0].images[0].get_array())
    np.testing.assert_allclose(drawn, [[1.0, 0.0], [0.5, 0.5]])


def test_a_100_class_confusion_keeps_every_name_readable():
    names = [f"sport_{i:03d}" for i in range(100)]
    cm = np.diag(np.full(100, 3))
    fig = F.confusion_figure(cm, names, "valid")
    ax = fig.axes[0]
    assert _ticks(ax.get_xticklabels()) == names and _ticks(ax.get_yticklabels()) == names
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 7
    assert fig.get_size_inches()[1] * F.DPI / 100 >= 20  # at least 20 px per class
    assert not ax.texts  # no per-cell numbers at this size: colour only


def test_beyond_200_classes_the_heatmap_stops_growing_and_names_go_to_the_csv():
    cm = np.diag(np.full(300, 2))
    fig = F.confusion_figure(cm, [f"c{i}" for i in range(300)], "valid")
    assert fig.get_size_inches()[1] == pytest.approx(0.22 * F.NAMES_UP_TO + 3)
    assert "names in the CSV" in fig.axes[0].get_xlabel()
    assert "c0" not in _ticks(fig.axes[0].get_xticklabels())


def test_class_names_are_text_not_tex(tmp_path):
    names = ["cost_$_a_$^", "50%", "a\\b"]
    cm = np.eye(3, dtype=int)
    F.write_confusion(cm, names, tmp_path / "cm", "valid")  # mathtext would raise on the first
    F.save(F.per_class_figure(F.per_class_report([0, 1, 2], [0, 1, 2], names), "valid"), tmp_path / "pc.png")
    assert _ticks(F.confusion_figure(cm, names, "v").axes[0].get_xticklabels()) == names


def test_per_class_bars_show_precision_recall_f1_worst_first(tmp_path):
    rows = F.per_class_report(TARGETS, PREDS, CLASSES)
    by = {r["class"]: r for r in rows}
    assert (by["ant"]["precision"], by["ant"]["recall"]) == (1.0, pytest.approx(2 / 3))
    assert (by["bee"]["precision"], by["bee"]["recall"]) == (0.5, 0.5)
    assert (by["cat"]["precision"], by["cat"]["recall"], by["cat"]["support"]) == (0.5, 1.0, 1)
    assert by["dog"]["support"] == 0 and by["dog"]["f1"] == 0.0
    fig = F.per_class_figure(rows, "valid")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["precision", "recall", "f1"]
    labels = _ticks(ax.get_yticklabels())
    # Bars go bottom-up: worst F1 on top, a class without images at the bottom (no score, not a bad one).
    assert labels == ["dog (no images)", "ant (n=3)", "cat (n=1)", "bee (n=2)"]
    order = [label.split(" ")[0] for label in labels]
    widths = {m: [bar.get_width() for bar in c] for m, c in zip(F.METRICS, ax.containers)}
    for metric in F.METRICS:
        assert widths[metric] == pytest.approx([by[c][metric] for c in order])
    assert ax.get_xlabel() == "score" and ax.get_xlim() == (0, 1)
    path = F.save(fig, tmp_path / "pc.png")
    with Image.open(path) as im:
        assert im.format == "PNG"


def _history(p1, p2):
    recs = [EpochResult(1, e, e, 1.0 / e, 0.5, 1.1 / e, 0.4, {}) for e in range(1, p1 + 1)]
    return recs + [EpochResult(2, e, p1 + e, 0.2 / e, 0.9, 0.3 / e, 0.8, {}) for e in range(1, p2 + 1)]


def test_training_curves_span_both_phases_with_the_boundary_marked():
    fig = F.training_curves_figure(_history(3, 2), "trial 7")
    loss_ax, acc_ax = fig.axes
    for ax, name in ((loss_ax, "loss"), (acc_ax, "acc")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines[f"train {name}"].get_xdata()) == [1, 2, 3, 4, 5]
        assert list(lines[f"valid {name}"].get_xdata()) == [1, 2, 3, 4, 5]
        assert list(lines["phase 2 starts"].get_xdata()) == [3.5, 3.5]
        assert ax.get_xlabel() == "epoch (both phases)"
    assert list(loss_ax.get_lines()[1].get_ydata()) == pytest.approx([1.1, 0.55, 1.1 / 3, 0.3, 0.15])
    assert loss_ax.get_ylabel() == "cross-entropy loss" and acc_ax.get_ylabel() == "accuracy"
    assert {t.get_text() for t in acc_ax.texts} == {"phase 1: head only", "phase 2: fine-tune all"}
    only_phase1 = F.training_curves_figure(_history(2, 0), "pruned early")
    assert "phase 2 starts" not in [line.get_label() for line in only_phase1.axes[0].get_lines()]


class _LogitsInPixels(nn.Module):
    """A 'model' whose logits are the first row of the image's first channel."""

    def forward(self, x):
        return x[:, 0, 0, :]


def test_evaluation_keeps_the_most_confidently_wrong_images_across_batches():
    # 7 images, 3 classes; logits chosen so the wrong ones have known confidences.
    logits = torch.tensor([[5.0, 0, 0], [0, 4.0, 0], [0, 0, 1.0], [3.0, 0, 0], [0, 6.0, 0], [0, 0, 2.0], [1, 1.2, 0]])
    labels = torch.tensor([0, 2, 0, 1, 1, 1, 0])  # right: 0 and 4; wrong: 1, 2, 3, 5, 6
    images = torch.zeros(7, 3, 3, 3)
    images[:, 0, 0, :] = logits
    images[:, 1] = torch.arange(7).view(7, 1, 1)  # tells the images apart
    loader = [(images[i:i + 2], labels[i:i + 2]) for i in range(0, 7, 2)]
    ev = evaluate(_LogitsInPixels(), loader, torch.device("cpu"), keep_mistakes=3)
    conf = logits.softmax(1).max(1).values
    expected = sorted([1, 2, 3, 5, 6], key=lambda i: -conf[i])[:3]
    assert expected == [1, 3, 5]
    m = ev.mistakes
    assert m.targets == labels[expected].tolist() and m.preds == logits[expected].argmax(1).tolist()
    assert m.confidences == pytest.approx(conf[expected].tolist())
    assert m.images[:, 1, 0, 0].tolist() == expected  # the images themselves came along
    one = evaluate(_LogitsInPixels(), loader, torch.device("cpu"), keep_mistakes=1).mistakes  # < a batch
    assert one.targets == [labels[1].item()] and one.images[:, 1, 0, 0].tolist() == [1]
    everything = evaluate(_LogitsInPixels(), loader, torch.device("cpu"), keep_mistakes=16).mistakes
    assert len(everything) == 5  # only the wrong ones, however many were asked for
    assert evaluate(_LogitsInPixels(), loader, torch.device("cpu")).mistakes is None


def test_misclassified_grid_titles_and_pixels():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    pixels = np.random.default_rng(0).uniform(0, 1, size=(5, 3, 4, 4)).astype(np.float32)
    normalized = (pixels - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    m = Mistakes(normalized.astype(np.float32), [0, 1, 2, 3, 0], [1, 2, 3, 0, 2], [0.9, 0.8, 0.7, 0.6, 0.5])
    fig = F.misclassified_figure(m, CLASSES, mean, std, "worst")
    axes = fig.axes
    assert len(axes) == 8  # 2 rows of 4
    assert axes[0].get_title() == "true: ant\npred: bee (0.90)"
    assert axes[4].get_title() == "true: ant\npred: cat (0.50)"
    assert [bool(ax.images) for ax in axes] == [True] * 5 + [False] * 3
    np.testing.assert_allclose(np.asarray(axes[2].images[0].get_array()), pixels[2].transpose(1, 2, 0), atol=1e-5)
    empty = F.misclassified_figure(Mistakes(np.zeros((0, 3, 1, 1), np.float32), [], [], []), CLASSES, mean, std, "x")
    assert [t.get_text() for t in empty.axes[0].texts] == ["no misclassified images"]
