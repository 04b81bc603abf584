"""Which winner rule would have scored best on test, for finished sweeps: an after-the-fact analysis.

    python benchmarks/bench_rules.py ~/quality/transfer-seed0 ~/quality/transfer-seed1 [--top 8]

Each argument is a folder holding a sweep's `mlflow.db` (as `bench_quality.py` leaves them). The
`--top` best completed trials' phase-2 checkpoints are evaluated (fp32, the evaluation transform,
as `src.final_test` does) on the validation and the test split the parent recorded, and per sweep
it prints the test accuracy of: the best trial alone, with a horizontal-flip test-time average,
uniform ensembles of the best 2 / 3 / 5 / `--top` (class probabilities averaged, as
`model.Ensemble`), and a greedy ensemble (from the best 5, a model added when validation accuracy
does not drop). This reads the TEST split of every sweep it is given, for several rules at once:
a rule chosen by it is chosen on test, so check it on a sweep run after it was fixed (docs/quality-and-cost.md
says which were which). The product itself never does this; it chooses on validation
(src/winner.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from src import data as D  # noqa: E402
from src import model as M  # noqa: E402
from src.tracking import MLFLOW_PARENT_RUN_ID, ROLE, Tracker  # noqa: E402


def probabilities(folder: Path, top: int) -> dict:
    """Per split, the labels and each of the `top` best trials' probabilities (plain and flipped)."""
    tracker = Tracker(f"sqlite:///{folder}/mlflow.db")
    runs = [r for e in tracker.client.search_experiments() for r in tracker.client.search_runs([e.experiment_id],
                                                                                              max_results=5000)]
    parent = next(r for r in runs if r.data.tags.get(ROLE) == "parent")
    split = tracker.load_json(parent.info.run_id, "dataset/split.json")
    trials = [r for r in runs if r.data.tags.get(ROLE) == "trial" and r.info.status == "FINISHED"
              and r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id
              and "phase2/best_valid_acc" in r.data.metrics]
    trials.sort(key=lambda r: (-r.data.metrics["phase2/best_valid_acc"], int(r.data.tags["optuna.trial_number"])))
    out = {"valid": {"p": [], "flip": []}, "test": {"p": [], "flip": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for run in trials[:top]:
            model, cfg = M.model_from_checkpoint(tracker.download(run.info.run_id, "checkpoints/phase2_best.pt",
                                                                  Path(tmp) / run.info.run_id))
            model.eval()
            transform = D.build_transform("none", cfg["image_size"], cfg["mean"], cfg["std"], train=False)
            for name, got in out.items():
                entries = [(rel, label) for rel, label in split[name]]
                bad = D.BadImageLog(name, len(entries), 0.5, root=split["root"])
                batches = list(D.skipping_loader(Path(split["root"]), entries, transform, 64, False, bad))
                with torch.inference_mode():
                    got["p"].append(torch.cat([model(x).softmax(1) for x, _ in batches]))
                    got["flip"].append(torch.cat([model(x.flip(3)).softmax(1) for x, _ in batches]))
                got["y"] = torch.cat([y for _, y in batches])
            print(f"  {folder.name}: {run.info.run_name} valid_acc {run.data.metrics['phase2/best_valid_acc']:.4f}",
                  file=sys.stderr)
    return out


def rules(out: dict, top: int) -> dict[str, float]:
    """Each rule's test accuracy (the greedy ensemble chosen on validation)."""
    acc = lambda p, y: (p.argmax(1) == y).float().mean().item()  # noqa: E731
    valid, test = out["valid"], out["test"]
    got = {"best trial": acc(test["p"][0], test["y"]), "best trial + flip": acc(test["p"][0] + test["flip"][0],
                                                                                 test["y"])}
    for k in sorted({2, 3, 5, top}):
        if k <= len(test["p"]):
            got[f"ensemble of {k}"] = acc(sum(test["p"][:k]), test["y"])
    members = [0]
    for i in range(1, min(5, len(valid["p"]))):
        if acc(sum(valid["p"][j] for j in (*members, i)), valid["y"]) >= acc(sum(valid["p"][j] for j in members),
                                                                              valid["y"]):
            members.append(i)
    got[f"greedy ensemble ({len(members)} of 5)"] = acc(sum(test["p"][j] for j in members), test["y"])
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args(argv)
    for folder in args.folders:
        for rule, value in rules(probabilities(folder, args.top), args.top).items():
            print(f"rules {folder.name} {rule}: test acc {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
