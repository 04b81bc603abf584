"""The ensemble candidate and the winner rule (src/winner.py): an ensemble's output is the log of
its members' mean class probabilities and survives its checkpoint, the rule prefers it unless one
model leads it on validation beyond noise, a sweep makes it once, and the final test scores exactly it."""
from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from conftest import sweep_args
from src import final_test, sweep
from src import model as M
from src.data import ImageList, build_transform, loader
from src.tracking import Tracker
from src.stats import lead_p
from src.train import Evaluation
from src.winner import lead_over_ensemble, pick, record


def test_an_ensemble_outputs_the_log_of_its_members_mean_probabilities_and_survives_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    members = [M.build_model("resnet18", 3, weights="none").eval() for _ in range(2)]
    ensemble = M.Ensemble(members).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        out = ensemble(x)
    assert torch.allclose(out.exp(), mean, atol=1e-6) and torch.allclose(out.exp().sum(1), torch.ones(4))
    assert not torch.allclose(members[0](x).softmax(1), mean, atol=1e-3)  # the members differ: a real average
    config = {"backbone": "resnet18", "classes": ["a", "b", "c"], "ensemble_size": 2}
    path = M.save_checkpoint(M.make_checkpoint(ensemble, config, 2, 0, 0.5), tmp_path / "phase2_best.pt")
    rebuilt, got = M.model_from_checkpoint(path)
    assert got["ensemble_size"] == 2 and isinstance(rebuilt, M.Ensemble) and len(rebuilt.members) == 2
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), out)


def test_the_ensemble_wins_unless_one_model_beats_it_on_validation_beyond_noise():
    assert pick({"trial": 0.80}) == "trial"
    assert pick({"trial": 0.80, "soup": 0.81}) == "soup" and pick({"trial": 0.80, "soup": 0.80}) == "trial"
    assert pick({"trial": 0.80, "ensemble": 0.80}, lead=0.001) == "ensemble"  # a tie: the ensemble
    assert pick({"trial": 0.80, "soup": 0.81, "ensemble": 0.81}, lead=0.001) == "ensemble"
    assert pick({"trial": 0.80, "ensemble": 0.79}, lead=0.01) == "trial"
    assert pick({"trial": 0.80, "ensemble": 0.79}, lead=0.5) == "ensemble"  # ahead, within noise
    assert pick({"trial": 0.80, "ensemble": 0.79}) == "ensemble"  # no lead measured: none assumed
    assert pick({"trial": 0.80, "soup": 0.82, "ensemble": 0.81}, lead=0.01) == "soup"
    assert pick({"trial": 0.80, "soup": 0.80, "ensemble": 0.79}, lead=0.01) == "trial"  # a soup must beat the single


def test_a_lead_counts_only_the_images_where_the_two_disagree():
    # 283 images, the single right on one more than the ensemble: 12 images it alone got right,
    # 11 the ensemble alone; a coin gives that lead or more half the time.
    same, single, ens = [True] * 200 + [False] * 60, [True] * 12 + [False] * 11, [False] * 12 + [True] * 11
    assert lead_p(same + single, same + ens) == 0.5
    assert lead_p(same + ens, same + single) == 1.0  # behind: no lead
    assert lead_p(same, same) == 1.0  # never disagree
    # 20 images only it got right, none the other way: 0.5 ** 20
    assert math.isclose(lead_p(same + [True] * 20, same + [False] * 20), 0.5 ** 20)
    # the same accuracies with more agreement decide nothing more: only disagreements count
    assert lead_p([True] * 8 + [False] * 2, [True] * 6 + [False] * 4) == lead_p([True] * 2, [False] * 2)
    assert pick({"trial": 0.8, "ensemble": 0.75}, lead_p([True] * 8 + [False] * 2, [True] * 6 + [False] * 4)) \
        == "ensemble"  # 2 of 10 ahead: p 0.25
    with pytest.raises(ValueError, match="the same images: 3 against 2"):
        lead_p([True] * 3, [True] * 2)


def _evaluation(right: list[bool], targets=None) -> Evaluation:
    targets = targets or [i % 3 for i in range(len(right))]
    return Evaluation(0.0, sum(right) / len(right), [t if r else t + 1 for t, r in zip(targets, right)], targets)


def test_the_lead_measured_is_the_one_model_candidates_the_soup_only_where_it_beats_the_single():
    base = [True] * 20 + [False] * 10
    ensemble = _evaluation(base + [False] * 10)
    single = _evaluation(base + [True] * 6 + [False] * 4)  # 6 images ahead, none behind: p 1/64
    soup = _evaluation(base + [True] * 3 + [False] * 7)  # 3 ahead: p 1/8, below the single
    assert lead_over_ensemble({"trial": single, "ensemble": ensemble}) == 0.5 ** 6
    assert lead_over_ensemble({"trial": single, "soup": soup, "ensemble": ensemble}) == 0.5 ** 6  # the single's
    soup = _evaluation(base + [True] * 7 + [False] * 3)  # now above the single: the soup's lead counts
    assert lead_over_ensemble({"trial": single, "soup": soup, "ensemble": ensemble}) == 0.5 ** 7
    single = _evaluation(base + [True] * 2 + [False] * 8)  # a soup 2 ahead of the ensemble, the single 7
    soup, ensemble = _evaluation(base + [True] * 4 + [False] * 6), _evaluation(base + [False] * 2 + [True] * 2 + [False] * 6)
    assert lead_over_ensemble({"trial": single, "soup": soup, "ensemble": ensemble}) == 0.25  # 2 of 2: 1/4
    assert lead_over_ensemble({"trial": single}) is None
    other_images = _evaluation(base + [False] * 10, targets=[i % 2 for i in range(40)])
    assert lead_over_ensemble({"trial": single, "ensemble": other_images}) == 1.0  # not paired: no lead


