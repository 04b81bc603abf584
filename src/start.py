"""A sweep's start-up: validate everything, load the starting model, open the study and its parent
run, decode the images once, take up what an earlier run left, before any training."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import NamedTuple

import optuna
import torch

from . import data as D
from . import fidelity as F
from . import model as M
from . import precision
from . import trials as T
from .config import Fixed, PruneSettings, SweepFile, load_sweep, resolve_fixed
from .confirm import DEFAULT_FOLDS, FULL_TOP
from .device import amp_dtype, pick_device
from .errors import UserError
from .options import SweepOptions
from .pipeline import Pipeline, initial_model, resized
from .record import TrialRecord
from .recovery import LostTrials, recover
from .pruning import make_pruner
from .naming import names
from .study import (OMITTED_AT_DEFAULT, check_same_settings, check_search_augmentation, check_steps, open_parent,
                    open_study)
from .tracking import Tracker, log_params
from .trial import Context

log = logging.getLogger("tlsweep")
PARENT_SETTLE_S = 3.0  # on a shared storage, wait this long after creating a parent before electing one


@dataclass
class Started:
    """What start-up made: what every trial shares (with the trials' record, which knows the
    tracker and the parent run), the study, and the parent's experiment; the confirmation's plan
    (K, F: `confirm_plan`) and the sweep's full-size settings (the trials' pipeline is at the
    search size when one is set; `full_pipeline` builds the full-size one when first asked)."""
    ctx: Context
    study: optuna.Study
    experiment_id: str
    fixed: Fixed | None = None
    confirm: tuple[int, int] = (0, DEFAULT_FOLDS)
    full_epochs: int = 0  # --full-epochs (with a search size)
    full_amp: torch.dtype | None = None  # phase 2's autocast at the full size (`ctx.amp`: the trials')
    _full: Pipeline | None = None

    @property
    def searching(self) -> bool:
        """Whether the trials train at a search size (and the full size comes after them)."""
        return bool(self.fixed is not None and self.fixed.search_size)

    def full_pipeline(self) -> Pipeline | None:
        """The pipeline at the full image size (decoded once more, at that size; the same starting
        model), when the trials searched at a smaller one; else None."""
        pipe = self.ctx.pipeline
        if not self.searching:
            return None
        if self._full is None:
            self._full = resized(pipe, self.fixed)
        return self._full

    @property
    def tracker(self) -> Tracker:
        return self.ctx.record.tracker

    @property
    def parent_id(self) -> str:
        return self.ctx.record.parent_id


def resolve_weights(fixed: Fixed, n_classes: int, on_demo: bool,
                    weights_flag: str | None) -> tuple[torch.nn.Module, str, bool]:
    """Load the starting model before any training: (model, effective weights, fell back)."""
    if fixed.weights == "none":
        log.warning("*** --weights none: RANDOM INIT, no pretrained features (much worse results) ***")
    try:
        return initial_model(fixed.backbone, n_classes, fixed.weights, fixed.seed), fixed.weights, False
    except M.WeightsUnavailable as exc:
        if not (on_demo and weights_flag is None):
            raise
        log.warning("*** ImageNet weights unavailable; the DEMO continues from RANDOM INIT. ***\n%s", exc)
        return initial_model(fixed.backbone, n_classes, "none", fixed.seed), "none", True


def _prune_setting(sweep) -> dict:
    """[prune], compared on resume like the rest; left out while it is the default, so a study
    started before [prune] existed resumes with the same settings."""
    return {} if sweep.prune == PruneSettings() else {"prune": asdict(sweep.prune)}


def _check_unfreeze(sweep, base: torch.nn.Module) -> None:
    """Every `unfreeze` choice must fit the backbone's stages, known before any trial runs."""
    spec = sweep.search.get("unfreeze")
    counts = [v for v in (spec.choices if spec else ()) if v != "all"]
    n = len(M.stages(base)) if counts else 0
    if any(int(v) > n for v in counts):
        raise UserError(f"{sweep.path}: [search] unfreeze = {list(spec.choices)}: {base.__class__.__name__} "
                        f"has {n} stages; use \"all\" or numbers from 1 to {n}")


