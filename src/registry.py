"""The scored winner in the MLflow Model Registry: a pyfunc model (src/served.py) logged on the
run whose model the final test scored, registered as a new version of the study's name (or
`--model-name`), and the alias `champion` moved to it.

A version's tags: `test.acc`, `test.loss`, `test.macro_f1` (the final test's), `tlsweep.model_run_id`,
`tlsweep.parent_run_id`, `tlsweep.winner_kind` (trial, soup or ensemble), `tlsweep.forced` (the
final test was a forced re-scoring), `classes` (JSON list, in output order) and the
preprocessing: `preprocess.image_size`, `preprocess.resize` (shorter side, then center crops),
`preprocess.mean`, `preprocess.std`. Its description says how it was chosen. The parent run gets
`registry.model`, `registry.version` and `registry.scoring` (the final_test.count registered), so
`src.register` registers a scoring once.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from . import data as D
from . import model as M
from .errors import UserError
from .tracking import MLFLOW_PARENT_RUN_ID, ROLE, Tracker

NAME_OK = re.compile(r"^[\w.\- ]{1,200}$")


def model_name(tags: dict, name: str | None) -> str:
    if name is None:  # the study's name, with what the registry cannot take as '-'
        name = re.sub(r"[^\w.\- ]", "-", tags.get("optuna.study_name", ""))[:200]
    if not NAME_OK.match(name or ""):
        raise UserError(f"model name {name!r} is not usable in the Model Registry; pass --model-name with letters, "
                        f"digits, '.', '-', '_' or spaces (up to 200)")
    return name


def example_image(split: dict) -> bytes:
    """A real encoded image for the model's input example: the first readable training image
    (never a test image: the test split is read by the final test alone)."""
    root = Path(split["root"])
    for rel, _ in split["train"][:50]:
        try:
            D.load_rgb(root / rel)
            return (root / rel).read_bytes()
        except (D.DataError, OSError):
            continue
    raise UserError(f"none of the first training images under {root} is readable for the model's input example; "
                    f"restore the data folder the sweep used")


def describe(tags: dict, kind: str, metrics: dict, forced: bool) -> str:
    number = tags.get("best.trial_number")
    chosen = {"trial": f"trial {tags.get('final_test.trial_run_id')}", "soup": "a weight soup of the best trials",
              "ensemble": "an ensemble of the best trials"}.get(kind, kind)
    return (f"Winner of sweep {tags.get('optuna.study_name')!r} (parent run {tags.get('_parent_id')}): {chosen}, "
            f"chosen on validation beside best trial {number} (valid acc {tags.get('best.valid_acc', '?')}); "
            f"scored once on the untouched test split: test/acc {metrics.get('test/acc', float('nan')):.4f}, "
            f"macro-F1 {metrics.get('test/macro_f1', float('nan')):.4f}"
            + (" (a forced re-scoring)" if forced else "") + ".")


def register_winner(tracker: Tracker, parent_id: str, name: str | None = None) -> tuple[str, str]:
    """Register the parent's scored winner; returns (name, version). Refuses an unscored sweep,
    and a scoring already registered."""
    tags = tracker.get_run(parent_id).data.tags
    scorings = int(tags.get("final_test.count", "0"))
    if not scorings:
        raise UserError(f"sweep run {parent_id} has no scored winner yet; score it first: python -m src.final_test "
                        f"--run-id {parent_id} --tracking-uri {tracker.uri}")
    if tags.get("registry.scoring") == str(scorings):
        raise UserError(f"this scoring of sweep run {parent_id} is registered already: {tags.get('registry.model')} "
                        f"version {tags.get('registry.version')} (models:/{tags.get('registry.model')}@champion)")
    name = model_name(tags, name)
    run_id = tags["final_test.trial_run_id"]
    run = tracker.get_run(run_id)
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    kind = run.data.tags.get("tlsweep.role", "trial")
    kind = kind if kind in ("soup", "ensemble") else "trial"
    forced = tags.get("final_test.forced") == "true"
    split = tracker.load_json(parent_id, "dataset/split.json")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tracker.download(run_id, "checkpoints/phase2_best.pt", Path(tmp))
        config = M.load_checkpoint(ckpt)["config"]
        side = D.stored_side(config["image_size"])
        version_tags = {**{k.replace("/", "."): f"{v:.6f}" for k, v in metrics.items()},
                        "tlsweep.model_run_id": run_id, "tlsweep.parent_run_id": parent_id, "tlsweep.winner_kind": kind,
                        "tlsweep.forced": str(forced).lower(), "classes": json.dumps(list(config["classes"])),
                        "preprocess.image_size": config["image_size"],
                        "preprocess.resize": f"shorter side to {side} px, center crop {side}, then {config['image_size']}",
                        "preprocess.mean": json.dumps(list(config["mean"])), "preprocess.std": json.dumps(list(config["std"]))}
        from . import served  # the pyfunc model's own module (imports mlflow's model API)
        version = served.log_and_register(tracker.uri, run_id, ckpt, example_image(split), name, version_tags,
                                          describe({**tags, "_parent_id": parent_id}, kind, metrics, forced),
                                          list(config["classes"]))
    tracker.set_tags(parent_id, {"registry.model": name, "registry.version": version.version,
                                 "registry.scoring": scorings})
    return name, str(version.version)


def load_model(uri: str, tracker: Tracker) -> tuple:
    """(model, its checkpoint config) from a registered model's URI or one of our runs' ids."""
    if uri.startswith("models:/"):
        from . import served  # the pyfunc model's module: the registry's model, exactly as it serves
        return served.load_registered(uri, tracker.uri)
    run = tracker.get_run(uri)
    role, tags = run.data.tags.get(ROLE), run.data.tags
    if role == "parent":
        if not tags.get("final_test.trial_run_id"):
            raise UserError(f"sweep run {uri} has no scored winner yet; score it first: python -m src.final_test "
                            f"--run-id {uri} --tracking-uri {tracker.uri}")
        uri = tags["final_test.trial_run_id"]
    elif role not in ("trial", "full", "soup", "ensemble"):
        raise UserError(f"run {uri} holds no model of ours (tag {ROLE} is {role!r}); pass a models:/ URI, a sweep's "
                        f"parent run id or a trial run id")
    with tempfile.TemporaryDirectory() as tmp:
        return M.model_from_checkpoint(tracker.download(uri, "checkpoints/phase2_best.pt", Path(tmp)))


def split_of(uri: str, tracker: Tracker) -> dict | None:
    """The split record (dataset/split.json) of the sweep a registered version or run came from."""
    if uri.startswith("models:/"):
        from . import served
        parent = served.version_tags(uri, tracker.uri).get("tlsweep.parent_run_id")
    else:
        run = tracker.get_run(uri)
        parent = uri if run.data.tags.get(ROLE) == "parent" else run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    try:
        return tracker.load_json(parent, "dataset/split.json") if parent else None
    except UserError:
        return None
