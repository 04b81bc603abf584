"""The sweep a competent engineer writes without this tool: the peer of `bench_cost.py`.

Stock Optuna (TPESampler + MedianPruner), nested MLflow runs (a parent, one child per trial),
a PIL loader over the folder's files, and the same design: phase 1 trains the head of a frozen
ImageNet backbone, phase 2 fine-tunes everything with a smaller backbone lr, early stopping on
validation accuracy; the design's four parameters (head_lr, backbone_lr_ratio, patience,
aug_strength). What it does not have is ours: no decode-once store, no feature cache (the frozen
backbone runs on every image in every phase-1 epoch), no phase-aligned pruning (one global epoch
count), no soup. It imports nothing from `src/` (tests/test_bench.py checks), and trains on the
same split (the file lists bench_cost.py hands it) so test accuracies compare.

Its Optuna study lives in `<out>/optuna.db` (study "handwired"), so a run asked for more trials
than it has goes on from the finished ones (a 2-4 hour peer can be measured in pieces): its
sampler is seeded with `seed + finished` so it draws new points, and its wall time is this run's
plus the earlier trials' own durations (their start-up between sessions is not counted again).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import torch
import torchvision
from torch import nn
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_split(root: Path, listed: Path | None = None) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(classes, split -> [(path, label)]): `listed` (a JSON of the files per split, what
    bench_cost.py hands over so both sweeps use one split), else the sealed split file of a flat
    folder, else its train/valid/test subfolders."""
    if listed is not None:
        doc = json.loads(listed.read_text())
        return doc["classes"], {part: [(p, int(y)) for p, y in doc[part]] for part in ("train", "valid", "test")}
    sealed = root / ".tlsweep-split.json"
    if sealed.is_file():
        doc = json.loads(sealed.read_text())
        classes = sorted({c for part in ("train", "valid", "test") for _, c in doc[part]})
        return classes, {part: [(str(root / rel), classes.index(c)) for rel, c in doc[part]]
                         for part in ("train", "valid", "test")}
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    return classes, {part: [(str(f), i) for i, c in enumerate(classes) for f in sorted((root / part / c).rglob("*"))
                            if f.suffix.lower() in IMG_EXTENSIONS] for part in ("train", "valid", "test")}


class Files(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return self.transform(default_loader(path)), label


def transform(level: str, size: int) -> T.Compose:
    """The five square levels, written as anyone would with torchvision."""
    side, norm = round(size / 0.875), [T.ToTensor(), T.Normalize(MEAN, STD)]
    flip = T.RandomHorizontalFlip()
    steps = {
        "none": [T.Resize(side), T.CenterCrop(size)],
        "light": [T.Resize(side), T.CenterCrop(side), T.RandomResizedCrop(size, scale=(0.6, 1)), flip],
        "seed": [T.Resize(side), T.CenterCrop(size), flip, T.RandomCrop(size, padding=8)],
        "medium": [T.Resize(side), T.CenterCrop(side), T.RandomResizedCrop(size, scale=(0.35, 1)), flip,
                   T.ColorJitter(0.2, 0.2, 0.2)],
        "strong": [T.Resize(side), T.CenterCrop(side), T.RandomResizedCrop(size, scale=(0.2, 1)), flip,
                   T.TrivialAugmentWide()],
    }[level]
    return T.Compose(steps + norm)


@dataclass
class Settings:
    data: Path
    backbone: str = "mobilenet_v2"
    weights: str = "DEFAULT"       # torchvision's enum name; "none": random init
    image_size: int = 128
    batch_size: int = 32
    max_epochs: int = 15           # per phase
    trials: int = 30
    seed: int = 0
    out: Path = Path("handwired-out")  # its MLflow store (sqlite) and the trials' best states
    split_file: Path | None = None     # the files per split (`read_split`); None: found in the folder


def build(settings: Settings, n_classes: int) -> tuple[nn.Module, nn.Module]:
    """(model, its head): the torchvision model with a new last layer."""
    weights = None if settings.weights == "none" else settings.weights
    model = torchvision.models.get_model(settings.backbone, weights=weights)
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, n_classes)
        return model, model.fc
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, n_classes)
    return model, model.classifier[-1]