def confirm_plan(opts: SweepOptions, fixed: Fixed) -> tuple[int, int]:
    """(K, F) of the confirmation (src/confirm.py): as asked; with a search size, K = FULL_TOP and
    F = 0 unless given (the K best are trained at full size on the original split)."""
    if opts.full_epochs and not fixed.search_size:
        log.warning("--full-epochs %d does nothing without a search size (search_size is 0): every model trains "
                    "at %d px already", opts.full_epochs, fixed.image_size)
    if fixed.search_size:
        if opts.no_cache:
            raise UserError(f"search_size = {fixed.search_size} re-trains the best configurations on the decoded "
                            f"images: it cannot run with --no-cache; drop --no-cache, or search at full size "
                            f"with --search-size 0")
        return opts.confirm_top or FULL_TOP, 0 if opts.confirm_folds is None else opts.confirm_folds
    top, folds = opts.confirm_top, DEFAULT_FOLDS if opts.confirm_folds is None else opts.confirm_folds
    if not top and opts.confirm_folds:
        log.warning("--confirm-folds %d does nothing without --confirm-top K (search_size is 0): no configuration "
                    "is re-trained; add --confirm-top 3 to re-train the 3 best", opts.confirm_folds)
    if top == 1 or (top and folds < 1):
        raise UserError(f"--confirm-top {top} --confirm-folds {folds}: a confirmation compares 2 or more "
                        f"configurations on 1 or more re-drawn splits (with a --search-size, --confirm-top 1 "
                        f"and --confirm-folds 0 train the best at full size)")
    return top, folds


def check_keep(opts: SweepOptions, fixed: Fixed, top: int) -> None:
    """--keep-checkpoints K must keep every trial model the end of the sweep reads: the soup's and
    the ensemble's candidates and the confirmation's configurations (with a search size those are
    the full-size runs', always kept, unless --full-epochs starts from the trials' models)."""
    k = opts.keep_checkpoints  # >= 0: parse_args
    if fixed.search_size:
        reads = {"--confirm-top": top} if opts.full_epochs else {}
    else:
        reads = {"--soup-top": opts.soup_top, "--ensemble-top": opts.ensemble_top, "--confirm-top": top}
    flag, need = max(reads.items(), key=lambda kv: kv[1], default=("", 0))
    if k and k < need:
        raise UserError(f"--keep-checkpoints {k} is below {flag} {need}: the end of the sweep reads the models of "
                        f"the {need} best trials; give --keep-checkpoints {need} or more (0 keeps every model)")


class Checked(NamedTuple):
    """What the checks before anything is opened found: shared by `start` and `--estimate`."""
    sweep: SweepFile
    on_demo: bool
    fixed: Fixed
    plan: tuple[int, int]
    splits: D.Splits
    device: torch.device
    base: torch.nn.Module  # the starting model
    weights: str           # the effective weights
    fell_back: bool        # the demo's fall-back to random init


def check(opts: SweepOptions) -> Checked:
    """Every cheap check (sweep file, flags, data, device, precision), then the starting model."""
    sweep = load_sweep(opts.sweep)
    on_demo = opts.data is None
    fixed = resolve_fixed(sweep, on_demo, opts.fixed_overrides())
    plan = confirm_plan(opts, fixed)
    check_keep(opts, fixed, plan[0])
    M.check_backbone(fixed.backbone)
    splits = D.find_splits(D.demo_data_dir() if on_demo else opts.data, seed=fixed.seed)
    device = pick_device(opts.device)
    amp_dtype(device, opts.precision)  # a bad --precision fails here, before anything is opened
    base, weights, fell_back = resolve_weights(fixed, len(splits.classes), on_demo, opts.weights)
    _check_unfreeze(sweep, base)
    return Checked(sweep, on_demo, fixed, plan, splits, device, base, weights, fell_back)


