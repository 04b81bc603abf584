"""What a sweep costs against a hand-wired one and against one run of the seed recipe, side by
side on one image folder.

    python benchmarks/bench_cost.py --data ~/data/openclipart --backbone mobilenet_v2 \\
        --image-size 128 --max-epochs 15 --trials 30 --handwired-trials 8 --out ~/cost

Arms, each on its own stores under `--out`, each winner scored once on the folder's one test split:
- `ours`: `python -m src.sweep` with `--sweep` (default `sweeps/default.toml`; tool against tool),
  `--trials` trials, plus `--sweep-flags` (e.g. `--search-size 64`);
- `recipe`: `sweeps/seed-recipe.toml` through the product (one run);
- `handwired`: `benchmarks/handwired.py` (stock Optuna TPE + MedianPruner, nested MLflow runs, a
  PIL loop that runs the frozen backbone every phase-1 epoch, the design's four parameters), for
  `--handwired-trials` trials (default `--trials`); with fewer, each missing trial is costed at
  the mean of its trials after the MedianPruner's 5 startup trials (which can be pruned, as the
  missing ones would be), or at its mean trial when it ran no more than those (said in the output:
  its per-trial cost, not its search, is measured; `scale_peer`). A rerun with more
  `--handwired-trials` than its row has goes on from the peer's finished trials (its Optuna study
  is kept in `--out/handwired/optuna.db`) and appends a new row, which is the one reported.
Each arm starts on an empty cache of its own (`--out/cache-<arm>`, removed after it: a first
sweep on a folder, decoding, feature views and the precision choice included). `--arms` runs only some (the peer alone first; more study seeds of ours, each in its own `--out`).
`--sweep-flags` reach our sweep only (the recipe runs as it is). Rows go to `--out/results.jsonl`
as each arm ends; a rerun skips the arms there. Prints per arm wall time, epochs (of the trials:
with a search size, the full-size trainings after them are in the wall time, not here), best valid
(of the trials, at their size) and test accuracy, then
    ratio sweep_vs_handwired_wall <x>   ours / handwired (scaled to --trials)
    ratio sweep_vs_recipe_wall <x>      ours / recipe
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_quality import run_arm  # noqa: E402
import handwired  # noqa: E402
sys.path.insert(0, str(HERE.parent))
from src.data import find_splits  # noqa: E402

ARMS = ("ours", "recipe", "handwired")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--sweep", default="sweeps/default.toml")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet", help="imagenet | none (both arms)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-epochs", type=int, default=15)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--handwired-trials", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("cost-out"))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="run only these (e.g. the slow peer alone first, or more study seeds of ours in other --out)")
    p.add_argument("--sweep-flags", nargs=argparse.REMAINDER, default=[], help="passed to our src.sweep runs")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    peer_trials = args.handwired_trials or args.trials
    common, ours_only = ["--weights", args.weights, "--batch-size", str(args.batch_size)], args.sweep_flags
    results = args.out / "results.jsonl"
    rows = {r["arm"]: r for r in map(json.loads, results.read_text().splitlines())} if results.is_file() else {}
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for arm in ARMS:
        more_peer = arm == "handwired" and arm in rows and rows[arm]["trials"] < peer_trials
        if (arm in rows and not more_peer) or arm not in args.arms:
            continue
        cache = args.out / f"cache-{arm}"  # every arm starts cold, as a first sweep on a folder does
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["TLSWEEP_CACHE"] = str(cache)
        if arm == "handwired":
            settings = handwired.Settings(data=args.data, backbone=args.backbone,
                                          weights="DEFAULT" if args.weights == "imagenet" else "none",
                                          image_size=args.image_size, batch_size=args.batch_size,
                                          max_epochs=args.max_epochs, trials=peer_trials, seed=args.seed,
                                          out=args.out / "handwired", split_file=write_split(args))
            row = {"arm": arm, **handwired.run(settings), "settings": {k: str(v) for k, v in asdict(settings).items()}}
        else:
            sweep_file, trials = (args.sweep, args.trials) if arm == "ours" else ("sweeps/seed-recipe.toml", 1)
            args.sweep_flags = common + (ours_only if arm == "ours" else [])  # the recipe as it is
            got = run_arm(arm, sweep_file, trials, args.seed, args)
            row = {"arm": arm, **{k: got[k] for k in ("wall_s", "epochs", "best_valid", "test_acc")}, "trials": trials}
        shutil.rmtree(cache, ignore_errors=True)
        rows[arm] = row
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{arm}: wall {row['wall_s']:.0f} s, test acc {row['test_acc']:.4f}", flush=True)
    report(rows, args.trials)
    return 0


def write_split(args) -> Path:
    """The split our sweeps used (sealed in the folder by the first), as file lists for the peer."""
    splits = find_splits(args.data, seed=args.seed)
    path = args.out / "split.json"
    path.write_text(json.dumps({"classes": list(splits.classes), **{
        part: [[str(Path(splits.root) / rel), label] for rel, label in getattr(splits, part)]
        for part in ("train", "valid", "test")}}))
    return path


def report(rows: dict, trials: int) -> None:
    """Each arm's figures, then each ratio whose two arms are in `rows`."""
    for arm, r in rows.items():
        valid = "n/a" if r.get("best_valid") is None else f"{r['best_valid']:.4f}"
        print(f"{arm:>10}: {r['trials']} trial(s), wall {r['wall_s']:.0f} s, epochs {r['epochs']}, best valid "
              f"{valid}, test acc {r['test_acc']:.4f}")
    if "ours" in rows and "handwired" in rows:
        print(f"ratio sweep_vs_handwired_wall {rows['ours']['wall_s'] / scale_peer(rows['handwired'], trials):.3f}")
    if "ours" in rows and "recipe" in rows:
        print(f"ratio sweep_vs_recipe_wall {rows['ours']['wall_s'] / rows['recipe']['wall_s']:.3f}")


def scale_peer(peer: dict, trials: int) -> float:
    """The peer's wall time for `trials` trials when it ran fewer: its own wall, plus each missing
    trial at the mean cost of its trials after the MedianPruner's startup trials (those can be
    pruned, as the missing ones would be); with none after the startup, at its mean trial cost."""
    if peer["trials"] >= trials:
        return peer["wall_s"]
    after = peer.get("trial_s", [])[peer.get("startup_trials", 0):]
    each = sum(after) / len(after) if after else peer["wall_s"] / peer["trials"]
    scaled = peer["wall_s"] + (trials - peer["trials"]) * each
    how = (f"its {len(after)} trial(s) after the pruner's startup" if after else
           "its mean trial, none of which could be pruned (an upper bound: run more --handwired-trials)")
    print(f"handwired ran {peer['trials']} of {trials} trials: its wall time scaled to {scaled:.0f} s, each "
          f"missing trial costed as {how} ({each:.0f} s); its search over {trials} trials is not measured")
    return scaled



if __name__ == "__main__":
    sys.exit(main())
