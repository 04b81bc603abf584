"""End to end: real Optuna SQLite storage, real MLflow SQLite store + artifact dir, tiny images."""
from __future__ import annotations

import json
import re
import os
from collections import Counter
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import sweep_args as _args
from src import final_test, sweep
from src import model as M
from src import prefix as P
from src import device
from src.config import load_sweep
from src.errors import UserError
from src.tracking import Tracker

pytestmark = pytest.mark.slow

# Audit hook: records every file opened while `_watch` is on. Hooks cannot be removed, so one is
# installed for the session and switched by the flag.
_watch = {"on": False, "paths": []}


def _audit(event, args):
    if _watch["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _watch["paths"].append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


def _children(client, parent_id, role="trial"):
    """The parent's trial runs (or its other children: role="soup", "ensemble")."""
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`tlsweep.role` = '{role}'")


def _artifacts(client, run_id, path):
    return sorted(Path(a.path).name for a in client.list_artifacts(run_id, path))


def test_sweep_logs_every_trial_and_never_decodes_test(in_tmp, flat_folder, monkeypatch, capsys):
    import PIL.Image

    decoded, real_open = [], PIL.Image.open

    def recording_open(fp, *args, **kwargs):
        decoded.append(os.path.realpath(os.fsdecode(fp)))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", recording_open)
    _watch.update(on=True, paths=[])
    try:
        # --precision auto at 32 px (see sweep_args)
        result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 2, "--precision", "auto",
                                                        "--image-size", "32")))
    finally:
        _watch["on"] = False
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["tlsweep.role"] == "parent"
    assert parent.data.tags["best.run_id"] == result.best_run_id
    assert parent.info.status == "FINISHED"
    # --precision auto: where this CPU does bf16 natively, what was measured for this backbone and size
    # (kept in the cache for every later sweep here: asking again measures nothing); else fp32
    kept = in_tmp / "cache" / "precision.json"
    assert kept.is_file() == device.native_bf16(torch.device("cpu"))
    picks = [v["picked"] for k, v in json.loads(kept.read_text()).items() if "resnet18 | 32 px | batch 8 |" in k] \
        if kept.is_file() else ["fp32"]
    assert [parent.data.tags["train.precision"]] == picks
    assert parent.data.tags["train.device"] == "cpu"
    assert _artifacts(client, parent.info.run_id, "sweep") == ["default.toml"]
    assert _artifacts(client, parent.info.run_id, "dataset") == ["split.json", "summary.json"]
    assert set(_artifacts(client, parent.info.run_id, "study")) >= {
        "trials.csv", "trials.html", "best_params.json", "optuna_plots.html", "optimization_history.png",
        "intermediate_values.png", "parallel_coordinate.png", "slice.png", "timeline.png"}
    assert "summary.html" in _artifacts(client, parent.info.run_id, "")
    exp_id = parent.info.experiment_id
    assert f"(#/experiments/{exp_id}/runs/{result.best_run_id})" in parent.data.tags["mlflow.note.content"]
    best_params = json.loads(Path(client.download_artifacts(parent.info.run_id, "study/best_params.json",
                                                             str(in_tmp))).read_text())
    assert best_params["mlflow_run_id"] == result.best_run_id
    # The terminal: one line per trial, no progress bars (not a TTY), the top trials, what to run next.
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "it/s" not in out + err and "ep/s" not in out + err
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("trial ") and ":" in line][:2] == [
        "trial 0", "trial 1"]
    assert "trial  valid_acc     state  epochs" in out
    assert re.search(r"valid_acc \d\.\d{4}, 95% interval \d\.\d{3}-\d\.\d{3} on \d+ validation images", out)
    assert "best.valid_acc_95" in parent.data.tags
    assert f"python -m src.final_test --run-id {result.parent_run_id} --tracking-uri sqlite:///{in_tmp}/mlflow.db" in out
    assert f"mlflow ui --port 5000 --backend-store-uri sqlite:///{in_tmp}/mlflow.db" in out
    assert f"optuna-dashboard sqlite:///{in_tmp}/optuna.db" in out
    import pandas as pd

    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "study/trials.csv", str(in_tmp)))
    assert list(table["number"]) == [0, 1] and list(table["state"]) == ["COMPLETE", "COMPLETE"]
    assert {"value", "params_head_lr", "params_aug_strength", "user_attrs_mlflow_run_id"} <= set(table.columns)
    assert "user_attrs_tlsweep.worker" not in table.columns
    runs = _children(client, result.parent_run_id)
    base = M.build_model("resnet18", 3, "none")  # flat_folder: 3 classes
    assert sorted(r.info.run_name for r in runs) == ["trial-0", "trial-1"]
    assert [r.info.run_name for r in _children(client, result.parent_run_id, "soup")] in ([], ["soup"])
    assert [r.info.run_name for r in _children(client, result.parent_run_id, "ensemble")] == ["ensemble"]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    values = {t.user_attrs["mlflow_run_id"]: t.value for t in study.trials}
    for run in runs:
        assert run.data.tags["optuna.state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert values[run.info.run_id] == pytest.approx(run.data.metrics["phase2/best_valid_acc"])
        m = run.data.metrics  # its Wilson interval on the validation images
        assert m["phase2/best_valid_acc_low"] <= m["phase2/best_valid_acc"] <= m["phase2/best_valid_acc_high"]
        assert 0.0 < m["phase2/best_valid_acc_high"] - m["phase2/best_valid_acc_low"] < 1.0
        assert run.data.params["backbone"] == "resnet18" and "head_lr" in run.data.params
        # phase 2 on the frozen prefix's cached outputs where the model is cut (src/prefix.py), said by a tag
        unfreeze = run.data.params["unfreeze"]
        cut = P.cut_for(base, unfreeze if unfreeze == "all" else int(unfreeze))
        cut = cut if cut and P.checked_split(base, cut, 32) else None
        assert run.data.tags.get("phase2.cut") == cut
        assert _artifacts(client, run.info.run_id, "checkpoints") == ["phase1_best.pt", "phase2_best.pt"]
        assert _artifacts(client, run.info.run_id, "confusion") == [
            "valid_phase1.csv", "valid_phase1.png", "valid_phase2.csv", "valid_phase2.png"]
        assert _artifacts(client, run.info.run_id, "figures") == [
            "misclassified_valid.png", "per_class_valid.csv", "per_class_valid.png", "training_curves.png"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "valid/acc")]
        p1, p2 = (int(run.data.metrics[f"phase{p}/epochs"]) for p in (1, 2))
        assert steps == [*range(1, p1 + 1), *range(3, 3 + p2)] and p2 >= 1  # phase-aligned: phase-2 epoch e at 2 + e
        lr_head = client.get_metric_history(run.info.run_id, "lr/head")
        assert {m.step for m in client.get_metric_history(run.info.run_id, "lr/backbone")} < {m.step for m in lr_head}
    # The sweep listed the test files and read each once, to hash it when the split was made;
    # it decoded none of them.
    split = json.loads((flat_folder / ".tlsweep-split.json").read_text())
    test_files = {os.path.realpath(flat_folder / rel) for rel, _ in split["test"]}
    train_files = {os.path.realpath(flat_folder / rel) for rel, _ in split["train"]}
    assert train_files <= set(decoded), "no train image was seen decoded: the check would prove nothing"
    assert not (test_files & set(decoded))
    opened = Counter(_watch["paths"])
    assert all(opened[f] == 1 for f in test_files), {f: opened[f] for f in test_files}
    recorded = client.download_artifacts(result.parent_run_id, "dataset/split.json", str(in_tmp))
    assert json.loads(Path(recorded).read_text())["test_sha256"] == split["test_sha256"]
    assert sorted(split["test_sha256"]) == sorted(rel for rel, _ in split["test"])


