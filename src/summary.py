"""How a sweep ends: its result, the parent's report written (src/report.py), and the terminal's
summary with the exact commands to run next."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import optuna

from . import trials as T
from .report import SCORE, log_report, next_commands, summary_table, ui_base, winner_text
from .start import Started
from .confirm import Confirmation
from .confirm_jobs import FULL, RELIABLE_FROM, completed_runs
from .errors import UserError
from .soup import FULL_LABEL, Candidate, trial_candidates
from .stats import wilson, within_noise
from .study import pruning_savings
from .winner import choose_winner

log = logging.getLogger("tlsweep")
LOW_AGREEMENT = 0.5  # a rank agreement below this is warned of


@dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_run_id: str | None
    best_trial_number: int | None
    n_finished: int
    epochs_spent: int             # global epochs actually trained, over all finished trials
    interrupted: bool = False
    stopped_reason: str | None = None  # set when too many trials failed in a row


def result(study: optuna.Study, parent_id: str, epochs_spent: int, interrupted: bool,
           stopped_reason: str | None = None) -> SweepResult:
    best = T.best(study)
    return SweepResult(study.study_name, parent_id, best.value if best else None, T.run_id(best) if best else None,
                       best.number if best else None, len(T.finished(study)), epochs_spent, interrupted,
                       stopped_reason)


def commands(started: Started, tracking_uri: str | None, storage: str) -> dict:
    return next_commands(started.parent_id, tracking_uri, storage, started.experiment_id)


def try_confirm(started: Started, study: optuna.Study, decide: bool = True) -> bool:
    """The confirmation (src/confirm.py; `started.confirm`: K, F), when asked (or a search size
    needs it) and no trial runs any more; False while trials still run elsewhere (the worker that
    ends last confirms), else True. `decide` False (a `--workers` child): only its share of the
    jobs. A failure that is not a training fault is a warning: the jobs done are kept and the same
    command takes it up again."""
    top, folds = started.confirm
    if top < (1 if started.searching else 2):
        return True
    if T.running(study):
        log.info("confirmation: trials still run elsewhere; the worker that ends last confirms")
        return False
    try:
        Confirmation(started.tracker, started.parent_id, study, started.ctx.pipeline, started.ctx.search, top, folds,
                     started.full_amp if started.searching else started.ctx.amp, full=started.full_pipeline(),
                     full_epochs=started.full_epochs).run(decide_after=decide)
        return True
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as exc:  # noqa: BLE001 - storages and artifact stores fail in many ways
        log.warning("confirmation stopped (%s: %s); re-run the same command to finish it (its finished "
                    "jobs are kept); until then the parent's tags name the winner as before", type(exc).__name__, exc)
        return True


def winner_candidates(started: Started, study: optuna.Study, tags: dict) -> tuple[list[Candidate], str]:
    """What the soup and the ensemble may draw on, best first, and its label: the trials (the
    confirmed winner first); with a search size, the confirmed configurations' full-size runs (the winner first,
    then by full-size valid accuracy), none before the confirmation decided."""
    picked = T.confirmed_winner(tags)  # `tags`: the parent's, as they are now
    if not started.searching:
        return trial_candidates(study, int(picked[0]) if picked else None), ""
    if not picked:
        return [], FULL_LABEL
    runs = completed_runs(T.side_study(study, T.CONFIRM_SUFFIX), FULL)
    plan = [int(n) for n in tags["confirm.trials"].split(",") if int(n) in runs]
    ranked = sorted(plan, key=lambda n: (n != int(picked[0]), -float(tags[f"confirm.full.{n}"]), n))
    return [Candidate(n, runs[n], float(tags[f"confirm.full.{n}"])) for n in ranked], FULL_LABEL


def try_winner(started: Started, study: optuna.Study, soup_top: int, ensemble_top: int) -> None:
    """The soup and the ensemble (src/winner.py) are candidates, the trials stand without them: a
    failure to make them is a warning, and the best trial (or the confirmed one, src/confirm.py)
    is the winner (an earlier choice's tags are set aside)."""
    if T.running(study):
        return  # other workers still at it: the last one chooses
    try:
        tags = started.tracker.get_run(started.parent_id).data.tags  # read once for both
        candidates, label = winner_candidates(started, study, tags)
        if not candidates:
            return
        pipe = started.full_pipeline() or started.ctx.pipeline  # judged at the size the winner has
        choose_winner(started.tracker, started.parent_id, candidates, pipe.valid_loader(2 * pipe.fixed.batch_size),
                      pipe.device, soup_top, ensemble_top, label, tags)
    except Exception as exc:  # noqa: BLE001 - artifact stores and checkpoints fail in many ways
        log.warning("no soup or ensemble was made (%s: %s); the best trial is the winner", type(exc).__name__, exc)
        try:  # `winner.best_trial` no longer the best's: src/trials.py `winner` passes over the tags
            started.tracker.set_tags(started.parent_id, {"winner.best_trial": "none", "winner.from": "none"})
        except Exception:  # noqa: BLE001 - the store that just failed may fail again
            log.warning("the parent's winner tags could not be set aside; re-run the same command")


def write_report(started: Started, study: optuna.Study, tracking_uri: str | None, storage: str) -> None:
    """The parent run's summary page, tables and plots, as the study is now. They are derived from
    the study, so a failure here is a warning, never the sweep's outcome: the next run of the same
    command writes them again."""
    pipe = started.ctx.pipeline
    try:
        log_report(started.tracker, started.parent_id, started.experiment_id, study, pipe.fixed, pipe.weights,
                   commands(started, tracking_uri, storage), ui_base(tracking_uri))
    except Exception as exc:  # plotting or artifact-store trouble
        log.warning("could not write the sweep's report on parent run %s (%s: %s); the trials are "
                    "unaffected, and re-running the same command writes it", started.parent_id,
                    type(exc).__name__, exc)


def print_confirmation(tags: dict, picked: tuple[str, str]) -> None:
    """The confirmation's decision (src/confirm.py), and with a search size the sizes and how well
    the search size ranked the configurations (warned when low)."""
    means = ", ".join(f"trial {n} {float(tags[f'confirm.mean.{n}']):.4f}" for n in tags["confirm.trials"].split(","))
    search, full = int(tags.get("fixed.search_size", 0)), tags.get("fixed.image_size")
    folds = int(tags["confirm.folds"])
    how = (f"on {folds} re-drawn train/valid splits" if folds else "on the original split") + (
        f" at the full {full} px" if search else "")
    print(f"confirmed {how} (mean valid_acc): {means}; the winner is trial {picked[0]} (its "
          f"{'full-size' if search else 'original'} run {picked[1]})")
    if not search:
        return
    print("\n".join(rank_lines(search, full, tags.get("confirm.rank_agreement", "undefined"),
                                int(tags.get("confirm.rank_agreement_configs", 0)))))


def rank_lines(search: int, full: int | str, rho: str, n: int) -> list[str]:
    """The summary's lines on how well the search size ranked the configurations: a warning
    when the agreement is low over enough of them (RELIABLE_FROM) to tell."""
    lines = [f"trials searched at {search} px; rank agreement (Spearman) of their valid_acc with the full size's: "
             f"{rho} over {n} configurations" + ("" if n >= RELIABLE_FROM else f" (unreliable below {RELIABLE_FROM})")]
    if rho != "undefined" and float(rho) < LOW_AGREEMENT:
        lines.append(f"  warning: at {search} px the configurations rank unlike at {full} px; a larger --search-size "
                     f"(or 0: none) searches more faithfully" if n >= RELIABLE_FROM else
                     f"  (too few to judge the search size by; --confirm-top {RELIABLE_FROM} or more measures it)")
    return lines


def print_summary(started: Started, study: optuna.Study, tracking_uri: str | None, storage: str) -> int:
    """The terminal's summary: counts, the top trials, epochs spent, the best trial and what to run
    next (logged on the parent too); returns the epochs spent."""
    completed, best = T.completed(study), T.best(study)
    role = "final_test --run-id takes this one" if best is not None else "no trial to test yet"
    print(f"\nstudy {study.study_name!r}: {len(T.finished(study))} finished trials ({len(completed)} complete)\n"
          f"parent run (the whole sweep; {role}): {started.parent_id}")
    print(summary_table(study))
    spent, pruned_max = pruning_savings(study, started.ctx.pipeline.fixed)
    print(f"epochs spent: {spent}; pruned trials could have run up to {pruned_max} more without pruning")
    if best is not None:
        n = int(study.user_attrs.get(T.VALID_IMAGES_ATTR, 0))
        low, high = wilson(best.value, n)
        print(f"\nbest: trial {best.number}, valid_acc {best.value:.4f}, 95% interval {low:.3f}-{high:.3f} "
              f"on {n} validation images\n  best trial's run (one trial's, under the parent): {T.run_id(best)}")
        close = within_noise(best.value, {t.number: t.value for t in completed if t.number != best.number}, n)
        if close:
            shown = ", ".join(str(k) for k in sorted(close)[:8]) + (" ..." if len(close) > 8 else "")
            print(f"  within noise of it: trial(s) {shown} ({len(close)} in all) reach its interval; on this "
                  f"validation set their order is not evidence (a larger split narrows it)")
        tags = started.tracker.get_run(started.parent_id).data.tags
        picked = T.confirmed_winner(tags)
        if picked:
            print_confirmation(tags, picked)
        text = winner_text(tags)
        if text:
            print(f"winner: {text}; the final test scores it")
        print("Next:")
    else:
        print("\nno trial completed yet (see optuna.fail_reason on the trial runs). Next:")
    for what, cmd in commands(started, tracking_uri, storage).items():
        if best is not None or what != SCORE:  # nothing to score yet
            print(f"  # {what}\n  {cmd}")
    started.tracker.log_metrics(started.parent_id, {"sweep/epochs_spent": spent,
                                                    "sweep/epochs_saved_by_pruning_max": pruned_max})
    return spent
