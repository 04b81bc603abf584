"""benchmarks/bench_cost.py: our sweep, the seed recipe and the hand-wired peer side by side, on
tiny data; the peer is built from stock parts only (nothing of ours: no import of src/, no
cache of ours touched)."""
from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_the_handwired_peer_imports_nothing_of_ours():
    tree = ast.parse((REPO / "benchmarks" / "handwired.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {"optuna", "mlflow", "torchvision"} <= {m.split(".")[0] for m in imported}
    assert not {m for m in imported if m == "src" or m.startswith(("src.", "."))}, imported


@pytest.mark.slow
def test_bench_cost_runs_all_three_arms_and_prints_the_ratios(tmp_path, flat_folder, monkeypatch, capsys):
    import bench_cost
    import handwired

    monkeypatch.chdir(tmp_path)
    runs = []
    real_run = handwired.run

    def peer(settings):  # the peer runs with our cache out of reach: it must not need or touch it
        monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "never"))
        runs.append(settings)
        return real_run(settings)

    monkeypatch.setattr(handwired, "run", peer)
    real_arm, caches = bench_cost.run_arm, {}

    def arm(name, *rest):  # each of our arms decodes into an empty cache of its own
        cache_dir = Path(os.environ["TLSWEEP_CACHE"])
        assert not cache_dir.exists()
        got = real_arm(name, *rest)
        caches[name] = (cache_dir, (cache_dir / "images").is_dir())
        return got

    monkeypatch.setattr(bench_cost, "run_arm", arm)
    args = ["--data", str(flat_folder), "--weights", "none", "--image-size", "16", "--batch-size", "8",
            "--max-epochs", "1", "--trials", "2", "--handwired-trials", "1", "--out", str(tmp_path / "out")]
    assert bench_cost.main(args) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "never").exists()
    out_dir = tmp_path / "out"
    assert caches == {"ours": (out_dir / "cache-ours", True), "recipe": (out_dir / "cache-recipe", True)}
    assert not any(out_dir.glob("cache-*"))  # removed after each arm
    rows = {r["arm"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"ours", "recipe", "handwired"} and rows["handwired"]["trials"] == 1
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["wall_s"] > 0 for r in rows.values())
    assert rows["handwired"]["epochs"] >= 2  # both phases ran
    assert "handwired ran 1 of 2 trials: its wall time scaled" in out
    ratio = float(next(line.split()[-1] for line in out.splitlines() if line.startswith("ratio sweep_vs_handwired_wall")))
    assert ratio == pytest.approx(rows["ours"]["wall_s"] / (rows["handwired"]["wall_s"] * 2), rel=1e-2)
    assert any(line.startswith("ratio sweep_vs_recipe_wall") for line in out.splitlines())
    # the peer kept its runs in MLflow, nested under its parent, as a hand-wired sweep would
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'handwired' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("handwired")
    children = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")
    assert len(children) == 1 and "valid_acc" in children[0].data.metrics
    # a rerun skips what is done
    assert bench_cost.main(args) == 0 and len(runs) == 1
    # more peer trials asked: the peer goes on from its finished one, and its new row is reported
    more = [a if a != "1" or args[i - 1] != "--handwired-trials" else "2" for i, a in enumerate(args)]
    assert bench_cost.main(more) == 0 and len(runs) == 2 and runs[-1].trials == 2
    rows = [json.loads(r) for r in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["trials"] for r in rows if r["arm"] == "handwired"] == [1, 2]
    assert "handwired ran 2 of 2" not in capsys.readouterr().out


@pytest.mark.slow
def test_bench_fidelity_trains_each_configuration_at_each_size_and_ranks_them(tmp_path, flat_folder, capsys):
    import bench_fidelity

    args = ["--data", str(flat_folder), "--weights", "none", "--sizes", "16", "8", "--configs", "3",
            "--max-epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "fid")]
    assert bench_fidelity.main(args) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "fid" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["size"], r["config"]) for r in rows) == [(s, i) for s in (8, 16) for i in range(3)]
    assert rows[0]["params"] == rows[3]["params"]  # the same configurations at every size
    assert "fidelity spearman_8_vs_16" in out and "fidelity cost_8_vs_16" in out and "fidelity top1_8_vs_16" in out
    assert bench_fidelity.main(args) == 0  # a rerun trains nothing again
    assert len((tmp_path / "fid" / "results.jsonl").read_text().splitlines()) == 6


def test_the_handwired_peer_goes_on_from_its_finished_trials(tmp_path, split_folder):
    """Asked for more trials than its study has, the peer runs only the missing ones, draws new
    points, and counts the earlier trials' time and epochs in its figures."""
    import handwired

    settings = handwired.Settings(data=split_folder, weights="none", image_size=16, batch_size=8,
                                  max_epochs=1, trials=1, out=tmp_path / "peer")
    first = handwired.run(settings)
    assert first["trials"] == 1 and first["epochs"] == 2 and len(first["trial_s"]) == 1
    settings.trials = 2
    second = handwired.run(settings)
    assert second["trials"] == 2 and second["epochs"] == 4 and second["trial_s"][0] == first["trial_s"][0]
    assert second["wall_s"] > first["trial_s"][0]
    import optuna
    study = optuna.load_study(study_name="handwired", storage=f"sqlite:///{tmp_path / 'peer' / 'optuna.db'}")
    assert len(study.trials) == 2 and study.trials[0].params != study.trials[1].params
    assert handwired.run(settings)["trials"] == 2  # nothing left to run: no third trial
    assert len(optuna.load_study(study_name="handwired", storage=f"sqlite:///{tmp_path / 'peer' / 'optuna.db'}").trials) == 2


def test_bench_extract_precision_fills_both_caches_and_compares_their_heads(flat_folder, capsys):
    import bench_extract_precision
    args = ["--data", str(flat_folder), "--weights", "none", "--backbone", "resnet18", "--sizes", "32",
            "--epochs", "2"]
    assert bench_extract_precision.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"32 px: .*relative error 0\.0*[1-9].*linear head valid acc fp32 [01]\.\d+, bf16 [01]\.\d+", out)
    assert re.search(r"^ratio bf16_vs_fp32_extract_32 \d+\.\d+$", out, re.M)


def test_bench_fold_fills_both_caches_and_prints_the_ratios(flat_folder, capsys):
    import bench_fold
    args = ["--data", str(flat_folder), "--weights", "none", "--backbone", "resnet18", "--sizes", "32",
            "--views", "2"]
    assert bench_fold.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^32 px features: per view folded \d+\.\d+ s, unfolded \d+\.\d+ s; relative error "
                     r"\d\.\d\de-0[5-9]$", out, re.M)  # the same function, other rounding
    assert re.search(r"^ratio folded_vs_unfolded_features_32 \d+\.\d+$", out, re.M)
    assert re.search(r"^ratio folded_vs_unfolded_prefix_fp32_32 \d+\.\d+$", out, re.M)


def test_bench_loader_workers_times_both_arms_and_prints_the_ratios(flat_folder, capsys):
    import bench_loader_workers
    args = ["--data", str(flat_folder), "--weights", "none", "--backbone", "resnet18", "--sizes", "32",
            "--levels", "light", "--repeats", "1", "--steps", "2"]
    assert bench_loader_workers.main(args) == 0
    out = capsys.readouterr().out
    for what in ("prefix", "steps"):
        assert re.search(rf"^32 px light {what}: 0 workers \d+\.\d+ s, 1 worker\(s\) \d+\.\d+ s$", out, re.M)
        assert re.search(rf"^ratio workers1_vs_0_{what}_light_32 \d+\.\d+$", out, re.M)