def _ckpt(client, run_id, dst):
    return torch.load(client.download_artifacts(run_id, "checkpoints/phase2_best.pt", str(dst)), weights_only=True)


def test_a_sweep_makes_the_ensemble_of_its_best_trials_once_and_the_final_test_scores_exactly_it(
        in_tmp, flat_folder, capsys):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    args = sweep_args(in_tmp, flat_folder, 3, "--soup-top", "0", "--no-prune")
    assert sweep.main(args) == 0
    client = MlflowClient(uri)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    ensembles = client.search_runs([exp], "tags.`tlsweep.role` = 'ensemble'")
    assert len(ensembles) == 1 and ensembles[0].data.tags["mlflow.parentRunId"] == parent
    run = ensembles[0]
    ranked = sorted(study.trials, key=lambda t: (-t.value, t.number))
    members = run.data.tags["ensemble.members"].split(",")
    assert members == [t.user_attrs["mlflow_run_id"] for t in ranked]  # the 3 best, best first
    state = _ckpt(client, run.info.run_id, in_tmp / "ens")
    assert state["config"]["ensemble_size"] == 3 and state["config"]["ensemble_members"] == members
    member_states = [_ckpt(client, m, in_tmp / m)["state_dict"] for m in members]
    for i, member in enumerate(member_states):  # each member's weights, unchanged
        for key, value in member.items():
            assert torch.equal(state["state_dict"][f"members.{i}.{key}"], value), (i, key)
    tags = client.get_run(parent).data.tags
    assert tags["winner.kind"] in ("ensemble", "trial") and tags["winner.soup_valid_acc"] == "none"
    assert math.isclose(float(tags["winner.ensemble_valid_acc"]), run.data.metrics["ensemble/valid_acc"], abs_tol=1e-6)
    lead = float(tags["winner.lead_p"])
    assert 0.0 < lead <= 1.0
    expected_kind = pick({"trial": float(tags["winner.trial_valid_acc"]), "ensemble": float(tags["winner.ensemble_valid_acc"])},
                         lead)
    assert tags["winner.kind"] == expected_kind

    assert sweep.main(args) == 0  # nothing new: not chosen again, nothing made (and deleted) again
    assert client.get_run(parent).data.tags["winner.from"] == tags["winner.from"]
    assert len(client.search_runs([exp], "tags.`tlsweep.role` = 'ensemble'", run_view_type=ViewType.ALL)) == 1
    # Other flags choose again: without soup and ensemble the best trial is the winner.
    assert sweep.main([*args, "--ensemble-top", "0"]) == 0
    single = client.get_run(parent).data.tags
    assert (single["winner.kind"], single["winner.run_id"]) == ("trial", members[0])
    assert final_test.resolve_runs(Tracker(uri), parent)[0] == members[0]

    # The final test scores the ensemble (made the winner here if one trial beat it on these tiny
    # images): its test accuracy is that of the members' mean probabilities, computed apart.
    client.set_tag(parent, "winner.run_id", run.info.run_id)
    client.set_tag(parent, "winner.kind", "ensemble")
    split = _split(client, parent, in_tmp)
    cfg = state["config"]
    transform = build_transform("none", cfg["image_size"], cfg["mean"], cfg["std"], False)
    test = loader(ImageList(flat_folder, [tuple(e) for e in split["test"]], transform), 64, False)
    nets = []
    for member in member_states:
        net = M.build_model(cfg["backbone"], len(cfg["classes"]), weights="none")
        net.load_state_dict(member)
        nets.append(net.eval())
    right = total = 0
    with torch.no_grad():
        for x, y in test:
            mean = torch.stack([n(x).softmax(1) for n in nets]).mean(0)
            right, total = right + (mean.argmax(1) == y).sum().item(), total + len(y)
    capsys.readouterr()
    assert final_test.main(["--run-id", parent, "--tracking-uri", uri]) == 0
    assert f"model run {run.info.run_id}" in capsys.readouterr().out
    assert math.isclose(client.get_run(run.info.run_id).data.metrics["test/acc"], right / total, abs_tol=1e-6)


def _split(client, parent, tmp):
    return json.loads(open(client.download_artifacts(parent, "dataset/split.json", str(tmp))).read())


def test_a_candidate_run_a_kill_left_running_is_never_kept_and_a_second_worker_keeps_the_first_finished(in_tmp):
    tracker = Tracker(f"sqlite:///{in_tmp}/mlflow.db")
    exp = tracker.client.create_experiment("e")
    parent = tracker.client.create_run(exp, tags={"tlsweep.role": "parent"}).info.run_id
    members = ["a", "b"]
    tags = {"ensemble.members": "a,b", "ensemble.size": 2, "ensemble.trials": "3,1"}
    orphan = tracker.start_child(parent, "ensemble", "ensemble", tags)  # killed while uploading: RUNNING
    model = torch.nn.Linear(2, 2)
    first = record(tracker, parent, "ensemble", model, {"x": 1}, members, "3,1", 0.5, 10)
    assert first != orphan and tracker.get_run(first).info.status == "FINISHED"
    again = record(tracker, parent, "ensemble", model, {"x": 1}, members, "3,1", 0.5, 10)  # another worker's
    assert again == first
    live = tracker.client.search_runs([exp], "tags.`tlsweep.role` = 'ensemble' and attributes.status = 'FINISHED'")
    assert [r.info.run_id for r in live] == [first]  # the second worker's own was deleted
