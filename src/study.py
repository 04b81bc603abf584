"""The Optuna study and its MLflow parent run: open or resume them, keep them consistent,
record the best trial, plots and pruning savings, and print the summary table."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc

from . import splits as S
from . import trials as T
from .config import SIZED_LEVELS, Fixed, SweepFile
from .errors import UserError
from .fidelity import SEARCH_KEYS
from .stats import wilson
from .recovery import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S
from .tracking import ROLE, Tracker
from .trials import PARENT_RUN_ATTR, SETTINGS_ATTR, STEPS, STEPS_ATTR, STUDY_UID_ATTR

log = logging.getLogger("tlsweep")
STORAGE_CREATE_TRIES = 6   # workers racing to create the tables of an empty RDB storage


def derive_seed(study_seed: int, trial_number: int) -> int:
    """A trial's seed (and the resumed sampler's): from the study seed and a trial count."""
    return (study_seed * 1_000_003 + trial_number) % (2**31)


def open_parent(tracker: Tracker, study: optuna.Study, experiment: str, splits: S.Splits,
                sweep: SweepFile, tags: dict, settle_s: float = 0.0) -> str:
    """The study's parent run: reused when the study already has one in this store (also when a
    kill came between creating it and recording its id: it is found by the study's uid tag). A
    study's parent stays in the experiment it was made in, whatever `experiment` says now."""
    uid = study.user_attrs.get(STUDY_UID_ATTR) or study_uid(study)
    study.set_user_attr(STUDY_UID_ATTR, uid)  # every worker writes the same value
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    data_fp = "-".join(splits.fingerprints[n] for n in S.SPLITS)
    if not tracker.run_exists(parent_id):
        parent_id = _elect_parent(tracker, tracker.experiment_id(experiment), study.study_name, uid,
                                  {"dataset.fingerprint": data_fp, **tags}, settle_s)
    recorded = tracker.get_run(parent_id).data.tags.get("dataset.fingerprint")
    if recorded and recorded != data_fp:
        raise UserError(f"the data in {splits.root} changed since study {study.study_name!r} started "
                        f"(fingerprint {recorded} -> {data_fp}); start a new --study-name")
    tracker.reopen(parent_id)
    log.info("study %r, parent run %s", study.study_name, parent_id)
    study.set_user_attr(PARENT_RUN_ATTR, parent_id)
    if not _has_split_record(tracker, parent_id):  # new, or a kill came before or while it was logged
        tracker.log_files(parent_id, [sweep.path], "sweep")
        tracker.log_json(parent_id, splits.summary(), "dataset/summary.json")
        tracker.log_json(parent_id, splits.record(), "dataset/split.json")  # last: marks it complete
    return parent_id


def _elect_parent(tracker: Tracker, exp_id: str, study_name: str, uid: str, tags: dict,
                  settle_s: float) -> str:
    """The oldest parent run tagged with the study's uid, creating one when there is none.

    Workers starting together may each create one: all keep the oldest, the others go. A run's
    start time is taken before it reaches the server, so an older one can appear after a younger
    one: every worker, also one that found a parent without creating it, waits `settle_s`
    (shared storages) and looks again before choosing, so none keeps a run another deletes."""
    wanted = {STUDY_UID_ATTR: uid, ROLE: "parent"}
    found = tracker.find_run(exp_id, wanted)
    mine = None if found else tracker.create_parent(exp_id, study_name, {STUDY_UID_ATTR: uid, **tags})
    time.sleep(settle_s)
    return tracker.keep_oldest(exp_id, wanted, mine)


def study_uid(study: optuna.Study) -> str:
    """The same for every worker of a study (the storage's study id and name), unlike a random id
    two workers could both draw and write."""
    url, study_id = T.storage_identity(study)
    url = re.sub(r"//[^@/]*@", "//", url)  # no credentials in a tag
    return hashlib.sha256(f"{url}|{study_id}|{study.study_name}".encode()).hexdigest()[:24]


def _has_split_record(tracker: Tracker, parent_id: str) -> bool:
    """Whether the parent has a complete, readable dataset/split.json (what final_test reads)."""
    if "split.json" not in tracker.artifact_names(parent_id, "dataset"):
        return False
    try:
        return "test_fingerprint" in tracker.load_json(parent_id, "dataset/split.json")
    except UserError:
        return False


def update_best(tracker: Tracker, parent_id: str, study: optuna.Study) -> None:
    """Tag the parent with the best completed trial so far (survives a crash mid-sweep)."""
    best = T.best(study)
    if best is None:
        return  # nothing completed yet
    low, high = wilson(best.value, int(study.user_attrs.get(T.VALID_IMAGES_ATTR, 0)))
    tags = {"best.trial_number": best.number, "best.run_id": T.run_id(best) or "",
            "best.valid_acc": f"{best.value:.6f}", "best.valid_acc_95": f"{low:.4f}-{high:.4f}"}
    tags.update({f"best.{k}": v for k, v in best.params.items()})
    tracker.set_tags(parent_id, tags)
    tracker.log_metrics(parent_id, {"best/valid_acc": best.value}, step=len(study.trials))


def make_storage(url: str, on_lost=None):
    """An RDB URL (sqlite, postgresql, mysql) becomes a storage with Optuna's heartbeat: a trial
    whose worker goes silent is failed and handed to `on_lost` (see src/recovery.py)."""
    if url.startswith("journal://"):  # one file, safe for several processes on one machine
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        return url  # let Optuna say what it makes of it
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # heartbeat thread writes too
    for attempt in range(STORAGE_CREATE_TRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                              grace_period=GRACE_PERIOD_S, heartbeat_stale_trial_callback=on_lost)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers starting together on an empty database all create Optuna's tables; on
            # PostgreSQL the losers fail on the catalog (pg_type) and find the tables made on retry.
            if attempt == STORAGE_CREATE_TRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)


