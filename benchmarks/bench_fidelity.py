"""Does a smaller image size rank configurations as the full size does, and for how much less?
The measurement behind the default `search_size` (docs/sweep-files.md, Search size).

    python benchmarks/bench_fidelity.py --data ~/data/openclipart --backbone mobilenet_v2 \\
        --sizes 64 96 128 --configs 8 --max-epochs 15 --out ~/fidelity

`--configs` configurations are drawn at random (seeded) from the sweep file's search space, and
each is trained at every size of `--sizes` through the product's own code (the pipeline, its
caches and the recipe a trial runs: `confirm.train_on_fold`, unpruned), with the same seed at
every size, on the folder's train split, judged on its valid split (the test split is never
read); the smaller sizes augment as a sweep's trials do, with the largest size's pixel shifts
scaled (`Pipeline(aug_side=)`). Rows go to `--out/results.jsonl` as each training ends; a rerun
with the same settings (more sizes below the largest may be added) skips those, one with other
settings or another largest size is refused. Prints per
size the mean wall time of a training and the valid accuracy of each configuration, then per
smaller size S against the largest F:
    fidelity spearman_<S>_vs_<F> <rho>   rank agreement of the configurations' valid accuracies
    fidelity cost_<S>_vs_<F> <x>         mean wall time of a training at S / at F
    fidelity top1_<S>_vs_<F> <0|1>       whether S's best configuration is F's best

`--warm-epochs E` adds, for the smallest size S, the model trained at S and then fine-tuned at the
largest size F for E more phase-2 epochs, as `--full-epochs E` does (`confirm_jobs.fine_tune`,
shared: its own phase-2 learning rates; progressive resizing), the best of those E epochs kept
(each epoch's valid accuracy is in the row, and epoch 0, the S model judged at F untouched):
    fidelity warm<E>_vs_<F> <acc difference>  mean valid accuracy, warm-started minus trained at F
    fidelity warm_cost_vs_<F> <x>             wall of the E epochs at F / of a training at F
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src import data as D, search_space  # noqa: E402
from src.config import TrialConfig, load_sweep  # noqa: E402
from src.confirm import train_on_fold  # noqa: E402
from src.confirm_jobs import fine_tune  # noqa: E402
from src.device import pick_device  # noqa: E402
from src.pipeline import Pipeline  # noqa: E402
from src.stats import spearman  # noqa: E402
from src.study import derive_seed  # noqa: E402
from src.train import evaluate, fit_two_phase, recipe  # noqa: E402


def draw_configs(sweep_file: Path, n: int, seed: int) -> list[dict]:
    search = load_sweep(sweep_file).search
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [search_space.sample(study.ask(), search) for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--sweep", type=Path, default=Path("sweeps/default.toml"))
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--configs", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-epochs", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("fidelity-out"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: str(v) for k, v in vars(args).items() if k not in ("sizes", "out", "warm_epochs")}  # what the rows depend on
    setup["aug_side"] = str(max(args.sizes))  # the smaller sizes' pixel shifts are this size's, scaled
    recorded = args.out / "setup.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != setup:
        raise SystemExit(f"{args.out} holds rows of another setup ({recorded}); pass another --out")
    recorded.write_text(json.dumps(setup, indent=1))
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["size"], r["config"]) for r in rows}
    configs = draw_configs(args.sweep, args.configs, args.seed)
    (args.out / "configs.json").write_text(json.dumps(configs, indent=1))
    splits = D.find_splits(args.data, seed=args.seed)
    fixed = replace(load_sweep(args.sweep).fixed, backbone=args.backbone, weights=args.weights,
                    max_epochs_phase1=args.max_epochs, max_epochs_phase2=args.max_epochs,
                    batch_size=args.batch_size, seed=args.seed, search_size=0)
    device = pick_device("auto")
    sizes, warm = sorted(args.sizes), f"warm{args.warm_epochs}"
    pipes: dict[int, Pipeline] = {}

    def pipe_at(size: int) -> Pipeline:
        if size not in pipes:  # one starting model for every size
            base = next(iter(pipes.values())).base if pipes else None
            pipes[size] = Pipeline(splits=splits, fixed=replace(fixed, image_size=size), weights=args.weights,
                                   device=device, base=base, aug_side=sizes[-1])  # as a sweep's trials
        return pipes[size]

    def add(row: dict) -> None:
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"size {row['size']} config {row['config']}: valid {row['valid_acc']:.4f}, {row['wall_s']:.0f} s",
              flush=True)

    for size in sizes:
        arms = [size] + ([warm] if args.warm_epochs and size == sizes[0] else [])
        for i, sampled in enumerate(configs):
            if all((arm, i) in done for arm in arms):
                continue
            pipe = pipe_at(size)
            cfg = TrialConfig.build(pipe.fixed, sampled, weights=args.weights, seed=derive_seed(args.seed, i),
                                    classes=splits.classes)
            if len(arms) == 1:
                start = time.time()
                acc = train_on_fold(pipe, cfg, lambda rec: None, None)
                add({"size": size, "config": i, "valid_acc": acc, "wall_s": time.time() - start, "params": sampled})
            else:
                for row in warm_started(pipe, pipe_at(sizes[-1]), cfg, args.warm_epochs, device):
                    if (row["size"], i) not in done:  # the small size's row may be there from a run without warm
                        add({**row, "config": i, "params": sampled})
    report(rows, sizes, len(configs), warm if args.warm_epochs else None)
    return 0


def warm_started(small: Pipeline, full: Pipeline, cfg: TrialConfig, epochs: int, device) -> list[dict]:
    """The configuration trained at the small size (as `train_on_fold` does), then its phase 2
    continued at the full size for `epochs` epochs: a row for each."""
    start = time.time()
    model = small.model(cfg.seed)
    data = small.loaders(cfg, model)
    _, phase2 = fit_two_phase(model, data.train, data.valid, **recipe(cfg), device=device, phase1=data.phase1,
                              phase2=data.phase2)
    trained = {"size": small.fixed.image_size, "valid_acc": phase2.best_valid_acc, "wall_s": time.time() - start}
    start = time.time()
    train, valid = full.image_loaders(cfg)
    untouched = evaluate(model, valid, device, None, 0).acc
    result = fine_tune(model, train, valid, cfg, epochs, device)
    accs = [untouched] + [r.valid_acc for r in result.history]  # epoch 0 shown, not a candidate (as in the product)
    return [trained, {"size": f"warm{epochs}", "valid_acc": result.best_valid_acc, "epoch_accs": accs,
                      "wall_s": time.time() - start}]


def report(rows: list[dict], sizes: list[int], n: int, warm: str | None = None) -> None:
    acc = {(r["size"], r["config"]): r["valid_acc"] for r in rows}
    arms = sizes + ([warm] if warm else [])
    wall = {s: np.mean([r["wall_s"] for r in rows if r["size"] == s]) for s in arms}
    for s in arms:
        print(f"size {s:>4}: mean wall {wall[s]:.0f} s; valid " + " ".join(f"{acc[(s, i)]:.3f}" for i in range(n)))
    full = sizes[-1]
    for s in sizes[:-1]:
        xs, ys = [acc[(s, i)] for i in range(n)], [acc[(full, i)] for i in range(n)]
        rho = spearman(xs, ys)
        print(f"fidelity spearman_{s}_vs_{full} {'nan' if rho is None else f'{rho:.3f}'}")
        print(f"fidelity cost_{s}_vs_{full} {wall[s] / wall[full]:.3f}")
        print(f"fidelity top1_{s}_vs_{full} {int(int(np.argmax(xs)) == int(np.argmax(ys)))}")
    if warm:
        gap = np.mean([acc[(warm, i)] - acc[(full, i)] for i in range(n)])
        print(f"fidelity {warm}_vs_{full} {gap:+.4f}")
        print(f"fidelity warm_cost_vs_{full} {wall[warm] / wall[full]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
