"""--search-size: trials train at the search size, the best configurations again at the full size
(one run each on the original split, with its checkpoint), only full-size models can win and be
scored, and the rank agreement of the two sizes is recorded."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import sweep_args
from src import final_test, sweep
from src.summary import rank_lines
from src import model as M
from src import trials as T
from src import data as D
from src.config import Fixed, TrialConfig
from src.confirm import decide
from src.confirm_jobs import FULL, fine_tuned
from src.pipeline import Pipeline, resized
from src.start import start
from src.data import stored_side
from src.errors import UserError
from src.tracking import Tracker

SEARCH = ("--search-size", "8")  # sweep_args trains at --image-size 16


def _runs(client, parent, role):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`tlsweep.role` = '{role}'")


def _config(tracker, run_id) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return M.load_checkpoint(tracker.download(run_id, "checkpoints/phase2_best.pt", Path(tmp)))["config"]


@pytest.mark.slow
def test_trials_search_small_the_best_train_full_size_and_only_those_are_scored(in_tmp, flat_folder, capsys):
    assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *SEARCH, "--search-epochs", "1")) == 0
    out = capsys.readouterr().out
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    client, tracker = MlflowClient(uri), Tracker(uri)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    assert len(study.trials) == 3  # the full-size runs are not trials: they do not count toward --trials
    parent = study.user_attrs["mlflow_parent_run_id"]
    tags = client.get_run(parent).data.tags
    assert (tags["fixed.image_size"], tags["fixed.search_size"]) == ("16", "8")  # both sizes on the parent
    assert (tags["fixed.max_epochs_phase2"], tags["fixed.search_epochs"]) == ("2", "1")  # and both phase-2 lengths
    assert (tags["train.precision"], tags["full.precision"]) == ("fp32", "fp32")  # and the precision at each
    assert tags["confirm.full_epochs"] == "0"

    # every trial trained at the search size: its params and its checkpoint say so
    for t in study.trials:
        assert client.get_run(T.run_id(t)).data.params["image_size"] == "8"
        cfg = _config(tracker, T.run_id(t))
        assert (cfg["image_size"], cfg["search_size"]) == (8, 8)
        # and for --search-epochs 1 of phase 2's 2: its last report is phase-2 epoch 1 (step 2 + 1)
        assert cfg["max_epochs_phase2"] == 1 and max(t.intermediate_values) == 3
    # the images were stored at both sides: the search size's for the trials, the full one's for the rest
    sides = {np.load(p, mmap_mode="r").shape[1] for p in (Path(os.environ["TLSWEEP_CACHE"]) / "images").glob("*.npy")}
    assert sides == {stored_side(8), stored_side(16)}

    # the K = 3 best (all three here) trained again at full size on the original split, with checkpoints
    full = {int(r.data.tags["confirm.trial"]): r for r in _runs(client, parent, "full")}
    assert sorted(full) == sorted(t.number for t in study.trials) and not _runs(client, parent, "confirm")
    for number, run in full.items():
        assert run.info.status == "FINISHED" and run.info.run_name == f"full-{number}"
        assert run.data.params["image_size"] == "16"
        # --full-epochs 0 (the default): trained again from scratch, phase 1 on the search size's features
        assert run.data.tags["full.start"] == "trained again, phase 1 at 8 px" and "phase1/best_valid_acc" in run.data.metrics
        cfg = _config(tracker, run.info.run_id)
        assert (cfg["image_size"], cfg["search_size"], cfg["max_epochs_phase2"]) == (16, 8, 2)  # every epoch
        assert float(tags[f"confirm.full.{number}"]) == pytest.approx(run.data.metrics["phase2/best_valid_acc"], abs=1e-6)  # tag: 6 decimals
        assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} >= {"figures/training_curves.png"}
    # F = 0: the best full-size valid accuracy wins, and its full-size run is the model
    winner = int(tags["confirm.winner_trial"])
    assert tags["confirm.folds"] == "0"
    assert float(tags[f"confirm.full.{winner}"]) == max(float(tags[f"confirm.full.{n}"]) for n in full)
    assert tags["confirm.winner_run_id"] == full[winner].info.run_id
    # the rank agreement of the two sizes: recorded, and flagged unreliable over 3 configurations
    assert tags["confirm.rank_agreement_configs"] == "3" and tags["confirm.rank_agreement_reliable"] == "false"
    assert "trials searched at 8 px" in out and "unreliable below 5" in out and "warning: at 8 px" not in out

    # a search-size model is refused by the final test; the parent's winner is a full-size model
    capsys.readouterr()
    assert final_test.main(["--run-id", T.run_id(study.best_trial), "--tracking-uri", uri]) == 2
    assert "search size (8 px)" in capsys.readouterr().err
    scored, _ = final_test.resolve_runs(tracker, parent)
    assert _config(tracker, scored)["image_size"] == 16
    assert scored in {tags.get("winner.run_id"), full[winner].info.run_id}
    assert final_test.main(["--run-id", parent, "--tracking-uri", uri]) == 0
    assert client.get_run(parent).data.tags["final_test.trial_run_id"] == scored

    # its full-size models were retrained (--full-epochs 0): resuming with another --full-epochs is refused
    capsys.readouterr()
    assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *SEARCH, "--full-epochs", "2")) == 2
    assert "made its full-size models with --full-epochs 0" in capsys.readouterr().err

    # a decision made for another best trial is stale: there is no full-size model to score then
    client.set_tag(parent, "confirm.best_trial", "99")
    with pytest.raises(final_test.UserError, match="no full-size model"):
        final_test.resolve_runs(tracker, parent)


def test_the_decision_at_full_size_needs_a_full_size_model_and_ranks_both_sizes(in_tmp):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    tracker = Tracker(uri)
    parent = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("e")).info.run_id

    def trial(number, value):
        return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=value,
                                         user_attrs={T.RUN_ID_ATTR: f"run{number}"})
    plan = [trial(0, 0.9), trial(1, 0.8), trial(2, 0.7)]
    for t, n in zip(plan, range(3)):
        t.number = n
    results = {(0, FULL): 0.5, (1, FULL): 0.6, (2, FULL): 0.7}  # the search size ranked them backwards
    winner = decide(tracker, parent, plan, [FULL], results, {0: "f0", 1: "f1"})  # trial 2's full run failed
    tags = tracker.get_run(parent).data.tags
    assert winner.number == 1 and tags["confirm.winner_run_id"] == "f1"  # the best with a full-size model
    assert float(tags["confirm.rank_agreement"]) == pytest.approx(-1.0)
    assert tracker.get_run(parent).data.metrics["confirm/rank_agreement"] == pytest.approx(-1.0)
    assert tags["confirm.best_trial"] == "0" and tags["confirm.folds"] == "0"
    assert decide(tracker, parent, plan, [FULL], results, {}) is None  # no full-size model: no decision


def test_a_study_keeps_its_search_size():
    from src.errors import UserError
    from src.study import check_same_settings

    study = optuna.create_study()
    check_same_settings(study, {"image_size": 16, "search_size": 8})
    check_same_settings(study, {"image_size": 16, "search_size": 8})  # the same: resumes
    for other in ({"image_size": 16}, {"image_size": 16, "search_size": 12}):  # off (left out at 0), or another
        with pytest.raises(UserError, match="search_size: 8 -> "):
            check_same_settings(study, other)
    before = optuna.create_study()  # a study made before search sizes existed resumes with none
    check_same_settings(before, {"image_size": 16})
    check_same_settings(before, {"image_size": 16})
    with pytest.raises(UserError, match="search_size: None -> 8"):
        check_same_settings(before, {"image_size": 16, "search_size": 8})


def test_a_study_keeps_its_phase1_views(in_tmp, flat_folder):
    """phase1_views is one of a study's settings: another on resume is refused, naming it. At
    "augmented" (the default of a sweep file without the key) it is left out of the recorded
    settings, as studies made before it existed recorded them: those resume as they trained."""
    default = (Path(sweep.__file__).resolve().parents[1] / "sweeps" / "default.toml").read_text()
    assert 'phase1_views = "augmented"' in default
    clean = in_tmp / "clean.toml"
    clean.write_text(default.replace('phase1_views = "augmented"', 'phase1_views = "clean"'))
    start(sweep.parse_args(sweep_args(in_tmp, flat_folder, 1, "--sweep", str(clean))))
    with pytest.raises(UserError, match="phase1_views: 'clean' -> None"):
        start(sweep.parse_args(sweep_args(in_tmp, flat_folder, 1)))  # default.toml: augmented
    old = ("--study-name", "old")  # argparse: the last --study-name wins
    start(sweep.parse_args(sweep_args(in_tmp, flat_folder, 1, *old)))
    study = optuna.load_study(study_name="old", storage=f"sqlite:///{in_tmp}/optuna.db")
    assert "phase1_views" not in study.user_attrs[T.SETTINGS_ATTR]  # as studies from before the key
    start(sweep.parse_args(sweep_args(in_tmp, flat_folder, 1, *old)))  # resumes
    with pytest.raises(UserError, match="phase1_views: None -> 'clean'"):
        start(sweep.parse_args(sweep_args(in_tmp, flat_folder, 1, *old, "--sweep", str(clean))))


def test_trials_shift_their_images_by_the_full_sizes_share(in_tmp, flat_folder):
    """The trials' augmentation is the full-size models' scaled to the search size (seed's
    padding 8 px at 16 px is 4 px at 8 px; strong's translations half as far), and the full-size
    pipeline keeps its own (src/data.py build_transform)."""
    started = start(sweep.parse_args(sweep_args(in_tmp, flat_folder, 1, *SEARCH)))
    trials, full = started.ctx.pipeline, started.full_pipeline()
    assert (trials.fixed.image_size, full.fixed.image_size) == (8, 16)

    def step(pipe, level, kind):
        return next(t for t in pipe.transform(level).transforms if type(t).__name__ == kind)
    assert step(trials, "seed", "RandomCrop").padding == [4, 4, 4, 4]
    assert step(full, "seed", "RandomCrop").padding == [8, 8, 8, 8]
    assert step(trials, "strong", "ScaledTrivialAugmentWide").scale == 0.5
    assert step(full, "strong", "TrivialAugmentWide")  # torchvision's own: the full size's cache keys as before
    assert started.study.user_attrs["search_augmentation"] == "scaled"  # marked: src/study.py check_search_augmentation


def test_a_full_size_model_is_its_trials_model_fine_tuned_at_full_size(in_tmp, flat_folder):
    """--full-epochs: the full-size job starts from the trial's saved model (not a fresh head on
    the starting backbone), at the full size, and keeps only phase 2."""
    splits = D.find_splits(flat_folder)
    fixed = Fixed(backbone="resnet18", weights="none", image_size=16, batch_size=8, max_epochs_phase1=2,
                  max_epochs_phase2=2, seed=3, search_size=8)
    pipe = Pipeline(splits=splits, fixed=fixed, weights="none", device=torch.device("cpu"), loader_workers=0)
    trial_model = pipe.model(1)
    with torch.no_grad():  # the trial's model: unlike the starting one anywhere
        for param in trial_model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    tracker = Tracker(f"sqlite:///{in_tmp}/mlflow.db")
    run_id = MlflowClient(tracker.uri).create_run(MlflowClient(tracker.uri).create_experiment("e")).info.run_id
    # a learning rate that moves nothing: what comes out is what went in
    cfg = TrialConfig("resnet18", "none", 16, 8, 2, 2, 1.0, 1e-12, 1.0, 2, "none", 5, search_size=8,
                      classes=tuple(splits.classes))
    tracker.log_files(run_id, [M.save_checkpoint(M.make_checkpoint(trial_model, {**cfg.to_dict(), "image_size": 8}, 2,
                                                                   1, 0.5), in_tmp / "phase2_best.pt")], "checkpoints")
    ended, epochs = [], []
    acc = fine_tuned(pipe, cfg, tracker, run_id, 2, epochs.append, None, lambda result, model: ended.append((result, model)))
    (result, model), = ended
    assert [(e.phase, e.step) for e in epochs] == [(2, 3), (2, 4)]  # phase 2 only, continuing the trial's steps
    assert result.phase == 2 and result.best_valid_acc == acc and 0.0 <= acc <= 1.0
    start = dict(trial_model.named_parameters())
    assert all(torch.allclose(p, start[n], atol=1e-6) for n, p in model.named_parameters())
    fresh = pipe.model(cfg.seed)
    assert not torch.allclose(dict(fresh.named_parameters())["fc.weight"], dict(model.named_parameters())["fc.weight"])


def test_a_full_size_training_fits_its_head_on_the_search_size_features(in_tmp, flat_folder):
    """A full-size run's phase 1 trains the head on the features the search cached (no backbone
    pass at the full size: the views the trials made), and its phase 2 sees full-size images."""
    splits = D.find_splits(flat_folder)
    fixed = Fixed(backbone="resnet18", weights="none", image_size=16, batch_size=8, max_epochs_phase1=2,
                  max_epochs_phase2=1, seed=3, search_size=8)
    search = Pipeline(splits=splits, fixed=dataclasses.replace(fixed, image_size=8), weights="none",
                      device=torch.device("cpu"), loader_workers=0)
    full = resized(search, fixed)
    cfg = TrialConfig("resnet18", "none", 16, 8, 2, 1, 1e-3, 0.1, 1.0, 2, "light", 5, search_size=8,
                      classes=tuple(splits.classes))
    features = Path(os.environ["TLSWEEP_CACHE"]) / "features"

    def one_pass(data) -> list[torch.Tensor]:
        return [x for epoch in range(2) for x, _ in data.phase1.train]

    searched = one_pass(search.loaders(cfg, search.model(1)))  # what the trials extracted: views 0 and 1
    cached = sorted(features.glob("*.npy"))
    model = full.model(2)
    data = full.loaders(cfg, model, head_at=search)
    assert data.phase1.module is model.fc  # the full-size model's own head learns
    assert [x.shape for x in one_pass(data)] == [x.shape for x in searched]
    assert sorted(features.glob("*.npy")) == cached  # nothing extracted at the full size
    assert next(iter(data.train))[0].shape[-1] == 16  # phase 2: full-size images
    one_pass(full.loaders(cfg, model))  # without head_at: the full size's own views, extracted now
    assert len(list(features.glob("*.npy"))) > len(cached)


def test_a_low_rank_agreement_is_warned_of_only_over_enough_configurations():
    assert "warning" in rank_lines(64, 128, "0.2000", 5)[1]
    few = rank_lines(64, 128, "0.0000", 3)  # the default K = 3: too few to tell, so no warning
    assert "unreliable below 5" in few[0] and "warning" not in " ".join(few) and "too few" in few[1]
    assert rank_lines(64, 128, "0.9000", 8) == [rank_lines(64, 128, "0.9000", 8)[0]]  # agreeing: one line
    assert len(rank_lines(64, 128, "undefined", 1)) == 1


@pytest.mark.parametrize("image_size, searched", [(224, 112), (128, 64), (160, 80), (120, 0), (32, 0)])
def test_search_size_half_is_half_the_side_and_off_below_64_px(tmp_path, image_size, searched):
    from src.config import load_sweep, resolve_fixed
    path = tmp_path / "s.toml"
    path.write_text('[fixed]\nsearch_size = "half"\n[search]\nhead_lr = 1e-3\nbackbone_lr_ratio = 0.1\n'
                    'patience = 2\naug_strength = "none"\n')
    sweep_file = load_sweep(path)
    assert resolve_fixed(sweep_file, False, {"image_size": image_size}).search_size == searched
    assert resolve_fixed(sweep_file, False, {"image_size": image_size, "search_size": 0}).search_size == 0  # the flag wins
    assert sweep.parse_args(["--search-size", "half"]).search_size == "half"
    assert sweep.parse_args(["--search-size", "48"]).search_size == 48
    for bad in (["--search-size", "\u00b2"], ["--search-size", "-8"], ["--full-epochs", "-1"]):
        with pytest.raises(SystemExit):
            sweep.parse_args(bad)
    # search_epochs: "half" of max_epochs_phase2 rounded up, only with a search size, never above it
    half = {"image_size": 128, "max_epochs_phase2": 15, "search_epochs": "half"}
    assert resolve_fixed(sweep_file, False, half).search_epochs == 8
    assert resolve_fixed(sweep_file, False, {**half, "search_size": 0}).search_epochs == 0  # no search size: off
    assert resolve_fixed(sweep_file, False, {**half, "search_epochs": 15}).search_epochs == 0  # every epoch: off
    with pytest.raises(UserError, match="search_epochs = 16 must be from 0 to max_epochs_phase2 = 15"):
        resolve_fixed(sweep_file, False, {**half, "search_epochs": 16})
    assert sweep.parse_args(["--search-epochs", "half"]).search_epochs == "half"
    assert sweep.parse_args(["--search-epochs", "3"]).search_epochs == 3
    with pytest.raises(SystemExit):
        sweep.parse_args(["--search-epochs", "some"])
    path.write_text(path.read_text().replace('"half"', '"third"'))
    with pytest.raises(UserError, match=r'search_size = .third. should be a int or "half"'):
        load_sweep(path)


@pytest.mark.slow
def test_full_epochs_fine_tunes_each_trials_model_at_full_size(in_tmp, flat_folder):
    assert sweep.main(sweep_args(in_tmp, flat_folder, 2, *SEARCH, "--full-epochs", "1", "--confirm-top", "2")) == 0
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    client = MlflowClient(uri)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).data.tags["confirm.full_epochs"] == "1"
    full = _runs(client, parent, "full")
    assert len(full) == 2
    for run in full:  # phase 2 only, one epoch, at the full size
        assert run.data.tags["full.start"] == "fine-tuned 1 epoch" and run.data.metrics["phase2/epochs"] == 1
        assert not [k for k in run.data.metrics if k.startswith("phase1/")]
        assert _config(Tracker(uri), run.info.run_id)["image_size"] == 16
