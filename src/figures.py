"""Figures of one model on one split, as files a user opens in the MLflow UI.

Each figure is built by a `*_figure` function (data in, matplotlib Figure out, nothing written:
what the tests inspect) and written by `save` (PNG). What a trial run gets (src/record.py):
  confusion/valid_phase{1,2}.{csv,png}  counts (CSV) and the row-normalized heatmap (PNG)
  figures/per_class_valid.{csv,png}    precision, recall, F1 and support per class
  figures/training_curves.png          loss and accuracy of both phases, phase boundary marked
  figures/misclassified_valid.png      the most confidently misclassified validation images
"""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
matplotlib.rcParams["text.parse_math"] = False  # a class named "cost_$_a_$" is text, not TeX
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

DPI = 100
VALUES_UP_TO = 30  # classes up to which each heatmap cell shows its value; beyond, colour only
NAMES_UP_TO = 200  # classes up to which every name is written on the axes; beyond, the size is capped


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# -- confusion ------------------------------------------------------------------------------
def confusion(targets, preds, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted; every class present even if never seen."""
    return confusion_matrix(targets, preds, labels=list(range(n_classes)))


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its class's count (a row of recalls and confusions), so a class with
    many images does not outshine one with few; a class with no images stays all zero."""
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)


def _class_font(n: int) -> float:
    return 10 if n <= 20 else max(7.0, 10 - n / 30)


def confusion_figure(cm: np.ndarray, classes, title: str):
    """Row-normalized heatmap, every class name on both axes: a 100-class matrix is drawn 0.22
    inch (22 px) per class with 7 pt names; the colour scale is a square root, so a 5%
    confusion is visible beside a 95% diagonal; cells show values up to VALUES_UP_TO classes."""
    n = len(classes)
    norm = normalize_rows(cm)
    side = max(5.0, 0.22 * min(n, NAMES_UP_TO) + 3)  # beyond NAMES_UP_TO: 47 inches, names left out
    fig, ax = plt.subplots(figsize=(side + 1, side), layout="constrained")
    image = ax.imshow(norm, cmap="Blues", norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.6, label="fraction of the true class")
    font = _class_font(n)
    if n <= NAMES_UP_TO:
        ax.set_xticks(range(n), labels=list(classes), rotation=90, fontsize=font)
        ax.set_yticks(range(n), labels=list(classes), fontsize=font)
    ax.set_xlabel("predicted class" + ("" if n <= NAMES_UP_TO else " (index; names in the CSV)"))
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\nrows normalized to 1 (recall on the diagonal); {int(cm.sum())} images")
    if n <= VALUES_UP_TO:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=font - 1,
                    color="white" if norm[i, j] > 0.4 else "black")
    return fig


def write_confusion(cm: np.ndarray, classes, stem: Path, title: str) -> list[Path]:
    """Write `<stem>.csv` (counts, class names as header and first column) and `<stem>.png`
    (the row-normalized heatmap)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path = stem.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, cm):
            w.writerow([name, *row.tolist()])
    return [csv_path, save(confusion_figure(cm, classes, title), stem.with_suffix(".png"))]


# -- per class ------------------------------------------------------------------------------
def per_class_report(targets, preds, classes) -> list[dict]:
    """Precision, recall, F1 and support per class."""
    p, r, f1, support = precision_recall_fscore_support(
        targets, preds, labels=list(range(len(classes))), zero_division=0)
    return [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
             "support": int(support[i])} for i, c in enumerate(classes)]


def write_report(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        w.writerows(rows)
    return path


METRICS = ("precision", "recall", "f1")


def per_class_figure(rows: list[dict], title: str):
    """Horizontal bars of precision, recall and F1 per class, worst F1 at the top (where a
    reader starts), support in the label; classes with no images in the split go to the
    bottom (they have no score, not a bad one)."""
    # barh draws bottom-up: the first row is the bottom bar.
    rows = sorted(rows, key=lambda r: (r["support"] > 0, -r["f1"], r["class"]))
    n = len(rows)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.3 * n + 1.5)), layout="constrained")
    height = 0.8 / len(METRICS)
    for k, metric in enumerate(METRICS):
        ax.barh(np.arange(n) + (k - 1) * height, [r[metric] for r in rows], height=height, label=metric)
    ax.set_yticks(range(n), labels=[f"{r['class']} (n={r['support']})" if r["support"] else
                                    f"{r['class']} (no images)" for r in rows], fontsize=_class_font(n))
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.set_title(f"{title}\nworst F1 at the top")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


# -- training curves ------------------------------------------------------------------------
def training_curves_figure(history, title: str):
    """Loss and accuracy, train and valid, against the phase-aligned step of both phases (EpochResult
    records: phase, step, train/valid loss and acc); a dashed line marks where phase 2 begins."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    steps = [r.step for r in history]
    for ax, name in ((loss_ax, "loss"), (acc_ax, "acc")):
        ax.plot(steps, [getattr(r, f"train_{name}") for r in history], "o-", label=f"train {name}")
        ax.plot(steps, [getattr(r, f"valid_{name}") for r in history], "s-", label=f"valid {name}")
        ax.set_xlabel("epoch (both phases)")
        ax.set_ylabel("accuracy" if name == "acc" else "cross-entropy loss")
        phase2 = [r.step for r in history if r.phase == 2]
        if phase2:
            ax.axvline(phase2[0] - 0.5, color="grey", linestyle="--", label="phase 2 starts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc_ax.set_ylim(0, 1.02)
    for phase, label in ((1, "phase 1: head only"), (2, "phase 2: fine-tune all")):
        at = [r.step for r in history if r.phase == phase]
        if at:
            acc_ax.text((at[0] + at[-1]) / 2, 0.03, label, ha="center", fontsize=8, color="grey")
    fig.suptitle(title)
    return fig


# -- misclassified images -------------------------------------------------------------------
def misclassified_figure(mistakes, classes, mean, std, title: str, columns: int = 4):
    """A grid of the mistakes (src.train.Mistakes), most confident first, each titled with its
    true and predicted class and the predicted class's probability."""
    n = len(mistakes)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.6), squeeze=False,
                             layout="constrained")
    shown = np.clip(mistakes.images.transpose(0, 2, 3, 1) * np.asarray(std) + np.asarray(mean), 0, 1) if n else []
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < n:
            ax.imshow(shown[k])
            ax.set_title(f"true: {classes[mistakes.targets[k]]}\npred: {classes[mistakes.preds[k]]} "
                         f"({mistakes.confidences[k]:.2f})", fontsize=8, color="firebrick")
    if not n:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title)
    return fig
