"""A greedy weight-averaged soup of the best trials: a candidate beside the single best model
and the ensemble (src/winner.py chooses among them).

The phase-2 checkpoints of the `--soup-top` best candidates (all fine-tuned from the same starting
backbone) are tried in order of validation accuracy: one's weights join the soup (the uniform mean
of its members' weights, BatchNorm statistics included) only if the soup's validation accuracy
does not drop (Wortsman et al., 2022, "Model soups", greedy soup). With two or more members it is
a run of its own under the parent (role `soup`): its checkpoint `checkpoints/phase2_best.pt` (the
first member's config, plus `soup_members`), its members and its validation accuracy.

The candidates are the completed trials, best first (the trial --confirm-top chose first); with a
search size (src/confirm.py) the confirmed configurations' full-size runs instead (labelled
FULL_LABEL): trial models, trained at the search size, never join.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from . import model as M
from . import trials as T
from .tracking import Tracker
from .train import Evaluation, evaluate

SOUP_TOP = 5  # --soup-top: how many of the best trials a soup may draw on
FULL_LABEL = "full:"  # marks full-size candidates (a search size, src/confirm.py) in `winner.from`, `<kind>.trials`
MATCH = ("backbone", "classes", "image_size", "mean", "std")  # what members must share


def average(states: list[dict]) -> dict:
    """The uniform mean of state dicts; integer buffers (BatchNorm's batch counts) take the first's."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def load(tracker: Tracker, run_id: str, tmp: Path):
    ckpt = M.load_checkpoint(tracker.download(run_id, "checkpoints/phase2_best.pt", tmp / run_id))
    return ckpt["config"], ckpt["state_dict"]


def greedy(candidates: list[tuple[str, dict]], model: torch.nn.Module, valid, device,
           single: Evaluation) -> tuple[list[int], Evaluation, dict]:
    """(indexes of the members, the soup's validation `Evaluation`, its state): candidates best
    first, `single` the first's evaluation, made as the soup's are (src/winner.py)."""
    members, state, best = [0], candidates[0][1], single
    for i in range(1, len(candidates)):
        trial_state = average([candidates[j][1] for j in (*members, i)])
        model.load_state_dict(trial_state)
        got = evaluate(model, valid, device)
        if got.acc >= best.acc:
            members, best, state = [*members, i], got, trial_state
    return members, best, state


@dataclass(frozen=True)
class Candidate:
    """A model that may win, or join the soup or the ensemble (src/winner.py): its configuration's
    trial number, the run holding its phase-2 checkpoint, and its validation accuracy as recorded."""
    number: int
    run_id: str
    value: float


def trial_candidates(study: optuna.Study, first: int | None = None) -> list[Candidate]:
    """The study's complete trials, best first (ties: the earlier), `first` (the confirmed
    winner, src/confirm.py) put ahead of them."""
    ranked = sorted(T.completed(study), key=lambda t: (-t.value, t.number))
    ranked = [t for t in ranked if t.number == first] + [t for t in ranked if t.number != first]
    return [Candidate(t.number, T.run_id(t), t.value) for t in ranked]