def test_resume_by_name_and_final_test_once(in_tmp, split_folder, capsys):
    # the default with a [start] table (docs/sweep-files.md): a new study's first trial, never again
    start = {"head_lr": 1e-3, "backbone_lr_ratio": 0.1, "patience": 5, "aug_strength": "seed", "unfreeze": "all"}
    started = in_tmp / "started.toml"
    started.write_text((Path(sweep.__file__).resolve().parents[1] / "sweeps" / "default.toml").read_text()
                       + "[start]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in start.items()))
    assert load_sweep(started).start == start
    first = sweep.run_sweep(sweep.parse_args(_args(in_tmp, split_folder, 2, "--backbone", "mobilenet_v2",
                                                   "--image-size", "32", "--precision", "fp32", "--sweep", str(started))))
    again = sweep.run_sweep(sweep.parse_args(_args(in_tmp, split_folder, 3, "--backbone", "mobilenet_v2",
                                                   "--image-size", "32", "--sweep", str(started))))
    assert again.parent_run_id == first.parent_run_id  # parent reused, not duplicated
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db")
    assert [t.number for t in study.trials] == [0, 1, 2]  # 3 in total, not 2 + 3
    assert study.trials[2].params not in (study.trials[0].params, study.trials[1].params)  # no replay
    assert {k: study.trials[0].params[k] for k in start} == start  # the first trial: [start], the rest sampled
    assert all(t.params["head_lr"] != 1e-3 for t in study.trials[1:])  # a resume does not start again
    with pytest.raises(UserError, match="max_epochs_phase1: 2 -> 1"):  # other settings: refused
        sweep.run_sweep(sweep.parse_args(_args(in_tmp, split_folder, 4, "--backbone", "mobilenet_v2",
                                               "--image-size", "32", "--max-epochs", "1", "--sweep", str(started))))
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    assert len(_children(client, first.parent_run_id)) == 3
    assert client.get_run(first.parent_run_id).data.tags["train.precision"] == "fp32"
    uri = f"sqlite:///{in_tmp}/mlflow.db"

    winner = final_test.resolve_runs(Tracker(uri), first.parent_run_id)[0]  # the ensemble, soup or best trial
    assert final_test.main(["--run-id", first.parent_run_id, "--tracking-uri", uri]) == 0
    assert client.get_run(first.parent_run_id).data.tags["final_test.trial_run_id"] == winner
    best = client.get_run(winner)
    assert 0.0 <= best.data.metrics["test/acc"] <= 1.0 and "test/macro_f1" in best.data.metrics
    assert {"test.csv", "test.png"} <= set(_artifacts(client, winner, "confusion"))
    assert _artifacts(client, winner, "report") == ["test_per_class.csv"]
    assert client.get_run(first.parent_run_id).data.metrics["test/acc"] == best.data.metrics["test/acc"]

    capsys.readouterr()
    assert final_test.main(["--run-id", first.parent_run_id, "--tracking-uri", uri]) == 2
    assert "already scored" in capsys.readouterr().err
    assert final_test.main(["--run-id", again.best_run_id, "--tracking-uri", uri]) == 2  # trial id too
    assert final_test.main(["--run-id", first.parent_run_id, "--tracking-uri", uri, "--force"]) == 0
    tags = client.get_run(first.parent_run_id).data.tags
    assert tags["final_test.count"] == "2" and tags["final_test.forced"] == "true"


def test_final_test_errors(in_tmp, flat_folder, capsys):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 1)))
    assert final_test.main(["--run-id", "0123456789abcdef", "--tracking-uri", uri]) == 2
    assert "not found in tracking store" in capsys.readouterr().err
    other = f"sqlite:///{in_tmp}/other.db"
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", other]) == 2
    assert other in capsys.readouterr().err
    client = MlflowClient(uri)
    foreign = client.create_run(client.get_run(result.parent_run_id).info.experiment_id).info.run_id
    assert final_test.main(["--run-id", foreign, "--tracking-uri", uri]) == 2
    assert "not made by src.sweep" in capsys.readouterr().err
    # A trial run that never saved a phase-2 checkpoint (e.g. pruned in phase 1).
    exp_id = client.get_run(result.parent_run_id).info.experiment_id
    tags = {"tlsweep.role": "trial", "mlflow.parentRunId": result.parent_run_id}
    pruned = client.create_run(exp_id, tags={**tags, "optuna.state": "PRUNED"}).info.run_id
    assert final_test.main(["--run-id", pruned, "--tracking-uri", uri]) == 2
    assert "is PRUNED, not COMPLETE" in capsys.readouterr().err
    lost = client.create_run(exp_id, tags={**tags, "optuna.state": "COMPLETE"}).info.run_id
    assert final_test.main(["--run-id", lost, "--tracking-uri", uri]) == 2
    assert "no artifact checkpoints/phase2_best.pt" in capsys.readouterr().err
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri, "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err


