"""--confirm-top: the K best configurations re-trained on F re-drawn splits of train + valid
(stratified, seeded, recorded, test untouched, decoded images reused), once per study and
resumable, as runs that do not count toward --trials; the best mean wins, scored by its original
trial's model."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import sweep_args
from src import cache as C
from src import confirm, confirm_jobs, device, final_test, sweep
from src import trials as T
from src.config import Fixed
from src.confirm import Confirmation, draw_folds, outcomes
from src.data import find_splits
from src import pipeline
from src.pipeline import Pipeline
from src.tracking import Tracker

ARGS = ("--confirm-top", "2", "--confirm-folds", "2")


def _runs(client, parent, role):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`tlsweep.role` = '{role}'")


def _side(tmp):
    return optuna.load_study(study_name="s" + T.CONFIRM_SUFFIX, storage=f"sqlite:///{tmp}/optuna.db")


def test_folds_are_stratified_seeded_redraws_of_the_pool():
    pool = [(r, r % 3) for r in range(30)]             # 10 images of each of 3 classes
    valid_labels = [0, 0, 1, 1, 1, 2]                  # the original valid split's composition
    folds = draw_folds(pool, valid_labels, 3, study_seed=4)
    for f in folds:
        assert sorted(f.train + f.valid) == list(range(30)) and not set(f.train) & set(f.valid)
        assert Counter(r % 3 for r in f.valid) == Counter(valid_labels)  # per class, as the original
    assert len({tuple(f.valid) for f in folds}) == 3                 # each fold its own draw
    assert [f.valid for f in draw_folds(pool, valid_labels, 3, 4)] == [f.valid for f in folds]  # seeded
    assert [f.valid for f in draw_folds(pool, valid_labels, 3, 5)] != [f.valid for f in folds]


def test_a_refold_reads_the_decoded_pool_in_place(flat_folder, monkeypatch):
    splits = find_splits(flat_folder)
    fixed = Fixed(backbone="resnet18", weights="none", image_size=16, batch_size=4, max_epochs_phase1=1,
                  max_epochs_phase2=1)
    pipe = Pipeline(splits=splits, fixed=fixed, weights="none", device=torch.device("cpu"))
    pool = pipeline.pool(pipe)
    assert len(pool) == len(splits.train) + len(splits.valid)
    fold = draw_folds(pool, pipe.labels("valid"), 1, 0)[0]
    # nothing is decoded again: the fold reads the arrays decoded at start-up (frames: once, then kept)
    monkeypatch.setattr(C, "decode_split", lambda *a, **k: pytest.fail("decoded again"))
    re = pipeline.refold(pipe, fold.train, fold.valid)
    entries = splits.train + splits.valid
    valid = re._dataset("valid", "none", False)
    assert [entries[r][1] for r in fold.valid] == valid.labels
    whole = np.concatenate([pipe.decoded["train"].array, pipe.decoded["valid"].array])
    for i, row in enumerate(fold.valid):
        assert torch.equal(valid.image(valid.rows[i]), torch.from_numpy(whole[row]).permute(2, 0, 1))
    moved = [r for r in fold.train if r >= len(splits.train)]  # original valid images now train
    assert moved and set(re._dataset("train", "frame", True).rows) == set(fold.train)
    assert re.features.model_key != pipe.features.model_key       # its own phase-1 features
    assert len(re.features.train_view("light", 0)) == len(fold.train)
    assert pipe.rows["valid"] == list(range(len(splits.valid)))  # the original is untouched


@pytest.mark.slow
def test_the_best_mean_over_re_drawn_splits_wins_once_per_study(in_tmp, flat_folder, capsys):
    import PIL.Image

    opened, real_open = [], PIL.Image.open
    PIL.Image.open = lambda fp, *a, **k: opened.append(os.path.realpath(os.fsdecode(fp))) or real_open(fp, *a, **k)
    try:
        assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *ARGS)) == 0
    finally:
        PIL.Image.open = real_open
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    client, tracker = MlflowClient(uri), Tracker(uri)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    assert len(study.trials) == 3  # the jobs are not trials of the study: they do not count toward --trials
    parent = study.user_attrs["mlflow_parent_run_id"]
    tags = client.get_run(parent).data.tags
    plan = [t.number for t in confirm.ranked(study, 2)]
    assert tags["confirm.trials"] == ",".join(map(str, plan)) and tags["confirm.folds"] == "2"
    runs = _runs(client, parent, "confirm")
    assert sorted((int(r.data.tags["confirm.trial"]), int(r.data.tags["confirm.fold"])) for r in runs) == \
        sorted((n, f) for n in plan for f in range(2))
    by_number = {t.number: t for t in study.trials}
    for r in runs:
        assert r.info.status == "FINISHED" and "valid/acc" in r.data.metrics
        original = by_number[int(r.data.tags["confirm.trial"])]
        assert r.data.params.items() >= {k: str(v) for k, v in original.params.items()}.items()  # the config, as sampled
        trained = client.get_run(T.run_id(original)).data.params
        assert r.data.params["image_size"] == trained["image_size"] == "16"
        assert r.data.params["seed"] != trained["seed"]  # a seed of its own per fold
        assert client.list_artifacts(r.info.run_id, "checkpoints") == []  # those models are never used
    means = {n: np.mean([r.data.metrics["confirm/valid_acc"] for r in runs if r.data.tags["confirm.trial"] == str(n)])
             for n in plan}
    winner = int(tags["confirm.winner_trial"])
    assert means[winner] == max(means.values())
    assert float(tags[f"confirm.mean.{winner}"]) == pytest.approx(means[winner])
    assert tags["confirm.winner_run_id"] == by_number[winner].user_attrs["mlflow_run_id"]
    assert f"the winner is trial {winner}" in capsys.readouterr().out
    # the folds are recorded; the test split is in none of them and was never opened
    splits = find_splits(flat_folder)
    folds = tracker.load_json(parent, "confirm/folds.json")["folds"]
    test = {p for p, _ in splits.test}
    pool = {p for p, _ in splits.train + splits.valid}
    assert len(folds) == 2 and all(set(f["valid"]) <= pool and not set(f["valid"]) & test for f in folds)
    assert {f["seed"] for f in folds} and folds[0]["valid"] != folds[1]["valid"]
    assert not {str(flat_folder / p) for p in test} & set(opened)

    # once per study: the same command again runs no job and decides the same
    assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *ARGS)) == 0
    assert len(_runs(client, parent, "confirm")) == 4
    assert client.get_run(parent).data.tags["confirm.winner_trial"] == str(winner)
    # the final test scores the winner's original trial (or the soup started from it)
    got, _ = final_test.resolve_runs(tracker, parent)
    soup = client.get_run(parent).data.tags
    assert got == (soup["winner.run_id"] if soup.get("winner.best_trial") == str(winner) else tags["confirm.winner_run_id"])
    assert soup["winner.best_trial"] == str(winner)  # the soup started from the confirmed winner


def test_the_final_test_takes_the_confirmed_winner_not_the_best_trial(in_tmp, flat_folder):
    # no soup, no ensemble: the winner is a trial (the ensemble wins unless a trial leads it beyond noise)
    assert sweep.main(sweep_args(in_tmp, flat_folder, 2, "--soup-top", "0", "--ensemble-top", "0")) == 0
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    client, tracker = MlflowClient(uri), Tracker(uri)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    best = T.best(study)
    other = next(t for t in study.trials if t.number != best.number)
    client.set_tag(parent, "confirm.best_trial", str(best.number))
    client.set_tag(parent, "confirm.winner_trial", str(other.number))
    client.set_tag(parent, "confirm.winner_run_id", T.run_id(other))
    assert final_test.resolve_runs(tracker, parent)[0] == T.run_id(other)
    client.set_tag(parent, "confirm.best_trial", "99")  # made for another best trial: stale, not used
    assert final_test.resolve_runs(tracker, parent)[0] == T.run_id(best)
    confirm_run = tracker.start_child(parent, "confirm-0-fold0", "confirm", {})
    with pytest.raises(Exception, match="confirmation run"):
        final_test.resolve_runs(tracker, confirm_run)


def test_a_job_scores_its_result_zero_for_a_training_fault_and_is_queued_again_when_it_died():
    side = optuna.create_study()
    add = lambda key, state, value=None, **attrs: side.add_trial(optuna.trial.create_trial(  # noqa: E731
        state=state, value=value, user_attrs=attrs, system_attrs={T.JOB_ATTR: {"trial": key[0], "fold": key[1]}}))
    add((0, 0), TrialState.FAIL, **{T.FAIL_KIND_ATTR: T.INTERRUPTED})
    add((0, 0), TrialState.COMPLETE, 0.8)                                # a retry that finished
    add((0, 1), TrialState.FAIL, **{confirm_jobs.FAULT_ATTR: True, T.FAIL_KIND_ATTR: "diverged"})
    add((1, 0), TrialState.FAIL)                                         # lost, or a storage error
    add((1, 1), TrialState.WAITING)
    for _ in range(confirm_jobs.MAX_DEAD_TRIES):
        add((2, 0), TrialState.FAIL)                                     # died again and again
    assert outcomes(side) == {(0, 0): 0.8, (0, 1): 0.0, (1, 1): None, (2, 0): 0.0}  # (1, 0): queued again


@pytest.mark.slow
def test_an_interrupted_or_failed_confirmation_resumes_and_loses_no_finished_job(in_tmp, flat_folder, monkeypatch):
    real, calls = confirm.train_on_fold, []

    def stopping(*args):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt("signal 2")
        if len(calls) == 3:
            raise OSError("the disk is full")  # not the recipe's fault: no score, queued again
        return real(*args)

    monkeypatch.setattr(confirm, "train_on_fold", stopping)
    assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *ARGS)) == 130
    side = _side(in_tmp)
    done = outcomes(side)  # one finished, two waiting; the interrupted one is queued again next time
    assert sorted(v is None for v in done.values()) == [False, True, True] and len(side.trials) == 4
    interrupted = [t for t in side.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs[T.FAIL_KIND_ATTR] == T.INTERRUPTED
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    parent = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").user_attrs[
        "mlflow_parent_run_id"]
    assert "confirm.winner_trial" not in client.get_run(parent).data.tags  # not decided on a part

    assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *ARGS)) == 0  # the storage error: a warning
    assert "confirm.winner_trial" not in client.get_run(parent).data.tags
    monkeypatch.setattr(confirm, "train_on_fold", real)
    assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *ARGS)) == 0
    states = Counter(r.info.status for r in _runs(client, parent, "confirm"))
    assert states == {"FINISHED": 4, "KILLED": 1, "FAILED": 1}  # the finished job kept, the others run again
    assert len(outcomes(_side(in_tmp))) == 4 and None not in outcomes(_side(in_tmp)).values()
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").trials) == 3
    assert "confirm.winner_trial" in client.get_run(parent).data.tags


@pytest.mark.slow
def test_a_job_whose_worker_died_is_run_again(in_tmp, flat_folder):
    assert sweep.main(sweep_args(in_tmp, flat_folder, 3)) == 0  # trials, no confirmation yet
    storage = f"sqlite:///{in_tmp}/optuna.db"
    study = optuna.load_study(study_name="s", storage=storage)
    side = T.side_study(study, T.CONFIRM_SUFFIX)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from src.recovery import worker_id

    gone = {**worker_id(), "pid": int(dead.stdout), "start": "0"}
    best = confirm.ranked(study, 1)[0]
    side.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={
        T.JOB_ATTR: {"trial": best.number, "fold": 0}}))
    lost = side.ask()  # as a worker that was killed mid-job left it: RUNNING, its process gone
    lost.set_user_attr(T.WORKER_ATTR, gone)
    assert sweep.main(sweep_args(in_tmp, flat_folder, 3, *ARGS)) == 0
    side = _side(in_tmp)
    job = [t for t in side.trials if t.system_attrs.get(T.JOB_ATTR) == {"trial": best.number, "fold": 0}]
    assert [t.state for t in job] == [TrialState.FAIL, TrialState.COMPLETE]
    assert all(v is not None for v in outcomes(side).values())


@pytest.mark.parametrize("flags, words", [
    (("--confirm-top", "1"), "--confirm-top 1"),
    (("--confirm-top", "2", "--confirm-folds", "0"), "--confirm-folds 0"),
    (("--confirm-folds", "-1"), "--confirm-folds -1"),
    (("--confirm-top", "2", "--no-cache"), "--no-cache"),
    (("--search-size", "8", "--no-cache"), "--no-cache"),
    (("--search-size", "16"), "must be below image_size = 16"),
])
def test_bad_confirmation_flags_are_clear_errors(in_tmp, flat_folder, capsys, flags, words):
    try:
        code = sweep.main(sweep_args(in_tmp, flat_folder, 1, *flags))
    except SystemExit as exc:  # argparse's
        code = exc.code
    assert code == 2 and words in capsys.readouterr().err
    assert not (in_tmp / "optuna.db").exists() or optuna.get_all_study_names(f"sqlite:///{in_tmp}/optuna.db") == []


def test_confirm_folds_without_confirm_top_is_said_to_do_nothing(caplog):
    from src.start import confirm_plan
    fixed = Fixed(search_size=0)
    assert confirm_plan(sweep.parse_args(["--confirm-folds", "2"]), fixed) == (0, 2)
    assert "--confirm-folds 2 does nothing without --confirm-top" in caplog.text
    caplog.clear()
    assert confirm_plan(sweep.parse_args(["--confirm-top", "3", "--confirm-folds", "2"]), fixed) == (3, 2)
    assert confirm_plan(sweep.parse_args([]), fixed) == (0, 3)  # nothing asked: nothing said
    assert "does nothing" not in caplog.text


def test_the_last_job_of_a_workers_confirmation_takes_every_core_once_it_runs_alone(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, tracker = MlflowClient(uri), Tracker(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    side = optuna.create_study()  # a real (in-memory) side study: two jobs claimed
    side.ask()  # this job
    other = side.ask()
    monkeypatch.setenv(device.SPLIT_ENV, "2")  # a --workers child whose share the launcher chose
    widen, cpu, before = confirm_jobs.widen_when_alone, torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)  # a --workers child's share
    try:
        widen(side, tracker, run_id, 17, cpu)
        assert torch.get_num_threads() == 1  # another job still runs: its worker keeps its core
        side.tell(other, 0.5)
        side.enqueue_trial({})  # one waits: a worker will take it
        widen(side, tracker, run_id, 18, cpu)
        assert torch.get_num_threads() == 1
        side.tell(side.ask(), 0.5)
        widen(side, tracker, run_id, 19, cpu)  # alone now
        assert torch.get_num_threads() == 2
        tags = client.get_run(run_id).data.tags
        assert (tags["train.threads_alone"], tags["train.threads_alone_from_step"]) == ("2", "19")
        torch.set_num_threads(1)
        widen(side, tracker, run_id, 20, torch.device("cuda"))
        assert torch.get_num_threads() == 1  # on a GPU the CPU threads are left alone
        monkeypatch.delenv(device.SPLIT_ENV)
        widen(side, tracker, run_id, 21, cpu)
        assert torch.get_num_threads() == 1  # a lone sweep, or a share the user set: left as it is
    finally:
        torch.set_num_threads(before)
