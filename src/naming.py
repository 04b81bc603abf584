"""The default names of a sweep's Optuna study and MLflow experiment.

- **Experiment**: one per data set, the data folder's name (`demo-digits` for the demo), so every
  sweep of one folder (any sweep file, backbone or size) sits in one runs table, side by side.
- **Study**: what makes a study different, `<sweep file>-<data>-<backbone>-<image size>px`, plus
  `-search<S>` with a search size, e.g. `default-sports-resnet50-224px-search112`: a second sweep
  of the same folder with another backbone or size is a new study, not a refused resume. Other
  changed settings (epochs, batch size, seed, the search space) are still refused on resume.
- **Before these names** (sweeps started before this version) the study was `<sweep>-<data>` and
  the experiment the sweep file's name. A study of that old name in the storage is resumed under
  it, in its old experiment, when no study of the new name exists and its recorded backbone, image
  size and search size are the sweep's: the same command goes on with the same study.

`--study-name` and `--experiment` override either.
"""
from __future__ import annotations

import logging
from pathlib import Path

import optuna

from .config import Fixed
from .options import SweepOptions
from .study import make_storage
from .trials import SETTINGS_ATTR

log = logging.getLogger("tlsweep")
DEMO_NAME = "demo-digits"


def data_name(opts: SweepOptions) -> str:
    return DEMO_NAME if opts.data is None else Path(opts.data).resolve().name


def default_study_name(opts: SweepOptions, fixed: Fixed) -> str:
    """`<sweep>-<data>-<backbone>-<size>px[-search<S>]`."""
    search = f"-search{fixed.search_size}" if fixed.search_size else ""
    return f"{opts.sweep.stem}-{data_name(opts)}-{fixed.backbone}-{fixed.image_size}px{search}"


def old_study_name(opts: SweepOptions) -> str:
    """The default study name before per-backbone names: `<sweep>-<data>`."""
    return f"{opts.sweep.stem}-{data_name(opts)}"


def _same_kind(settings: dict | None, fixed: Fixed) -> bool:
    """Whether a study's recorded settings have the backbone and sizes the new name encodes."""
    if not settings:
        return False
    return (settings.get("backbone") == fixed.backbone and settings.get("image_size") == fixed.image_size
            and (settings.get("search_size") or 0) == (fixed.search_size or 0))


def names(opts: SweepOptions, fixed: Fixed) -> tuple[str, str]:
    """(study name, experiment name) for this sweep, looking in `--storage` for an old-named study."""
    if opts.study_name:
        return opts.study_name, opts.experiment or data_name(opts)
    new, old = default_study_name(opts, fixed), old_study_name(opts)
    try:
        studies = {s.study_name: s for s in optuna.get_all_study_summaries(make_storage(opts.storage),
                                                                          include_best_trial=False)}
    except Exception:  # an empty or unreachable storage: open_study says what is wrong, if anything
        studies = {}
    if new not in studies and old in studies:
        if _same_kind(studies[old].user_attrs.get(SETTINGS_ATTR), fixed):
            log.info("resuming study %r (named before studies were named by backbone and size; a new one "
                     "would be %r)", old, new)
            return old, opts.experiment or opts.sweep.stem
        log.info("study %r (an older name) has another backbone or size: this sweep is the new study %r", old, new)
    return new, opts.experiment or data_name(opts)