def test_offline_imagenet_weights_fail_before_training(in_tmp, flat_folder, capsys):
    args = _args(in_tmp, flat_folder, 1)
    args[args.index("--weights") + 1] = "imagenet"
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "--weights PATH" in err
    names = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{in_tmp}/optuna.db")] \
        if (in_tmp / "optuna.db").exists() else []
    assert names == []  # nothing started


def test_demo_falls_back_to_random_init_with_a_tag(in_tmp):
    args = ["--trials", "1", "--image-size", "16", "--max-epochs", "1", "--batch-size", "128", "--precision", "fp32",
            "--storage", f"sqlite:///{in_tmp}/optuna.db", "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db"]
    result = sweep.run_sweep(sweep.parse_args(args))
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    tags = client.get_run(result.parent_run_id).data.tags
    assert tags["weights.unavailable"] == "true" and tags["weights.effective"] == "none"
    summary = json.loads(Path(client.download_artifacts(result.parent_run_id, "dataset/summary.json",
                                                        str(in_tmp))).read_text())
    assert summary["n_classes"] == 10 and sum(summary["counts"].values()) == 1797


def test_bad_inputs_exit_cleanly(in_tmp, capsys, tmp_path):
    assert sweep.main(_args(in_tmp, tmp_path / "nope")) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        sweep.main(_args(in_tmp, tmp_path, 0))
    assert exc.value.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[fixed]\nbackbon = 'resnet18'\n")
    assert sweep.main(_args(in_tmp, tmp_path, 1, "--sweep", str(bad))) == 2
    assert "backbon" in capsys.readouterr().err
    assert sweep.main(_args(in_tmp, tmp_path, 1, "--backbone", "resnet17")) == 2
    assert "unknown backbone 'resnet17'" in capsys.readouterr().err


