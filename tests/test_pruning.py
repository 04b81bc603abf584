"""Phase-aligned pruning: a step is the same phase and epoch in every trial, a trial is judged
against the others' epochs of its own phase only (never by another phase), phase 1 is left
alone unless asked, and a study made with the old global step count is refused."""
from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from src.config import PruneSettings
from src.errors import UserError
from src.pruning import PhaseAligned, make_pruner
from src.study import SEARCH_AUG, SEARCH_AUG_ATTR, check_search_augmentation, check_steps
from src.trials import STEPS, STEPS_ATTR

P1 = 10  # max_epochs_phase1: phase-2 epoch e is step 10 + e
P2 = 5


def _study(completed: list[dict[int, float]], pruner) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for values in completed:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=max(values.values()), params={"x": 0.5},
                                     distributions={"x": FloatDistribution(0, 1)}, intermediate_values=values))
    return study


def _judge(study: optuna.Study, values: dict[int, float]) -> bool:
    trial = study.ask({"x": FloatDistribution(0, 1)})
    for step, value in sorted(values.items()):
        trial.report(value, step)
    return trial.should_prune()


def _median(**kw) -> PhaseAligned:
    return make_pruner(PruneSettings(startup_trials=1, warmup_epochs=1, **kw), P1, P2)


# Two finished trials: a slow phase 1 (all 10 epochs, low) and phase 2 reaching 0.8 / 0.9.
DONE = [{**{e: 0.3 for e in range(1, P1 + 1)}, 11: 0.8, 12: 0.8},
        {**{e: 0.4 for e in range(1, P1 + 1)}, 11: 0.9, 12: 0.9}]


def test_a_phase2_epoch_is_judged_against_phase2_epochs_only_not_by_its_phase1_accuracy():
    # Its phase 1 stopped at epoch 2, high (0.95): Optuna's own median would judge phase 2 by the
    # best over all its steps (0.95) and keep it; the aligned view sees its phase-2 value, 0.5.
    weak = {1: 0.9, 2: 0.95, 11: 0.5}
    assert _judge(_study(DONE, _median()), weak)
    raw = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    assert not _judge(_study(DONE, raw), weak)  # the unaligned pruner: fooled by phase 1
    strong = {1: 0.1, 11: 0.95}  # poor phase 1, strong phase 2: kept
    assert not _judge(_study(DONE, _median()), strong)


def test_phase1_is_not_pruned_unless_asked_and_then_only_against_phase1_epochs():
    poor_head = {1: 0.1, 2: 0.1}
    assert not _judge(_study(DONE, _median()), poor_head)
    assert _judge(_study(DONE, _median(phase1=True)), poor_head)
    assert not _judge(_study(DONE, _median(phase1=True)), {1: 0.35, 2: 0.35})  # above the others' 0.3/0.4 median


def test_a_trial_that_stopped_early_keeps_its_best_at_the_epochs_it_did_not_run():
    early = [{1: 0.3, 11: 0.9}, {1: 0.3, 11: 0.92}]  # both early-stopped after phase-2 epoch 1
    assert _judge(_study(early, _median()), {1: 0.3, 11: 0.5, 12: 0.6, 13: 0.7})  # 0.7 < 0.91 at epoch 3
    assert not _judge(_study(early, _median()), {1: 0.3, 11: 0.5, 12: 0.6, 13: 0.95})


def test_successive_halving_and_percentile_see_the_aligned_view():
    strict = make_pruner(PruneSettings(pruner="percentile", percentile=10.0, startup_trials=1, warmup_epochs=1), P1, P2)
    assert _judge(_study(DONE, strict), {1: 0.99, 11: 0.85})  # not in the top 10% of 0.8/0.9
    halving = make_pruner(PruneSettings(pruner="halving", warmup_epochs=1), P1, P2)
    assert isinstance(halving, PhaseAligned) and isinstance(halving.inner, optuna.pruners.SuccessiveHalvingPruner)
    study = optuna.create_study(direction="maximize", pruner=halving)
    for values in DONE * 3:  # through the pruner, as a sweep's trials go: each records its rungs
        trial = study.ask({"x": FloatDistribution(0, 1)})
        for step, value in sorted(values.items()):
            trial.report(value, step)
            assert not trial.should_prune() or step > P1  # phase 1: never judged
        study.tell(trial, max(values.values()))
    assert _judge(study, {1: 0.99, 11: 0.1})  # phase-2 rung 1 (epoch 1): the worst of seven
    assert not _judge(study, {1: 0.01, 11: 0.95})
    assert isinstance(make_pruner(PruneSettings(pruner="none"), P1, P2), optuna.pruners.NopPruner)
    assert isinstance(make_pruner(PruneSettings(), P1, P2, enabled=False), optuna.pruners.NopPruner)


def _trained_at(level: str, **kw):
    return create_trial(params={"aug_strength": level},
                        distributions={"aug_strength": CategoricalDistribution(["light", "seed", "strong"])}, **kw)


def test_a_search_size_study_with_unscaled_trial_augmentation_is_refused_a_new_one_is_marked():
    old = optuna.create_study(study_name="old", direction="maximize")
    old.add_trial(_trained_at("light", state=TrialState.COMPLETE, value=0.5, intermediate_values={1: 0.4, 12: 0.5}))
    old.add_trial(_trained_at("strong", state=TrialState.PRUNED, intermediate_values={1: 0.4, 11: 0.3}))
    check_search_augmentation(old, 0)  # no search size: nothing to scale, resumes unmarked
    assert SEARCH_AUG_ATTR not in old.user_attrs
    with pytest.raises(UserError, match="'old'.*search size \\(64 px\\).*seed and strong \\(trials 1\\).*new --study-name"):
        check_search_augmentation(old, 64)
    assert SEARCH_AUG_ATTR not in old.user_attrs
    new = optuna.create_study(direction="maximize")
    check_search_augmentation(new, 64)
    assert new.user_attrs[SEARCH_AUG_ATTR] == SEARCH_AUG
    new.add_trial(_trained_at("seed", state=TrialState.COMPLETE, value=0.5, intermediate_values={1: 0.4, 12: 0.5}))
    check_search_augmentation(new, 64)  # its own trials: resumes


def test_an_unmarked_study_whose_trials_train_the_same_either_way_is_marked_not_refused():
    # trials of levels without pixel amounts, a queued [start] trial (workers started together on a
    # new study), one that failed before its first epoch: all train now as they would have
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trained_at("light", state=TrialState.COMPLETE, value=0.5, intermediate_values={1: 0.4, 12: 0.5}))
    study.add_trial(_trained_at("seed", state=TrialState.FAIL))
    study.enqueue_trial({"aug_strength": "strong"})
    check_search_augmentation(study, 64)
    assert study.user_attrs[SEARCH_AUG_ATTR] == SEARCH_AUG


def test_a_study_with_the_old_global_steps_is_refused_a_new_one_is_marked():
    old = optuna.create_study(study_name="old", direction="maximize")
    old.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, intermediate_values={1: 0.4, 2: 0.5}))
    with pytest.raises(UserError, match="older version.*new --study-name"):
        check_steps(old)
    new = optuna.create_study(direction="maximize")
    check_steps(new)
    assert new.user_attrs[STEPS_ATTR] == STEPS
    new.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, intermediate_values={1: 0.4, 12: 0.5}))
    check_steps(new)  # its own trials: resumes