def evaluate(model, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return right / max(total, 1)


def fit(model, head, params: dict, loaders, settings: Settings, trial, run_id: str) -> float:
    """Both phases; each epoch logged, reported to the pruner at the global epoch count."""
    best, best_state, step = 0.0, copy.deepcopy(model.state_dict()), 0
    for phase, lr_groups in ((1, [{"params": head.parameters(), "lr": params["head_lr"]}]),
                             (2, [{"params": head.parameters(), "lr": params["head_lr"]},
                                  {"params": [p for n, p in model.named_parameters() if not n.startswith(_head_name(model))],
                                   "lr": params["head_lr"] * params["backbone_lr_ratio"]}])):
        for p in model.parameters():
            p.requires_grad = phase == 2
        for p in head.parameters():
            p.requires_grad = True
        optimizer, since = torch.optim.Adam(lr_groups), 0
        for _ in range(settings.max_epochs):
            model.train()
            if phase == 1:  # the frozen backbone keeps its BatchNorm statistics
                for m in model.modules():
                    m.eval()
                head.train()
            for x, y in loaders["train"]:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            acc = evaluate(model, loaders["valid"])
            step += 1
            mlflow.log_metrics({"valid_acc": acc, "phase": phase}, step=step, run_id=run_id)
            if acc > best:
                best, best_state, since = acc, copy.deepcopy(model.state_dict()), 0
            else:
                since += 1
            trial.report(acc, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
            if since >= params["patience"]:
                break
        model.load_state_dict(best_state)
    path = settings.out / "states" / f"{run_id}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, path)
    trial.set_user_attr("state_path", str(path))
    return best


def _head_name(model) -> str:
    return "fc" if hasattr(model, "fc") else "classifier"


def run(settings: Settings) -> dict:
    """The whole hand-wired sweep, then its best trial scored once on test: its figures."""
    start = time.time()
    classes, split = read_split(settings.data, settings.split_file)
    settings.out.mkdir(parents=True, exist_ok=True)
    previous = mlflow.get_tracking_uri()
    try:
        return _sweep(settings, classes, split, f"sqlite:///{settings.out.resolve()}/mlflow.db", start)
    finally:
        mlflow.set_tracking_uri(previous)


def _sweep(settings: Settings, classes, split, uri: str, start: float) -> dict:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("handwired")
    eval_tf = transform("none", settings.image_size)
    valid = torch.utils.data.DataLoader(Files(split["valid"], eval_tf), batch_size=2 * settings.batch_size)
    study = optuna.create_study(direction="maximize", study_name="handwired", load_if_exists=True,
                                storage=f"sqlite:///{settings.out.resolve()}/optuna.db",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2))
    before = [t for t in study.trials if t.state.is_finished()]
    # A resumed study draws new points: the same seed again would repeat TPE's random startup draws.
    study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(before))
    with mlflow.start_run(run_name="handwired-sweep"):
        def objective(trial):
            params = {"head_lr": trial.suggest_float("head_lr", 1e-4, 1e-2, log=True),
                      "backbone_lr_ratio": trial.suggest_float("backbone_lr_ratio", 0.01, 1.0, log=True),
                      "patience": trial.suggest_int("patience", 2, 6),
                      "aug_strength": trial.suggest_categorical("aug_strength", ["none", "light", "seed", "medium",
                                                                                 "strong"])}
            torch.manual_seed(settings.seed * 1000 + trial.number)
            train = torch.utils.data.DataLoader(Files(split["train"], transform(params["aug_strength"],
                                                                               settings.image_size)),
                                                batch_size=settings.batch_size, shuffle=True)
            model, head = build(settings, len(classes))
            with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as run:
                mlflow.log_params(params)
                return fit(model, head, params, {"train": train, "valid": valid}, settings, trial,
                           run.info.run_id)

        study.optimize(objective, n_trials=max(0, settings.trials - len(before)))
        best = study.best_trial
        model, _ = build(settings, len(classes))
        model.load_state_dict(torch.load(best.user_attrs["state_path"], weights_only=True))
        test = torch.utils.data.DataLoader(Files(split["test"], eval_tf), batch_size=2 * settings.batch_size)
        test_acc = evaluate(model, test)
        mlflow.log_metric("test_acc", test_acc)
    done = [t for t in study.trials if t.state.is_finished()]
    trial_s = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    # done starts with `before` (trials are numbered in order); each trial's last step is its epoch count
    return {"wall_s": time.time() - start + sum(trial_s[:len(before)]), "trials": len(done),
            "epochs": sum(t.last_step or 0 for t in done),
            "best_valid": best.value, "test_acc": test_acc, "trial_s": trial_s, "startup_trials": 5}
