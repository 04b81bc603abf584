"""CLI: label image files with a sweep's model.

    python -m src.predict --model URI PATH... --out preds.csv [--top-k K] [--batch-size N]
                          [--device cpu|cuda|auto] [--tracking-uri URI]

URI: `models:/NAME@alias` or `models:/NAME/VERSION` (a registered model, src/registry.py), a
sweep's parent run id (the model its final test scored; an unscored sweep is refused with the
command that scores it) or a trial, full-size, soup or ensemble run id. PATH: image files, or
folders searched recursively for every image the data loader accepts (extensions in
`splits.IMAGE_EXTS`). The CSV (written atomically) has `path,label,probability`, then
`label_2,probability_2` ... up to `--top-k`, one row per readable file, in the order given
(folders sorted). Unreadable files are listed on stderr and counted, never a crash; the exit
status is 0 if any file was labelled, 1 if none could be, 2 for a bad argument. Preprocessing and
arithmetic are the final test's (its evaluation transform, fp32), so over a sweep's test folder
the labels are the final test's.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import data as D
from .device import pick_device
from .errors import UserError
from .files import write_atomic
from .splits import IMAGE_EXTS
from .registry import load_model
from .tracking import Tracker


def find_images(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            if not inside:
                raise UserError(f"folder {path} has no images (extensions {sorted(IMAGE_EXTS)}); give image "
                                f"files or a folder that holds some")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders")
    return found


def predict(model: torch.nn.Module, config: dict, files: list[Path], batch_size: int, device: torch.device,
            top_k: int = 1, progress: bool = False) -> tuple[list[tuple[int, list, list]], dict[str, str]]:
    """([(file index, top-k class indices, their probabilities)], {unreadable file: reason})."""
    transform = D.eval_transform(config)
    entries = [(str(f.resolve()), i) for i, f in enumerate(files)]  # the label slot carries the file's index
    bad = D.BadImageLog("input", len(entries), 1.0)
    batches = D.skipping_loader(Path("/"), entries, transform, batch_size, False, bad)
    model = model.to(device).eval()
    rows = []
    with torch.no_grad():
        for images, index in tqdm(batches, desc="predict", unit="batch", disable=not progress):
            probs = torch.softmax(model(images.to(device)).float(), 1)
            top = torch.topk(probs, top_k, dim=1)
            rows += zip(index.tolist(), top.indices.tolist(), top.values.tolist())
    return rows, bad.found


def write_csv(out: Path, rows, files: list[Path], classes: list[str], top_k: int) -> None:
    header = ["path", "label", "probability"] + [f"{c}_{k}" for k in range(2, top_k + 1) for c in ("label", "probability")]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, labels, probs in rows:
                w.writerow([str(files[i])] + [v for c, p in zip(labels, probs) for v in (classes[c], f"{p:.6f}")])
    write_atomic(out, write)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, or a run id")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="the CSV to write")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's own)")
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size}: give at least 1")
        if not args.out.parent.is_dir():
            raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist; create it or write elsewhere")
        files = find_images(args.paths)
        device = pick_device(args.device)
        tracker = Tracker(args.tracking_uri)
        model, config = load_model(args.model, tracker)
        classes = list(config["classes"])
        if not 1 <= args.top_k <= len(classes):
            raise UserError(f"--top-k {args.top_k}: give 1 to {len(classes)} (the model's classes)")
        rows, bad = predict(model, config, files, args.batch_size, device, args.top_k, sys.stderr.isatty())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, why in bad.items():
        print(f"unreadable: {path} ({why})", file=sys.stderr)
    if not rows:
        print(f"error: none of the {len(files)} file(s) could be read as an image; nothing written", file=sys.stderr)
        return 1
    write_csv(args.out, rows, files, classes, args.top_k)
    print(f"{len(rows)} file(s) labelled -> {args.out}" + (f"; {len(bad)} unreadable (listed above)" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