def open_study(name: str, storage: str, seed: int, pruner: optuna.pruners.BasePruner | None = None,
               on_lost=None) -> optuna.Study:
    """Create or load (resume) the study (`pruner`: src/pruning.py's, default none); an unusable
    storage URL is a clear error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat options
            study = optuna.create_study(study_name=name, storage=make_storage(storage, on_lost),
                                        load_if_exists=True, direction="maximize",
                                        pruner=pruner or optuna.pruners.NopPruner())
    except Exception as exc:  # SQLAlchemy/driver errors come in many types
        raise UserError(f"cannot open Optuna storage --storage {storage} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300]}); check the URL, that the server is up, "
                        f"and that its driver is installed") from exc
    # Seeded by the trial count too: a resumed study must not replay its first random trials.
    sampler_seed = derive_seed(seed, len(study.trials))
    shared = not storage.startswith("sqlite")  # storages that several workers write at once
    if shared:
        # Workers starting together see the same trial count: each also draws from its own
        # identity, or they would sample the same parameters; the constant liar keeps TPE from
        # proposing what a running trial already tries. (SQLite, one worker: fully reproducible.)
        sampler_seed = derive_seed(sampler_seed, (os.getpid() * 7919 + hash(socket.gethostname())) % 1_000_003)
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=shared)
    return study


def check_steps(study: optuna.Study) -> None:
    """A study numbers its trials' epochs one way (`trials.STEPS`); a study made before
    phase-aligned steps (one global epoch count across both phases) is refused, never mixed."""
    if study.user_attrs.get(STEPS_ATTR) == STEPS:
        return
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        raise UserError(
            f"study {study.study_name!r} was made by an older version that numbered epochs across both "
            f"phases (one global count); its trials cannot be pruned against or compared with phase-aligned "
            f"ones (phase-2 epoch e at step max_epochs_phase1 + e). Start a new --study-name; the old "
            f"study, its runs and checkpoints stay as they are, and python -m src.final_test still scores it")
    study.set_user_attr(STEPS_ATTR, STEPS)


SEARCH_AUG_ATTR, SEARCH_AUG = "search_augmentation", "scaled"  # `data.build_transform`'s aug_side


def check_search_augmentation(study: optuna.Study, search_size: int) -> None:
    """A search-size study's trials shift their images by the full size's share (seed's padding,
    strong's translations scaled by search_size / image_size); a search-size study with trials that
    trained at those levels before that (the full size's pixel amounts at the search size) is
    refused, never mixed. Queued trials, trials that never reported an epoch and trials of other
    levels train the same either way: a study with only those is marked and goes on."""
    if not search_size or study.user_attrs.get(SEARCH_AUG_ATTR) == SEARCH_AUG:
        return
    old = [t.number for t in study.get_trials(deepcopy=False)
           if t.intermediate_values and t.params.get("aug_strength") in SIZED_LEVELS]
    if old and study.user_attrs.get(SEARCH_AUG_ATTR) != SEARCH_AUG:  # read again: a worker beside may mark it
        shown = ", ".join(map(str, old[:10])) + (", ..." if len(old) > 10 else "")
        raise UserError(
            f"study {study.study_name!r} was made by an older version whose trials at the search size "
            f"({search_size} px) at levels {' and '.join(SIZED_LEVELS)} (trials {shown}) shifted their images by "
            f"the full size's pixel amounts; they cannot be ranked with trials whose shifts are scaled to the "
            f"search size. Start a new --study-name; the old study, its runs and checkpoints stay as they "
            f"are, and python -m src.final_test still scores its winner if its full-size models were trained")
    study.set_user_attr(SEARCH_AUG_ATTR, SEARCH_AUG)


OMITTED_AT_DEFAULT = (*SEARCH_KEYS, "phase1_views", "prune")  # not in a study's settings while at their defaults


def check_same_settings(study: optuna.Study, settings: dict) -> None:
    """A study keeps its fixed settings and search space; resuming with others is refused."""
    settings = json.loads(json.dumps(settings))  # as the storage gives it back: lists, not tuples
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
        return
    # keys left out while at their default (search_size 0, [prune]) count when the study has them
    keys = list(settings) + [k for k in OMITTED_AT_DEFAULT if k in recorded and k not in settings]
    changed = {k: (recorded.get(k), settings.get(k)) for k in keys if recorded.get(k) != settings.get(k)}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        hint = (f"; its sweep file is on its parent run: mlflow artifacts download -r {parent} -a sweep -d . "
                f"puts it under ./sweep/, then pass it as --sweep") if parent else ""
        if "search" in changed:
            hint += (f" (a study started with sweeps/default.toml before the transfer-aware parameters resumes "
                     f"with --sweep sweeps/four.toml --study-name {study.study_name})")
        raise UserError(f"study {study.study_name!r} was started with other settings ({detail}); "
                        f"rerun with the original ones{hint}, or start a new --study-name")


def pruning_savings(study: optuna.Study, fixed: Fixed) -> tuple[int, int]:
    """(epochs spent by finished trials, most epochs the pruned ones could still have run)."""
    most = fixed.max_epochs_phase1 + fixed.max_epochs_phase2
    done = T.finished(study)
    spent = sum(len(t.intermediate_values) for t in done)
    pruned = [t for t in done if t.state == optuna.trial.TrialState.PRUNED]
    return spent, sum(most - len(t.intermediate_values) for t in pruned)
