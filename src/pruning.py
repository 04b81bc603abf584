"""Pruning that compares like with like: Optuna's pruners, shown a phase-aligned view of the study.

A trial reports its validation accuracy every epoch at a phase-aligned step (src/train.py):
phase-1 epoch e at step e, phase-2 epoch e at step `max_epochs_phase1 + e`. `PhaseAligned`
hands the pruner it wraps (median, percentile, successive halving) only the phase the judged
trial is in, renumbered from 1: phase-2 epoch e of one trial is judged against phase-2 epoch e
of the others, by its best value in phase 2 (never by its phase-1 accuracy), whatever phase 1
did in either. A completed trial that stopped early keeps its best phase-2 value at the later
epochs (its restored best state is what it ended with), so late epochs are not judged against
the patient trials alone. Phase 1 is pruned only with `[prune] phase1 = true`.
"""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import trials as T
from .config import PruneSettings


class _PhaseView:
    """The study as a pruner should see it in one phase: each trial's values of that phase only,
    at epochs 1, 2, ...; everything else (storage, direction, system attributes) is the study's."""

    def __init__(self, study: optuna.Study, offset: int, horizon: int, phase: int):
        # offset: phase 1's max epochs; horizon: phase 2's
        self._study, self._offset, self._horizon, self._phase = study, offset, horizon, phase

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def view(self, trial: FrozenTrial) -> FrozenTrial:
        steps = trial.intermediate_values
        if self._phase == 1:
            return T.with_steps(trial, {s: v for s, v in steps.items() if s <= self._offset})
        values = {s - self._offset: v for s, v in steps.items() if s > self._offset}
        if trial.state == TrialState.COMPLETE and values:
            # Stopped early: what it ended with (its best, restored) stands for the epochs it skipped.
            best = max(values.values())
            values.update({e: best for e in range(max(values) + 1, self._horizon + 1)})
        return T.with_steps(trial, values)

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return [self.view(t) for t in self._study.get_trials(deepcopy=False, states=states)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class PhaseAligned(optuna.pruners.BasePruner):
    """`inner` judges each trial within its current phase only (see the module's docstring)."""

    def __init__(self, inner: optuna.pruners.BasePruner, phase1_epochs: int, phase2_epochs: int,
                 prune_phase1: bool = False):
        self.inner, self.offset, self.horizon, self.prune_phase1 = inner, phase1_epochs, phase2_epochs, prune_phase1

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        phase = 1 if step <= self.offset else 2
        if phase == 1 and not self.prune_phase1:
            return False
        if step in (self.offset, self.offset + self.horizon):
            return False  # a phase's last epoch: its cost is spent, pruning would only throw its result away
        view = _PhaseView(study, self.offset, self.horizon, phase)
        return self.inner.prune(view, view.view(trial))


def make_pruner(settings: PruneSettings, phase1_epochs: int, phase2_epochs: int,
                enabled: bool = True) -> optuna.pruners.BasePruner:
    """The sweep file's [prune] pruner, phase-aligned; none with --no-prune or pruner = "none"."""
    if not enabled or settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "halving":
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, settings.warmup_epochs))
    else:
        percentile = 50.0 if settings.pruner == "median" else settings.percentile
        inner = optuna.pruners.PercentilePruner(percentile, n_startup_trials=settings.startup_trials,
                                                n_warmup_steps=settings.warmup_epochs)
    return PhaseAligned(inner, phase1_epochs, phase2_epochs, settings.phase1)
