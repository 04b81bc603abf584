"""CLI: score the sweep's winner on the test split, exactly once.

    python -m src.final_test --run-id <parent run id of the sweep, or one trial's run id>

This is the only code that opens test images. It reads the parent run (split record, best
trial) and the trial's checkpoint, logs test/acc, test/loss, test/macro_f1, a test confusion
matrix and a per-class report to the trial run and summarizes them on the parent. A second
scoring of the same sweep is refused unless --force, which is recorded.
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries load: nothing has started, leave quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import torch
from sklearn.metrics import f1_score

from . import data as D
from . import trials as T
from . import figures, model as M, registry
from .device import pick_device
from .errors import UserError
from .pipeline import DEFAULT_MAX_BAD_FRACTION
from .splits import changed_files
from .tracking import MLFLOW_PARENT_RUN_ID, ROLE, Tracker
from .train import evaluate


@dataclass
class TestResult:
    trial_run_id: str
    parent_run_id: str
    acc: float
    loss: float
    macro_f1: float
    n_images: int
    per_class: list
    skipped: dict          # unreadable test files (relative path -> reason), not scored
    preds: list = None     # per scored test image, in the split's order (for paired comparisons)
    targets: list = None
    registered: tuple | None = None  # (registered model name, version)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m src.final_test", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, help="the sweep's parent run id (uses its best trial) or a trial run id")
    p.add_argument("--tracking-uri", help="MLflow tracking URI the sweep used (default: MLflow's own)")
    p.add_argument("--force", action="store_true", help="score again although this sweep was scored (recorded)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | ... (default cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="test batch size (default 64)")
    p.add_argument("--model-name", help="register the scored model under this name (default: the study's name)")
    p.add_argument("--no-register", action="store_true",
                   help="do not register it (python -m src.register --run-id PARENT does it later)")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help=f"unreadable test images that are skipped (and recorded) before it is an error "
                        f"(default {DEFAULT_MAX_BAD_FRACTION})")
    return p.parse_args(argv)


def resolve_runs(tracker: Tracker, run_id: str) -> tuple[str, str]:
    """(trial run id, parent run id) from either kind of run id."""
    run = tracker.get_run(run_id)
    role = run.data.tags.get(ROLE)
    if role == "parent":
        tags = run.data.tags
        if not tags.get("best.run_id"):
            raise UserError(f"sweep run {run_id} has no completed trial yet; run the sweep until one completes")
        if T.confirmed_winner(tags) is None and int(tags.get("fixed.search_size", 0)):
            raise UserError(f"sweep run {run_id} searched at {tags['fixed.search_size']} px and has no full-size model "
                            f"for its best trial yet (its confirmation has not run since that trial): run the same "
                            f"sweep command again to finish it (it runs only what is missing)")
        return T.winner(tags)[1], run_id  # the confirmed or best trial, or the ensemble / soup chosen beside it
    if role == "full":
        if run.data.tags.get("optuna.state") != "COMPLETE":
            raise UserError(f"full-size run {run_id} is {run.data.tags.get('optuna.state')}, not COMPLETE; pass the "
                            f"sweep's parent run id to score its winner")
        return run_id, run.data.tags[MLFLOW_PARENT_RUN_ID]
    if role == "confirm":
        raise UserError(f"run {run_id} is a confirmation run (a configuration re-trained on a re-drawn split, "
                        f"src/confirm.py): it keeps no model; pass the sweep's parent run id")
    if role in ("soup", "ensemble"):
        return run_id, run.data.tags[MLFLOW_PARENT_RUN_ID]
    if role == "trial":
        state = run.data.tags.get("optuna.state")
        if state != "COMPLETE":
            raise UserError(f"trial run {run_id} is {state}, not COMPLETE; score a completed trial, "
                            f"or pass the sweep's parent run id to score its best")
        return run_id, run.data.tags[MLFLOW_PARENT_RUN_ID]
    raise UserError(f"run {run_id} in {tracker.uri} was not made by src.sweep (no {ROLE} tag); "
                    f"pass the sweep's parent run id it printed")


def check_not_scored(tracker: Tracker, parent_id: str, force: bool) -> int:
    """Refuse a second scoring of a sweep unless forced; returns the number of earlier scorings."""
    tags = tracker.get_run(parent_id).data.tags
    earlier = int(tags.get("final_test.count", "0"))
    if earlier and not force:
        raise UserError(f"this sweep (parent run {parent_id}) was already scored on test "
                        f"(trial run {tags.get('final_test.trial_run_id')}, test/acc {tags.get('final_test.acc')}). "
                        f"Scoring again turns the test set into a validation set; if you must, pass --force "
                        f"(it is recorded on the runs).")
    return earlier


def score(model, config: dict, split: dict, device: torch.device, batch_size: int,
          max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
    classes = split["classes"]
    if list(config["classes"]) != list(classes):
        raise UserError(f"checkpoint classes {config['classes']} differ from the split's {classes}")
    transform = D.eval_transform(config)
    entries = [(rel, label) for rel, label in split["test"]]
    missing = [rel for rel, _ in entries if not (Path(split["root"]) / rel).is_file()]
    if missing:
        raise UserError(f"{len(missing)} test file(s) recorded by the sweep are gone from {split['root']}, "
                        f"e.g. {missing[:3]}; restore them")
    now = D.fingerprint(Path(split["root"]), entries)
    if now != split["test_fingerprint"]:
        raise UserError(f"the test files in {split['root']} changed since the sweep recorded them "
                        f"(fingerprint {split['test_fingerprint']} -> {now}); restore the original test set")
    changed = changed_files(Path(split["root"]), split.get("test_sha256", {}))
    if changed:
        raise UserError(f"{len(changed)} test file(s) in {split['root']} changed since the split was made "
                        f"(their sha256 differs), e.g. {changed[:3]}; restore the original test files")
    # An unreadable test file (as it was when the split was made: the hashes match) is skipped
    # and recorded; more than `max_bad_fraction` of the test split is an error.
    bad = D.BadImageLog("test", len(entries), max_bad_fraction, error=UserError, root=split["root"])
    loader = D.skipping_loader(Path(split["root"]), entries, transform, batch_size, False, bad)
    return evaluate(model.to(device), loader, device), bad  # fp32 (no amp): the score of record, once


def run_final_test(run_id: str, tracking_uri: str | None = None, force: bool = False,
                   device: str = "cpu", batch_size: int = 64,
                   max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, register: bool = False,
                   model_name: str | None = None) -> TestResult:
    """Score once; with `register`, the scored model becomes the next version of the registered
    model (src/registry.py) and `TestResult.registered` names it."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give at least 1")
    if not 0 <= max_bad_fraction < 1:
        raise UserError(f"--max-bad-fraction {max_bad_fraction}: give a fraction from 0 to below 1, e.g. 0.01")
    torch_device = pick_device(device)
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    trial_id, parent_id = resolve_runs(tracker, run_id)
    earlier = check_not_scored(tracker, parent_id, force)
    if register:  # a name the registry refuses fails here, before the one scoring
        registry.model_name(tracker.get_run(parent_id).data.tags, model_name)
    split = tracker.load_json(parent_id, "dataset/split.json")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tracker.download(trial_id, "checkpoints/phase2_best.pt", Path(tmp))
        model, config = M.model_from_checkpoint(ckpt)
    if config.get("search_size") and config["image_size"] == config["search_size"]:
        raise UserError(f"run {trial_id} trained at the search size ({config['image_size']} px), which only ranks "
                        f"configurations; pass the sweep's parent run id {parent_id}: its winner is a full-size model")
    ev, bad = score(model, config, split, torch_device, batch_size, max_bad_fraction)
    classes = split["classes"]
    macro_f1 = float(f1_score(ev.targets, ev.preds, average="macro", labels=list(range(len(classes))),
                              zero_division=0))
    per_class = figures.per_class_report(ev.targets, ev.preds, classes)
    result = TestResult(trial_id, parent_id, ev.acc, ev.loss, macro_f1, len(ev.targets), per_class,
                        dict(bad.found), ev.preds, ev.targets)
    log_result(tracker, result, ev, classes, earlier, force)
    if register:
        try:
            result.registered = registry.register_winner(tracker, parent_id, model_name)
        except Exception as exc:  # noqa: BLE001 - the score is recorded whatever the registry does
            raise UserError(f"the test score is recorded, but registering the model failed ({type(exc).__name__}: "
                            f"{exc}); register it with: python -m src.register --run-id {parent_id}"
                            + (f" --tracking-uri {tracking_uri}" if tracking_uri else "")) from exc
    return result


