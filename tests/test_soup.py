"""The greedy soup: its weights are the mean of its members', it is made once per set of best
trials, and the final test scores the winner the sweep chose (the soup or the best trial), once."""
from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from conftest import sweep_args
from src import final_test, sweep
from src.soup import average


def test_average_is_the_mean_of_float_tensors_and_keeps_integer_buffers():
    states = [{"w": torch.full((2, 2), float(v)), "n": torch.tensor(v)} for v in (1, 2, 6)]
    soup = average(states)
    assert torch.equal(soup["w"], torch.full((2, 2), 3.0)) and soup["n"].item() == 1


def _ckpt(client, run_id, dst):
    return torch.load(client.download_artifacts(run_id, "checkpoints/phase2_best.pt", str(dst)), weights_only=True)


def test_the_soup_is_the_mean_of_its_members_made_once_and_final_test_scores_the_winner(in_tmp, flat_folder, capsys):
    args = sweep_args(in_tmp, flat_folder, 4, "--soup-top", "4")
    assert sweep.main(args) == 0
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("tlsweep.role") == "parent")
    soups = [r for r in runs if r.data.tags.get("tlsweep.role") == "soup"]
    assert len(soups) == 1 and soups[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    soup = soups[0]
    members = soup.data.tags["soup.members"].split(",")
    assert len(members) >= 2 and members[0] == parent.data.tags["best.run_id"]  # the best trial first
    state = _ckpt(client, soup.info.run_id, in_tmp / "soup")
    assert state["config"]["soup_members"] == members
    expected = average([_ckpt(client, m, in_tmp / m)["state_dict"] for m in members])
    for key, value in expected.items():
        assert torch.allclose(state["state_dict"][key].float(), value.float(), atol=1e-6), key
    tags = parent.data.tags
    assert tags["soup.trials"].split(",")[0] == tags["best.trial_number"]
    assert tags["winner.kind"] in ("soup", "trial") and tags["winner.best_trial"] == tags["best.trial_number"]

    assert sweep.main(args) == 0  # nothing new: no second soup
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len([r for r in runs if r.data.tags.get("tlsweep.role") == "soup"]) == 1

    # The winner the sweep chose is what the final test scores, once: here the soup.
    client.set_tag(parent.info.run_id, "winner.run_id", soup.info.run_id)
    client.set_tag(parent.info.run_id, "winner.kind", "soup")
    capsys.readouterr()
    assert final_test.main(["--run-id", parent.info.run_id, "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db"]) == 0
    assert f"trial run {soup.info.run_id}" in capsys.readouterr().out
    assert client.get_run(soup.info.run_id).data.metrics["test/acc"] >= 0.0
    assert client.get_run(parent.info.run_id).data.tags["final_test.trial_run_id"] == soup.info.run_id
    assert final_test.main(["--run-id", parent.info.run_id, "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db"]) == 2
    # A newer best trial than the soup was made from: the best trial wins, not a stale soup.
    client.set_tag(parent.info.run_id, "winner.best_trial", "99")
    assert final_test.resolve_runs(final_test.Tracker(f"sqlite:///{in_tmp}/mlflow.db"), parent.info.run_id)[0] == \
        tags["best.run_id"]
