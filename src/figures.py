"""Confusion matrices and per-class reports as files (PNG heatmap with class names, CSV)."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (ConfusionMatrixDisplay, confusion_matrix,  # noqa: E402
                             precision_recall_fscore_support)


def confusion(targets, preds, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted; every class present even if never seen."""
    return confusion_matrix(targets, preds, labels=list(range(n_classes)))


def write_confusion(cm: np.ndarray, classes, stem: Path, title: str) -> list[Path]:
    """Write `<stem>.csv` (counts, class names as header and first column) and `<stem>.png`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, cm):
            w.writerow([name, *row.tolist()])
    side = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, include_values=len(classes) <= 30, xticks_rotation=90)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [csv_path, png_path]


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
