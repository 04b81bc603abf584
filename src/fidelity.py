"""The search's fidelity: trials train smaller and shorter than the models that can win.

`search_size` (`--search-size`): trials train at this side, the best configurations are trained
again at `image_size` (src/confirm.py). `search_epochs` (`--search-epochs`): a trial at the search
size trains phase 2 for at most this many epochs (its lr schedule spans them), while the models
trained again at full size get every one of `max_epochs_phase2`. Both take "half" (HALF); both
are 0 (off) where not set, and `search_epochs` is 0 without a search size. Why these defaults:
docs/quality-and-cost.md. `phase1_views` (PHASE1_VIEWS), a cost lever measured with them: what
phase 1 trains on, in the trials and the full-size models alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import UserError

FixedT = TypeVar("FixedT")  # config.Fixed (not imported: config imports this module)

HALF = "half"     # search_size = "half": `half_size` of image_size; search_epochs = "half": of max_epochs_phase2
SEARCH_KEYS = ("search_size", "search_epochs")
MIN_SEARCH = 64   # "half" never searches below this side (measured down to it: docs/quality-and-cost.md)
# phase1_views: phase 1 (the head alone) on a new view of the trial's aug_strength each epoch, or on the
# one un-augmented view (level "none", the evaluation transform) that every trial shares, its level then
# shaping phase 2 alone. "clean" took 27% less wall and found lower winners: "augmented" is the default
# (docs/sweep-files.md "Phase-1 views", docs/quality-and-cost.md).
PHASE1_VIEWS = ("augmented", "clean")


def half_size(image_size: int) -> int:
    """The search size "half" means: half the side (a quarter of the pixels) rounded down to a
    multiple of 8, or 0 (no search size) where that is below MIN_SEARCH px."""
    side = image_size // 2 // 8 * 8
    return side if side >= MIN_SEARCH else 0


def resolve_search(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (Fixed's fields, as given) with search_size and search_epochs resolved and checked."""
    values = dict(values)
    if values["search_size"] == HALF:
        values["search_size"] = half_size(int(values["image_size"]))
    if not 0 <= int(values["search_size"]) < int(values["image_size"]):
        raise UserError(f"search_size = {values['search_size']!r} must be below image_size = {values['image_size']!r} "
                        f"(trials search at search_size px, the best are trained again at image_size px; 0: off)")
    most = int(values["max_epochs_phase2"])
    if values["search_epochs"] == HALF:
        values["search_epochs"] = (most + 1) // 2
    if not 0 <= int(values["search_epochs"]) <= most:
        raise UserError(f"search_epochs = {values['search_epochs']!r} must be from 0 to max_epochs_phase2 = {most} "
                        f"(a trial at the search size trains phase 2 for at most this many epochs; 0: all)")
    if not values["search_size"] or values["search_epochs"] == most:
        values["search_epochs"] = 0  # no search size, or every phase-2 epoch: as if not set
    return values


def searched(fixed: FixedT) -> FixedT:
    """What a trial trains at: the search size and search epochs where set (the best configurations
    are trained again at `fixed` itself: full size, every phase-2 epoch), else `fixed`."""
    if not fixed.search_size:
        return fixed
    return dataclasses.replace(fixed, image_size=fixed.search_size,
                               max_epochs_phase2=fixed.search_epochs or fixed.max_epochs_phase2)
