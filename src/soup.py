"""A greedy weight-averaged soup of the best trials: a candidate beside the single best model.

After a sweep, the phase-2 checkpoints of the `top` best completed trials (all fine-tuned from the
same starting backbone) are tried in order of validation accuracy: a trial's weights join the
soup (the uniform mean of its members' weights, BatchNorm statistics included) only if the soup's
validation accuracy does not drop (Wortsman et al., 2022, "Model soups", greedy soup). With two
or more members it becomes a run of its own under the parent (role `soup`, run name `soup`): its
checkpoint `checkpoints/phase2_best.pt` (the first member's config, plus `soup_members`), its
members and its validation accuracy. The sweep's winner is the soup if its validation accuracy
beats the single best trial's (or the trial --confirm-top chose, src/confirm.py: then the soup
starts from it), else that trial: the parent's `winner.run_id` / `winner.kind` say which, and
`final_test` scores it (once).

With a search size (src/confirm.py) the candidates are the confirmed configurations' full-size
runs instead, the winner first (`soup.trials` then starts with FULL_LABEL): trial models, trained
at the search size, never join.

A soup is made once per set of best trials, when no trial is running (the last worker to end
makes it): the parent's `soup.trials` tag records which trials the last soup was made from, so
another worker or a rerun with nothing new skips it.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from . import model as M
from . import trials as T
from .stats import wilson
from .tracking import MLFLOW_PARENT_RUN_ID, ROLE, Tracker
from .train import evaluate

log = logging.getLogger("tlsweep")
SOUP_TOP = 5  # --soup-top: how many of the best trials a soup may draw on
FULL_LABEL = "full:"  # `soup.trials` of a soup of full-size runs (a search size, src/confirm.py)
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


def _load(tracker: Tracker, run_id: str, tmp: Path):
    ckpt = M.load_checkpoint(tracker.download(run_id, "checkpoints/phase2_best.pt", tmp / run_id))
    return ckpt["config"], ckpt["state_dict"]


def greedy(candidates: list[tuple[str, dict]], model: torch.nn.Module, valid,
           device) -> tuple[list[int], float, dict, float]:
    """(indexes of the members, the soup's valid accuracy, its state, the first candidate's valid
    accuracy measured the same way): candidates best first."""
    members, state = [0], candidates[0][1]
    model.load_state_dict(state)
    best = single = evaluate(model, valid, device).acc
    for i in range(1, len(candidates)):
        trial_state = average([candidates[j][1] for j in (*members, i)])
        model.load_state_dict(trial_state)
        acc = evaluate(model, valid, device).acc
        if acc >= best:
            members, best, state = [*members, i], acc, trial_state
    return members, best, state, single


@dataclass(frozen=True)
class Candidate:
    """A model that may join the soup: its configuration's trial number, the run holding its
    phase-2 checkpoint, and its validation accuracy as recorded there."""
    number: int
    run_id: str
    value: float


def trial_candidates(study: optuna.Study, first: int | None = None) -> list[Candidate]:
    """The study's complete trials, best first (ties: the earlier), `first` (the confirmed
    winner, src/confirm.py) put ahead of them."""
    ranked = sorted(T.completed(study), key=lambda t: (-t.value, t.number))
    ranked = [t for t in ranked if t.number == first] + [t for t in ranked if t.number != first]
    return [Candidate(t.number, T.run_id(t), t.value) for t in ranked]


def make_soup(tracker: Tracker, parent_id: str, candidates: list[Candidate], valid, device, top: int,
              label: str = "") -> str | None:
    """Make the soup of the `top` first candidates (best first: the first is what the soup starts
    from and competes with) unless it was made from these already, and record the winner on the
    parent; returns the soup's run id when it is the winner. `label` marks the kind of candidates
    in `soup.trials` (e.g. "full:" for full-size models of a search size)."""
    ranked = candidates[:top]
    if top < 2 or len(ranked) < 2:
        return None  # nothing to average
    seen, tags = label + ",".join(str(c.number) for c in ranked), tracker.get_run(parent_id).data.tags
    if tags.get("soup.trials") == seen:  # made from these trials already (another worker, or a rerun)
        return tags.get("winner.run_id") if tags.get("winner.kind") == "soup" else None
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [(c.run_id, *_load(tracker, c.run_id, Path(tmp))) for c in ranked]
    first = loaded[0][1]
    usable = [(rid, state) for rid, cfg, state in loaded if all(cfg.get(k) == first.get(k) for k in MATCH)]
    model = M.build_model(first["backbone"], len(first["classes"]), weights="none").to(device)
    # The best trial is re-evaluated here, as the soup is (fp32, contiguous): the one comparison
    # is then between two models measured the same way, not against its training-time figure.
    members, acc, state, single = greedy(usable, model, valid, device)
    soup_id = None
    if len(members) >= 2:
        member_ids = [usable[i][0] for i in members]
        soup_id = tracker.start_child(parent_id, "soup", "soup", {"soup.members": ",".join(member_ids),
                                                                   "soup.size": len(members), "soup.trials": seen})
        low, high = wilson(acc, len(valid.dataset))
        tracker.log_metrics(soup_id, {"soup/valid_acc": acc, "phase2/best_valid_acc": acc, "soup/size": len(members),
                                      "phase2/best_valid_acc_low": low, "phase2/best_valid_acc_high": high})
        with tempfile.TemporaryDirectory() as tmp:
            model.load_state_dict(state)
            ckpt = M.make_checkpoint(model, {**first, "soup_members": member_ids}, 2, 0, acc)
            tracker.log_files(soup_id, [M.save_checkpoint(ckpt, Path(tmp) / "phase2_best.pt")], "checkpoints")
        tracker.end_run(soup_id, "COMPLETE")
        # Workers ending at once may each make the soup of the same trials (the same weights).
        soup_id = tracker.keep_oldest(tracker.get_run(parent_id).info.experiment_id,
                                      {MLFLOW_PARENT_RUN_ID: parent_id, ROLE: "soup", "soup.trials": seen}, soup_id)
    wins = soup_id is not None and acc > single
    log.info("soup of %d of the %d best trials: valid_acc %.4f, the best single trial %.4f: the winner is the %s",
             len(members), len(ranked), acc, single, "soup" if wins else "single trial")
    tracker.set_tags(parent_id, {
        "winner.kind": "soup" if wins else "trial", "winner.run_id": soup_id if wins else ranked[0].run_id,
        "winner.valid_acc": f"{acc if wins else ranked[0].value:.6f}", "winner.best_trial": ranked[0].number,
        "soup.trials": seen})  # last: a kill before it makes the soup again next time
    return soup_id if wins else None