def test_unusable_stores_are_named(in_tmp, flat_folder, capsys):
    args = _args(in_tmp, flat_folder, 1)
    bad_storage = list(args)
    bad_storage[bad_storage.index("--storage") + 1] = "notaurl"
    assert sweep.main(bad_storage) == 2
    assert "--storage notaurl" in capsys.readouterr().err
    for uri in ("http://127.0.0.1:9", "foo://bar"):  # port 9 (discard): nothing listens here
        bad_tracking = list(args)
        bad_tracking[bad_tracking.index("--tracking-uri") + 1] = uri
        assert sweep.main(bad_tracking) == 2
        assert f"--tracking-uri {uri}" in capsys.readouterr().err
        assert final_test.main(["--run-id", "abc", "--tracking-uri", uri]) == 2
        assert f"--tracking-uri {uri}" in capsys.readouterr().err


def test_pruned_trials_are_recorded_and_counted(in_tmp, flat_folder, monkeypatch):
    import weakref

    from src.pipeline import Pipeline

    from src import start

    monkeypatch.setattr(start, "make_pruner", lambda *a, **k: optuna.pruners.ThresholdPruner(lower=1.1))
    models, build = [], Pipeline.model

    def tracked(self, trial_seed):
        # no gc.collect() here: freed means freed by the time the next trial starts
        assert all(ref() is None for ref in models), "a pruned trial's model is still alive"
        model = build(self, trial_seed)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(Pipeline, "model", tracked)
    result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 2)))
    assert len(models) == 2  # one model per trial (the starting model is built once, not here)
    assert result.n_finished == 2 and result.best_value is None  # pruned trials count toward --trials
    assert result.epochs_spent == 2  # pruned at the first epoch of each trial
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    for run in _children(client, result.parent_run_id):
        assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "FINISHED"
        assert "phase 1, epoch 1 (step 1" in run.data.tags["optuna.prune_reason"]
    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["sweep/epochs_saved_by_pruning_max"] == 2 * (2 + 2 - 1)
    assert sweep.main(_args(in_tmp, flat_folder, 3)) == 1  # nothing ever completed: not a success


