"""The sweep's winner, chosen on validation among up to three candidates, once per set of best models.

- the single best model: the best trial, or the one --confirm-top chose (src/confirm.py), or with
  a search size its full-size run;
- the greedy soup of the `--soup-top` best (src/soup.py): one model's cost at inference;
- the ensemble of the `--ensemble-top` best (`model.Ensemble`: their class probabilities
  averaged): K times one model's cost at inference, K checkpoints in one file.

All three are evaluated here the same way (fp32, on the validation split the trials were ranked
on). The one-model candidate is the soup if it beats the single, else the single. The ensemble wins
unless that candidate leads it beyond noise: more accurate, and by a lead that McNemar's exact test
(one-sided, on the images where the two disagree; `stats.lead_p`) gives less than LEAD_P chance
were neither better. Why the ensemble is the one to beat: the single's validation accuracy is the
best of many noisy figures and the soup's a greedy pick on the same images, so both overstate what
they do on new images; the ensemble's members are fixed by rank alone, and averaging their
predictions cancels part of each member's seed noise. A lead of a few images on a few hundred is
what that overstatement alone can give; a lead of many (a member that drags the ensemble down, or a
one-model candidate better on a large validation split) still wins. Measured on the 24-class
clip-art folder, see docs/quality-and-cost.md; `--ensemble-top 0` (or 1) leaves the ensemble out,
for a model that costs one network at inference.

Each candidate of two or more members is a run under the parent (role and run name `soup` or
`ensemble`) with its checkpoint `checkpoints/phase2_best.pt` (its first member's config plus
`<kind>_members`, and `ensemble_size` for the ensemble, which `model.model_from_checkpoint`
rebuilds), its members and its validation accuracy. The parent's tags name the winner
(`winner.kind`, `winner.run_id`; `final_test` scores it, once), what each candidate reached and
the one-model candidate's lead over the ensemble (`winner.lead_p`).
The choice is made when no trial is running (the last worker to end makes it); the parent's
`winner.from` (the candidates and the two flags) is set last, so another worker or a rerun with
nothing new skips it, and a kill before it makes the choice again (the runs are not duplicated).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from . import model as M
from .soup import MATCH, Candidate, greedy, load
from .stats import LEAD_P, lead_p, wilson
from .tracking import MLFLOW_PARENT_RUN_ID, ROLE, Tracker
from .trials import one_model
from .train import Evaluation, evaluate

log = logging.getLogger("tlsweep")
ENSEMBLE_TOP = 3  # --ensemble-top: how many of the best models the ensemble averages
KINDS = ("trial", "soup", "ensemble")


def pick(accs: dict[str, float], lead: float | None = None) -> str:
    """The winning kind from the validation accuracies measured (`trial` always among them) and
    `lead`, the `stats.lead_p` of the one-model candidate against the ensemble on those images
    (None: not measured, so no lead)."""
    one = one_model(accs)
    if "ensemble" in accs and (accs["ensemble"] >= accs[one] or lead is None or lead >= LEAD_P):
        return "ensemble"
    return one


def lead_over_ensemble(got: dict[str, Evaluation]) -> float | None:
    """`stats.lead_p` of the one-model candidate against the ensemble, from their evaluations on
    the same validation images (None without an ensemble; 1.0, no lead, if their images differ)."""
    if "ensemble" not in got:
        return None
    one = got[one_model({kind: e.acc for kind, e in got.items()})]
    if one.targets != got["ensemble"].targets:  # a file skipped in one pass only: not paired
        log.warning("the candidates were evaluated on different validation images: no lead is measured")
        return 1.0
    right = lambda e: [p == t for p, t in zip(e.preds, e.targets)]  # noqa: E731
    return lead_p(right(one), right(got["ensemble"]))


def record(tracker: Tracker, parent_id: str, kind: str, model: torch.nn.Module, config: dict,
           member_ids: list[str], seen: str, acc: float, n_valid: int) -> str:
    """The candidate's run under the parent; workers that made the same one (the same members)
    keep the first to have finished."""
    run_id = tracker.start_child(parent_id, kind, kind, {f"{kind}.members": ",".join(member_ids),
                                                         f"{kind}.size": len(member_ids), f"{kind}.trials": seen})
    low, high = wilson(acc, n_valid)
    tracker.log_metrics(run_id, {f"{kind}/valid_acc": acc, "phase2/best_valid_acc": acc, f"{kind}/size": len(member_ids),
                                 "phase2/best_valid_acc_low": low, "phase2/best_valid_acc_high": high})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = M.make_checkpoint(model, {**config, f"{kind}_members": member_ids}, 2, 0, acc)
        tracker.log_files(run_id, [M.save_checkpoint(ckpt, Path(tmp) / "phase2_best.pt")], "checkpoints")
    tracker.end_run(run_id, "COMPLETE")
    return tracker.keep_oldest(tracker.get_run(parent_id).info.experiment_id, {
        MLFLOW_PARENT_RUN_ID: parent_id, ROLE: kind, f"{kind}.trials": seen, f"{kind}.members": ",".join(member_ids)},
        run_id, finished=True)


def candidates_made(tracker: Tracker, parent_id: str, ranked: list[Candidate], valid, device, soup_top: int,
                    ensemble_top: int, label: str) -> tuple[dict[str, float], dict[str, str], float | None]:
    """Each candidate's fp32 validation accuracy and run: the first of `ranked`, and the soup and
    the ensemble made from them (recorded as runs) when they have two or more members; and the
    one-model candidate's `lead_p` against the ensemble (None without one)."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [(c, *load(tracker, c.run_id, Path(tmp))) for c in ranked]
    first = loaded[0][1]
    usable = [(c, state) for c, cfg, state in loaded if all(cfg.get(k) == first.get(k) for k in MATCH)]
    build = lambda: M.build_model(first["backbone"], len(first["classes"]), weights="none").to(device)  # noqa: E731
    model, n_valid = build(), len(valid.dataset)
    model.load_state_dict(usable[0][1])
    got = {"trial": evaluate(model, valid, device)}
    runs = {"trial": ranked[0].run_id}
    seen = lambda group: label + ",".join(str(c.number) for c, _ in group)  # noqa: E731
    if soup_top >= 2:
        group = usable[:soup_top]
        members, soup, state = greedy([(c.run_id, s) for c, s in group], model, valid, device, got["trial"])
        if len(members) >= 2:
            model.load_state_dict(state)
            runs["soup"] = record(tracker, parent_id, "soup", model, first, [group[i][0].run_id for i in members],
                                  seen(group), soup.acc, n_valid)
            got["soup"] = soup
    group = usable[:ensemble_top]
    if len(group) >= 2:
        ensemble = M.Ensemble([build() for _ in group])
        for member, (_, state) in zip(ensemble.members, group):
            member.load_state_dict(state)
        got["ensemble"] = evaluate(ensemble, valid, device)
        runs["ensemble"] = record(tracker, parent_id, "ensemble", ensemble, {**first, "ensemble_size": len(group)},
                                  [c.run_id for c, _ in group], seen(group), got["ensemble"].acc, n_valid)
    accs, lead = {kind: e.acc for kind, e in got.items()}, lead_over_ensemble(got)
    log.info("the winner's candidates on validation (fp32, %d images): %s%s", n_valid,
             ", ".join(f"{k} {v:.4f}" for k, v in accs.items()),
             "" if lead is None else f"; the {one_model(accs).replace('trial', 'single model')}'s lead over the "
                                     f"ensemble: p {lead:.3g} (it wins below {LEAD_P})")
    return accs, runs, lead


