"""The only place that calls `trial.suggest_*`: turn a sweep file's [search] into sampled values."""
from __future__ import annotations

from typing import Any

from .config import ParamSpec


def sample(trial: Any, search: dict[str, ParamSpec]) -> dict[str, Any]:
    """Sample every parameter; works with a live trial and with `optuna.trial.FixedTrial`."""
    values: dict[str, Any] = {}
    for name, spec in search.items():
        if spec.choices is not None:
            # A pinned value is a one-choice categorical, so Optuna still records it.
            values[name] = trial.suggest_categorical(name, list(spec.choices))
        elif isinstance(spec.low, int) and isinstance(spec.high, int):
            values[name] = trial.suggest_int(name, spec.low, spec.high, log=spec.log)
        else:
            values[name] = trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.log)
    # Parameters the file leaves out are not sampled: the trial's config gives them their
    # `config.OPTIONAL` value (the TrialConfig defaults), and Optuna's params leave them out.
    for name in ("head_lr", "backbone_lr_ratio", "weight_decay", "label_smoothing"):
        if name in values:
            values[name] = float(values[name])
    values["patience"] = int(values["patience"])
    return values