def test_phase1_on_cached_features_leaves_the_backbone_as_initialized(in_tmp, flat_folder):
    result = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 1)))
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    path = client.download_artifacts(result.best_run_id, "checkpoints/phase1_best.pt", str(in_tmp))
    after = torch.load(path, weights_only=True)["state_dict"]
    torch.manual_seed(0)  # the backbone is drawn from the study seed (0 in the default sweep)
    before = M.build_model("resnet18", 3, "none").state_dict()
    backbone = [k for k in before if not k.startswith("fc.")]
    assert any("running_var" in k for k in backbone)
    for k in backbone:  # weights AND BatchNorm running stats
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_progress_bars_in_a_terminal(in_tmp, flat_folder):
    """In a terminal (a real pseudo-terminal here) there is a bar for trials and one for the
    epochs of the running trial; the log-file case (no TTY) is checked in the first test."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "src.sweep", *_args(in_tmp, flat_folder)], cwd=in_tmp, env=env,
                            stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")[-3000:]
    text = seen.decode(errors="replace")
    bars = [part for part in text.split("\r") if "%|" in part]  # tqdm redraws a bar after a carriage return
    assert any(b.startswith("trials: 100%|") and "2/2" in b for b in bars), bars
    assert any(b.startswith("trial 0:") and "/4 [" in b for b in bars), bars  # epochs of trial 0: 2 + 2
    assert any(b.startswith("trial 1:") for b in bars), bars


def test_a_report_that_cannot_be_written_is_a_warning_not_the_outcome(in_tmp, flat_folder, monkeypatch, caplog):
    from src import report

    def broken(study, folder):
        raise RuntimeError("plotting broke")

    working = report.write_study_plots
    monkeypatch.setattr(report, "write_study_plots", broken)
    assert sweep.main(_args(in_tmp, flat_folder, 1)) == 0
    assert "could not write the sweep's report" in caplog.text and "plotting broke" in caplog.text
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    [parent] = client.search_runs([client.get_experiment_by_name("flat").experiment_id],  # per data set
                                  "tags.`tlsweep.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    monkeypatch.setattr(report, "write_study_plots", working)
    assert sweep.main(_args(in_tmp, flat_folder, 1)) == 0  # the same command again: the report is written
    assert "optuna_plots.html" in _artifacts(client, parent.info.run_id, "study")


def test_a_study_of_the_old_default_is_told_to_resume_with_four_toml(in_tmp, flat_folder, capsys):
    """A study started with the four-parameter default (then sweeps/default.toml) is refused by
    the new default (its search space changed), naming the command that resumes it, which does:
    the same study, the same parent run."""
    sweeps = Path(sweep.__file__).resolve().parents[1] / "sweeps"
    (in_tmp / "old").mkdir()
    old_default = in_tmp / "old" / "default.toml"
    old_default.write_text((sweeps / "four.toml").read_text())
    first = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 1, "--sweep", str(old_default))))
    assert sweep.main(_args(in_tmp, flat_folder, 2)) == 2  # sweeps/default.toml
    err = capsys.readouterr().err
    hint = "--sweep sweeps/four.toml --study-name s)"
    assert "started with other settings" in err and "weight_decay" in err and hint in err
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").trials) == 1
    again = sweep.run_sweep(sweep.parse_args(_args(in_tmp, flat_folder, 2, "--sweep", str(sweeps / "four.toml"))))
    assert again.parent_run_id == first.parent_run_id
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/optuna.db").trials) == 2


def test_an_unfreeze_choice_beyond_the_backbone_is_refused_before_any_trial(in_tmp, flat_folder, capsys):
    sweep_file = in_tmp / "deep.toml"
    text = (Path(sweep.__file__).resolve().parents[1] / "sweeps" / "default.toml").read_text()
    sweep_file.write_text(text.replace('unfreeze = { choices = ["all", 1, 2, 3] }', 'unfreeze = { choices = ["all", 6] }'))
    assert sweep.main(_args(in_tmp, flat_folder, 1) + ["--sweep", str(sweep_file)]) == 2
    err = capsys.readouterr().err
    assert "unfreeze" in err and "5 stages" in err and str(sweep_file) in err
    assert optuna.get_all_study_summaries(f"sqlite:///{in_tmp}/optuna.db") == []  # refused before the study opens