def choose_winner(tracker: Tracker, parent_id: str, candidates: list[Candidate], valid, device,
                  soup_top: int, ensemble_top: int, label: str = "", tags: dict | None = None) -> str:
    """Make the soup and the ensemble of the first candidates (best first: the first is the single
    model they compete with) unless made from these already, record the winner on the parent and
    return its run id. With both flags below 2 the first candidate is the winner (as recorded).
    `label` marks the kind of candidates (e.g. "full:" for full-size models); `tags`: the parent's,
    when the caller has just read them."""
    ranked = candidates[:max(soup_top, ensemble_top, 1)]
    marker = f"{label}{','.join(str(c.number) for c in ranked)};soup={soup_top};ensemble={ensemble_top}"
    tags = tags if tags is not None else tracker.get_run(parent_id).data.tags
    if tags.get("winner.from") == marker:  # chosen from these already (another worker, or a rerun)
        return tags["winner.run_id"]
    accs, runs, lead = ({"trial": ranked[0].value}, {"trial": ranked[0].run_id}, None) if len(ranked) < 2 else \
        candidates_made(tracker, parent_id, ranked, valid, device, soup_top, ensemble_top, label)
    kind = pick(accs, lead)
    log.info("the winner is the %s (run %s)", {"trial": "single model"}.get(kind, kind), runs[kind])
    scored = tags.get("final_test.trial_run_id")
    if int(tags.get("final_test.count", "0")) and scored != runs[kind]:
        log.warning("this sweep was scored on test already (run %s); the winner chosen now is another model (run "
                    "%s): scoring it too turns the test set into a validation set, and needs final_test --force "
                    "(recorded on the runs)", scored, runs[kind])
    tracker.set_tags(parent_id, {
        "winner.kind": kind, "winner.run_id": runs[kind], "winner.best_trial": ranked[0].number,
        "winner.valid_acc": f"{accs[kind]:.6f}", **{f"winner.{k}_valid_acc": f"{accs[k]:.6f}" if k in accs else "none" for k in KINDS},
        "winner.lead_p": "none" if lead is None else f"{lead:.6g}",
        "winner.from": marker})  # last: a kill before it chooses again next time
    return runs[kind]
