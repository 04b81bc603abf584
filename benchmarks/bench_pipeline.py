"""Side-by-side speed of the sweep's caches, in one process on the same data.

    python benchmarks/bench_pipeline.py                 # generated photos, about 5 min on 2 CPU cores
    python benchmarks/bench_pipeline.py --data DIR      # any image folder (either layout)

Prints one line per figure, then one machine-readable line per ratio:
    ratio phase1_cache_speedup <x>        phase-1 epoch, recomputing the backbone / cached features
    ratio phase2_vs_compute_bound <x>     phase-2 images/s, our pipeline / synthetic in-memory tensors
    ratio phase2_vs_imagefolder <x>       phase-2 images/s, our pipeline / ImageFolder + PIL transforms
    ratio sweep_cache_speedup <x>         whole short sweep wall time, caches off / caches on
Also: epochs a sweep spent with pruning vs the same sweep without, and the ceiling on the
whole-sweep ratio (phase-2 fine-tuning, which no cache removes, at the compute bound).
The generated data are JPEG photos of 500x375 (a typical ImageNet photo size), 10 classes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src import data as D, model as M, sweep  # noqa: E402
from src.config import Fixed, TrialConfig  # noqa: E402
from src.device import pick_device  # noqa: E402
from src import precision  # noqa: E402
from src.features import ViewEpochs  # noqa: E402
from src.pipeline import Pipeline  # noqa: E402
from src.tracking import Tracker  # noqa: E402
from src.train import evaluate, make_optimizer, train_epoch  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def generate(root: Path, classes: int = 10, per_class: int = 80, size=(500, 375)) -> Path:
    """Noisy photos whose class shows in colour and shape size, in a train/valid/test layout."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        hue = np.array([100 + c * 6, 120 - c * 4, 110 + (c % 3) * 10])
        for i in range(per_class):
            split = "train" if i < per_class * 0.7 else ("valid" if i < per_class * 0.85 else "test")
            base = (hue + rng.normal(0, 70, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
            im = Image.fromarray(base)
            draw = ImageDraw.Draw(im)
            for _ in range(3):
                r = 30 + c * 6 + int(rng.integers(-15, 15))
                x, y = rng.integers(0, size[0] - r), rng.integers(0, size[1] - r)
                draw.ellipse([x, y, x + r, y + r], fill=tuple(int(v) for v in 255 - hue))
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            im.save(root / split / f"class{c}" / f"{i:04d}.jpg", quality=90)
    return root


def timed(fn, repeats: int = 2) -> float:
    """Best of `repeats` wall times: the machine is noisy, the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def trial_config(pipeline: Pipeline, level: str) -> TrialConfig:
    f = pipeline.fixed
    return TrialConfig(f.backbone, "none", f.image_size, f.batch_size, 1, 1, 1.0, 1e-3, 0.1, 3, level, 0,
                       tuple(pipeline.splits.classes))


def phase1_epochs(splits, fixed, device) -> float:
    """One phase-1 epoch (train + valid) on decoded-once images: recomputing the frozen backbone
    vs training the head on cached features. Isolates the feature cache from decode-once."""
    seconds = {}
    pipeline = Pipeline(splits=splits, fixed=fixed, weights="none", device=device, loader_workers=0)
    cfg = trial_config(pipeline, "light")
    for use_cache in (False, True):
        model = pipeline.model(0).to(device)
        data = pipeline.loaders(cfg, model)
        module, train, valid = data.phase1.module, data.phase1.train, data.phase1.valid
        if not use_cache:  # the same views, from the stored images, through the whole model
            views = D.loader(pipeline._dataset("train", "light", True), fixed.batch_size, True, cfg.seed)
            module, train, valid = model, ViewEpochs(views), data.valid
        M.freeze_backbone(model)
        opt = make_optimizer(M.param_groups(module, 1e-3))

        def epoch():
            train.epoch = 0  # the same view every time: its features are cached after the first pass
            train_epoch(module, train, opt, device)
            evaluate(module, valid, device)

        epoch()  # warm-up; fills the view-0 and validation features when caching
        seconds[use_cache] = timed(epoch)
        print(f"phase-1 epoch, {'cached features' if use_cache else 'recomputing the backbone'}: "
              f"{seconds[use_cache]:.3f} s")
    return seconds[False] / seconds[True]


def imagefolder_loader(splits, fixed, workers: int):
    """The tutorial pipeline: ImageFolder + PIL transforms + DataLoader, on the same train files."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(fixed.image_size, scale=(0.6, 1.0)),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    folder = datasets.ImageFolder(str(splits.root), transform=tf)
    index = {os.path.relpath(p, splits.root): i for i, (p, _) in enumerate(folder.samples)}
    subset = torch.utils.data.Subset(folder, [index[rel] for rel, _ in splits.train])
    return torch.utils.data.DataLoader(subset, batch_size=fixed.batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True)


def phase2_throughput(splits, fixed, device) -> tuple[float, float, float]:
    """Fine-tuning images/s from three sources, all in the sweep's default precision."""
    amp = precision.pick(device, "auto", fixed.backbone, fixed.image_size, fixed.batch_size)
    pipeline = Pipeline(splits=splits, fixed=fixed, weights="none", device=device)
    ours = pipeline.loaders(trial_config(pipeline, "light"), pipeline.model(0)).train
    n_batches = len(ours)
    images = n_batches * fixed.batch_size
    # A few fixed batches, cycled: the compute bound without holding an epoch of tensors in RAM.
    few = [(torch.randn(fixed.batch_size, 3, fixed.image_size, fixed.image_size),
            torch.randint(0, len(splits.classes), (fixed.batch_size,))) for _ in range(4)]
    synthetic = [few[i % len(few)] for i in range(n_batches)]
    tutorial = imagefolder_loader(splits, fixed, pipeline.workers)
    model = pipeline.model(0).to(device)
    M.unfreeze(model)
    opt = make_optimizer(M.param_groups(model, 1e-4, 1e-5))
    train_epoch(model, synthetic[:3], opt, device, amp)  # warm-up
    sources = {"synthetic in-memory tensors (compute bound)": synthetic, "our pipeline": ours,
               "ImageFolder + PIL transforms": tutorial}
    best = {name: float("inf") for name in sources}
    for _ in range(3):  # interleaved rounds: a slow spell of this noisy machine hits every source
        for name, source in sources.items():
            best[name] = min(best[name], timed(lambda: train_epoch(model, source, opt, device, amp), 1))
    rates = {name: images / seconds for name, seconds in best.items()}
    for name, rate in rates.items():
        print(f"phase-2 training, {name}: {rate:.1f} images/s")
    ours_rate, bound = rates["our pipeline"], rates["synthetic in-memory tensors (compute bound)"]
    return ours_rate / bound, ours_rate / rates["ImageFolder + PIL transforms"], bound


def phase2_images(tracking_uri: str, parent_id: str, images_per_epoch: int) -> int:
    """Images the sweep's trials fine-tuned on (phase-2 epochs, from each trial's per-epoch
    `phase` metric, times full batches per epoch)."""
    tracker = Tracker(tracking_uri)
    epochs = sum(m.value == 2 for run in tracker.children(parent_id)
                 for m in tracker.client.get_metric_history(run.info.run_id, "phase"))
    return epochs * images_per_epoch


def one_sweep(data: Path, args, work: Path, name: str, *flags: str):
    """(wall seconds, SweepResult) of a sweep with its own fresh stores and cache."""
    os.environ["TLSWEEP_CACHE"] = str(work / f"cache-{name}")
    os.chdir(work)
    argv = ["--data", str(data), "--trials", str(args.trials), "--weights", "none",
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--max-epochs", str(args.sweep_epochs), "--study-name", name,
            "--storage", f"sqlite:///{work}/optuna-{name}.db", "--tracking-uri", f"sqlite:///{work}/mlflow-{name}.db"]
    start = time.perf_counter()
    result = sweep.run_sweep(sweep.parse_args(argv + list(flags)))
    return time.perf_counter() - start, result


def whole_sweeps(data: Path, args, work: Path, compute_bound: float, n_train: int) -> float:
    """The same short sweep with caches on, off, and on without pruning; fresh stores and
    caches each time. Phase 2 (fine-tuning everything) is the part no cache can remove; at the
    compute bound it sets a ceiling on the whole-sweep speedup, printed beside it."""
    runs = {"caches on": one_sweep(data, args, work, "cached"),
            "caches off": one_sweep(data, args, work, "uncached", "--no-cache"),
            "caches on, no pruning": one_sweep(data, args, work, "unpruned", "--no-prune")}
    for label, (seconds, result) in runs.items():
        value = "-" if result.best_value is None else f"{result.best_value:.4f}"
        print(f"{args.trials}-trial sweep, {label}: {seconds:.1f} s, best trial {result.best_trial_number} "
              f"(valid acc {value}), {result.epochs_spent} epochs")
    (on, cached), (off, uncached), (_, unpruned) = runs.values()
    print(f"same best trial with and without caches: {cached.best_trial_number == uncached.best_trial_number}")
    print(f"pruning: {cached.epochs_spent} epochs spent vs {unpruned.epochs_spent} without pruning")
    per_epoch = n_train // args.batch_size * args.batch_size
    floor = phase2_images(f"sqlite:///{work}/mlflow-cached.db", cached.parent_run_id, per_epoch) / compute_bound
    print(f"phase-2 fine-tuning in the sweep: {floor:.1f} s at the compute bound, so no cache can make "
          f"this sweep more than {off / floor:.2f}x faster; caches on spent {on - floor:.1f} s on the rest "
          f"(feature views, validation, start-up, logging)")
    return off / on


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="image folder (default: generate 800 photos)")
    p.add_argument("--image-size", type=int, default=64, help="crop side in pixels (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--trials", type=int, default=8, help="trials per whole sweep (default 8)")
    p.add_argument("--sweep-epochs", type=int, default=3, help="max epochs per phase in the sweeps (default 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="tlsweep-bench-") as tmp:
        work = Path(tmp)
        os.environ["TLSWEEP_CACHE"] = str(work / "cache-micro")
        data = args.data or generate(work / "photos")
        splits = D.find_splits(data)
        fixed = Fixed(backbone="resnet18", weights="none", image_size=args.image_size,
                      batch_size=args.batch_size, seed=0)
        print(f"data {data}: {len(splits.train)} train / {len(splits.valid)} valid images, "
              f"{len(splits.classes)} classes; resnet18 at {args.image_size} px on {device}, "
              f"{torch.get_num_threads()} threads; fine-tuning in "
              f"{precision.name(precision.pick(device, 'auto', fixed.backbone, fixed.image_size, fixed.batch_size))}")
        p1 = phase1_epochs(splits, fixed, device)
        vs_compute, vs_folder, compute_bound = phase2_throughput(splits, fixed, device)
        whole = whole_sweeps(data, args, work, compute_bound, len(splits.train))
    print(f"ratio phase1_cache_speedup {p1:.2f}")
    print(f"ratio phase2_vs_compute_bound {vs_compute:.2f}")
    print(f"ratio phase2_vs_imagefolder {vs_folder:.2f}")
    print(f"ratio sweep_cache_speedup {whole:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
