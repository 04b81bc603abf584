"""The greedy soup: its weights are the mean of its members', it is made once per set of best
trials, and the final test scores the winner the sweep chose (the soup or the best trial), once."""
from __future__ import annotations

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial

from conftest import sweep_args
from src import final_test, sweep
from src import model as M
from src.data import ImageList, build_transform, find_splits, loader
from src.soup import average, trial_candidates
from src.tracking import Tracker
from src.winner import choose_winner


def test_average_is_the_mean_of_float_tensors_and_keeps_integer_buffers():
    states = [{"w": torch.full((2, 2), float(v)), "n": torch.tensor(v)} for v in (1, 2, 6)]
    soup = average(states)
    assert torch.equal(soup["w"], torch.full((2, 2), 3.0)) and soup["n"].item() == 1


def _ckpt(client, run_id, dst):
    return torch.load(client.download_artifacts(run_id, "checkpoints/phase2_best.pt", str(dst)), weights_only=True)


def test_the_soup_is_the_mean_of_its_members_made_once_and_final_test_scores_the_winner(in_tmp, flat_folder, capsys):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    assert sweep.main(sweep_args(in_tmp, flat_folder, 2, "--soup-top", "0", "--ensemble-top", "0")) == 0  # no soup yet
    tracker, client = Tracker(uri), MlflowClient(uri)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    best = max(study.trials, key=lambda t: t.value)
    # A third candidate that must join: the best trial's weights, nudged (the same predictions).
    ckpt = _ckpt(client, best.user_attrs["mlflow_run_id"], in_tmp / "best")
    ckpt["state_dict"] = {k: v + 1e-6 * torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in ckpt["state_dict"].items()}
    twin = tracker.start_trial(parent, 2, {})
    tracker.log_files(twin, [M.save_checkpoint(ckpt, in_tmp / "phase2_best.pt")], "checkpoints")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=best.value - 1e-9, params={},
                                 distributions={}, user_attrs={"mlflow_run_id": twin}))

    splits = find_splits(flat_folder)
    mean, std = M.norm_stats("resnet18")
    valid = loader(ImageList(flat_folder, splits.valid, build_transform("none", 16, mean, std, False)), 8, False)
    choose_winner(tracker, parent, trial_candidates(study), valid, torch.device("cpu"), soup_top=3, ensemble_top=0)
    runs = client.search_runs([client.get_run(parent).info.experiment_id])
    soups = [r for r in runs if r.data.tags.get("tlsweep.role") == "soup"]
    assert len(soups) == 1 and soups[0].data.tags["mlflow.parentRunId"] == parent
    soup = soups[0]
    members = soup.data.tags["soup.members"].split(",")
    assert members[:2] == [best.user_attrs["mlflow_run_id"], twin]  # best first, then its twin, kept
    state = _ckpt(client, soup.info.run_id, in_tmp / "soup")
    assert state["config"]["soup_members"] == members
    expected = average([_ckpt(client, m, in_tmp / m)["state_dict"] for m in members])
    for key, value in expected.items():  # the mean of its members' weights, BatchNorm statistics too
        got = state["state_dict"][key].float()
        assert torch.allclose(got, value.float(), rtol=0, atol=1e-6), (key, members, (got - value.float()).abs().max())
    tags = client.get_run(parent).data.tags
    assert soup.data.tags["soup.trials"].split(",")[:2] == [str(best.number), "2"]
    assert tags["winner.best_trial"] == str(best.number) and tags["winner.kind"] in ("soup", "trial")

    # The same trials: not again.
    choose_winner(tracker, parent, trial_candidates(study), valid, torch.device("cpu"), soup_top=3, ensemble_top=0)
    runs = client.search_runs([client.get_run(parent).info.experiment_id])
    assert len([r for r in runs if r.data.tags.get("tlsweep.role") == "soup"]) == 1

    # The winner the sweep chose is what the final test scores, once: here the soup.
    client.set_tag(parent, "winner.run_id", soup.info.run_id)
    client.set_tag(parent, "winner.kind", "soup")
    client.set_tag(parent, "winner.best_trial", client.get_run(parent).data.tags["best.trial_number"])
    capsys.readouterr()
    assert final_test.main(["--run-id", parent, "--tracking-uri", uri]) == 0
    assert f"model run {soup.info.run_id}" in capsys.readouterr().out
    assert client.get_run(soup.info.run_id).data.metrics["test/acc"] >= 0.0
    assert client.get_run(parent).data.tags["final_test.trial_run_id"] == soup.info.run_id
    assert final_test.main(["--run-id", parent, "--tracking-uri", uri]) == 2  # once
    # A newer best trial than the soup was made from: the best trial wins, not a stale soup.
    client.set_tag(parent, "winner.best_trial", "99")
    assert final_test.resolve_runs(tracker, parent)[0] == client.get_run(parent).data.tags["best.run_id"]