def log_result(tracker: Tracker, r: TestResult, ev, classes, earlier: int, force: bool) -> None:
    metrics = {"test/acc": r.acc, "test/loss": r.loss, "test/macro_f1": r.macro_f1}
    tags = {"final_test.count": earlier + 1, "final_test.trial_run_id": r.trial_run_id,
            "final_test.acc": f"{r.acc:.6f}", "final_test.forced": str(force and earlier > 0).lower(),
            "final_test.skipped_images": len(r.skipped)}
    # The parent's count first: once the score exists anywhere, a second scoring needs --force,
    # even if this process is killed while it logs the rest.
    tracker.set_tags(r.parent_run_id, tags)
    with tempfile.TemporaryDirectory() as tmp:
        cm = figures.confusion(ev.targets, ev.preds, len(classes))
        cm_files = figures.write_confusion(cm, classes, Path(tmp) / "test", "test split (final)")
        report = figures.write_report(r.per_class, Path(tmp) / "test_per_class.csv")
        for run_id in (r.trial_run_id, r.parent_run_id):
            tracker.log_metrics(run_id, metrics, step=earlier)
            tracker.set_tags(run_id, tags)
            tracker.log_files(run_id, cm_files, "confusion")
            tracker.log_files(run_id, [report], "report")
            if r.skipped:
                tracker.log_json(run_id, r.skipped, "report/test_skipped_images.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here on
    try:
        r = run_final_test(args.run_id, args.tracking_uri, args.force, args.device, args.batch_size,
                           args.max_bad_fraction, not args.no_register, args.model_name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; if the score was recorded, scoring again needs --force", file=sys.stderr)
        return 130
    if r.skipped:
        print(f"warning: {len(r.skipped)} unreadable test image(s) not scored (recorded on the runs): "
              + "; ".join(f"{p} ({why})" for p, why in list(r.skipped.items())[:3]), file=sys.stderr)
    print(f"test split ({r.n_images} images), model run {r.trial_run_id}:")
    print(f"  test/acc      {r.acc:.4f}\n  test/loss     {r.loss:.4f}\n  test/macro_f1 {r.macro_f1:.4f}")
    print(f"  {'class':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7}")
    for row in r.per_class:
        print(f"  {row['class']:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>7.3f} {row['support']:>7}")
    if r.registered:
        print(f"registered: models:/{r.registered[0]}@champion (version {r.registered[1]}; "
              f"mlflow.pyfunc.load_model(\"models:/{r.registered[0]}@champion\") predicts from images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