def start(opts: SweepOptions) -> Started:
    """Validate everything and open study + parent run, before any training."""
    sweep, on_demo, fixed, plan, splits, device, base, weights, fell_back = check(opts)
    tracker = Tracker(opts.tracking_uri)
    tracker.check_reachable()
    searched = F.searched(fixed)  # what trials train at: the search size and search epochs, where set
    pruner = make_pruner(sweep.prune, fixed.max_epochs_phase1, searched.max_epochs_phase2, not opts.no_prune)
    name, experiment = names(opts, fixed)  # src/naming.py
    study = open_study(name, opts.storage, fixed.seed, pruner, on_lost=LostTrials(tracker))
    check_steps(study)
    # keys that came later are left out at their defaults, so studies from before them resume
    settings = {k: v for k, v in asdict(fixed).items() if k not in OMITTED_AT_DEFAULT or v != getattr(Fixed, k)}
    check_same_settings(study, {**settings, "weights": weights, "search": {
        n: asdict(spec) for n, spec in sweep.search.items()}, **_prune_setting(sweep)})
    check_search_augmentation(study, fixed.search_size)  # after: a changed search size is named as such
    if sweep.start and not study.get_trials(deepcopy=False):  # a study with no trial yet: its first starts from [start]
        # (the --workers launcher does this before its workers start; processes started together
        # on a new study by hand may each find it empty: skip_if_exists narrows that to a rare repeat)
        study.enqueue_trial(sweep.start, skip_if_exists=True)
    # Decoding every image once happens here: after the cheap checks, before any training.
    share = len(splits.valid) / max(1, len(splits.train))  # a phase-2 epoch validates too
    amp, full_amp = (precision.pick(device, opts.precision, fixed.backbone, f.image_size, fixed.batch_size, share)
                     for f in (searched, fixed))
    pipeline = Pipeline(splits=splits, fixed=searched, weights=weights, device=device, loader_workers=opts.loader_workers,
                        use_cache=not opts.no_cache, base=base, max_bad_fraction=opts.max_bad_fraction,
                        aug_side=fixed.image_size)  # trials' pixel shifts: the full size's, scaled
    if not opts.no_cache and any(lvl in D.FRAME_LEVELS for lvl in sweep.search["aug_strength"].choices or ()):
        pipeline.train_frames()  # once, here: --workers find it made
    tags = {"optuna.storage": opts.storage, "data.dir": str(splits.root), "data.demo": str(on_demo).lower(),
            "weights.requested": fixed.weights, "weights.effective": weights,
            "weights.unavailable": str(fell_back).lower(), "train.device": str(device),
            "train.precision": precision.name(amp), **({"full.precision": precision.name(full_amp)} if
                                                       fixed.search_size else {}), **{f"fixed.{k}": v for k, v in asdict(fixed).items()}}
    settle_s = 0.0 if opts.storage.startswith("sqlite") else PARENT_SETTLE_S
    parent_id = open_parent(tracker, study, experiment, splits, sweep, tags, settle_s)
    # the settings a resume keeps (check_same_settings) as params: the runs table compares sweeps
    log_params(tracker, parent_id, {**asdict(fixed), "weights": weights})
    parent = tracker.get_run(parent_id)
    made = parent.data.tags.get("confirm.full_epochs") if fixed.search_size else None
    if made is not None and int(made) != opts.full_epochs:  # its full-size models would be made two ways
        raise UserError(f"study {study.study_name!r} made its full-size models with --full-epochs {made}; resume it "
                        f"with --full-epochs {made}, or start another --study-name for --full-epochs {opts.full_epochs}")
    if splits.ignored_files:
        log.warning("%d non-image file(s) under %s were ignored (counted in dataset/summary.json)",
                    splits.ignored_files, splits.root)
    bad = pipeline.bad_images()  # found while decoding once; each trial run names them too
    tracker.set_tags(parent_id, {"data.skipped_images": sum(len(v) for v in bad.values())})
    if bad:
        tracker.log_json(parent_id, bad, "dataset/skipped_images.json")
    study.set_user_attr(T.VALID_IMAGES_ATTR, len(pipeline.labels("valid")))  # for accuracy intervals
    recover(study, tracker, parent_id)  # what a killed or interrupted earlier run left behind
    record = TrialRecord(tracker, parent_id, pipeline.mean, pipeline.std)
    return Started(Context(pipeline, sweep.search, record, amp, opts.trials, opts.keep_checkpoints), study,
                   parent.info.experiment_id, fixed, plan, full_epochs=opts.full_epochs, full_amp=full_amp)
