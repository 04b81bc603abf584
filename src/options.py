"""What `python -m src.sweep` was asked for: its flags, parsed and checked once (src/sweep.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SweepOptions:
    """What `python -m src.sweep` was asked for: its flags, parsed and checked once (the flags'
    help says what each means); the fixed-setting flags are None where not given."""
    trials: int
    timeout: float | None
    data: Path | None
    sweep: Path
    backbone: str | None
    weights: str | None
    image_size: int | None
    batch_size: int | None
    max_epochs: int | None
    seed: int | None
    study_name: str | None
    storage: str
    experiment: str | None
    tracking_uri: str | None
    device: str
    precision: str
    workers: int
    loader_workers: int | None
    max_bad_fraction: float
    no_prune: bool
    no_cache: bool
    search_size: int | str | None = None  # "half": fidelity.half_size
    search_epochs: int | str | None = None  # "half": half of max_epochs_phase2 (src/fidelity.py)
    soup_top: int = 5
    ensemble_top: int = 3
    confirm_top: int = 0   # --confirm-top K, --confirm-folds F (src/confirm.py); K = 0: off
    confirm_folds: int | None = None  # None: 3, or 0 with a search size
    full_epochs: int = 0   # --full-epochs E: a search-size trial's model fine-tuned E epochs at full size (0: retrained)
    keep_checkpoints: int = 0  # --keep-checkpoints K: a trial's model uploaded only while among the K best (0: all)
    estimate: bool = False     # --estimate: print the sweep's expected cost (src/estimate.py), start nothing

    def fixed_overrides(self) -> dict[str, Any]:
        """The flags that override [fixed] (`resolve_fixed`): --max-epochs sets both phases."""
        return {"backbone": self.backbone, "weights": self.weights, "image_size": self.image_size,
                "batch_size": self.batch_size, "max_epochs_phase1": self.max_epochs,
                "max_epochs_phase2": self.max_epochs, "seed": self.seed, "search_size": self.search_size,
                "search_epochs": self.search_epochs}
