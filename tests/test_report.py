"""The parent run's report on a hand-made study: top trials, the summary page and its link,
Optuna's plots as interactive HTML and PNG."""
from __future__ import annotations

import json

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from src import report
from src.config import Fixed

DIST = {"head_lr": FloatDistribution(1e-4, 1e-1, log=True), "aug_strength": CategoricalDistribution(["none", "light"])}


def _study(values=(0.7, 0.9, None, 0.8), states=None) -> optuna.Study:
    """Trials 0..n: COMPLETE with the given values; None = PRUNED after one epoch at 0.95."""
    study = optuna.create_study(study_name="s", direction="maximize")
    for i, value in enumerate(values):
        pruned = value is None
        curve = {1: 0.95} if pruned else {1: value / 2, 2: value / 1.5, 3: value}
        study.add_trial(create_trial(
            params={"head_lr": 10 ** -(1 + i % 3), "aug_strength": ["none", "light"][i % 2]}, distributions=DIST,
            value=None if pruned else value, state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            intermediate_values=curve, user_attrs={"mlflow_run_id": f"run{i}"}))
    study.add_trial(create_trial(params={}, distributions={}, state=TrialState.FAIL))
    return study


FIXED = Fixed(backbone="resnet18", weights="imagenet", image_size=64, batch_size=32, max_epochs_phase1=3,
              max_epochs_phase2=5, seed=0)
COMMANDS = report.next_commands("PARENT", None, "sqlite:///optuna.db", "7")


def test_top_trials_rank_complete_by_value_then_pruned():
    study = _study()
    assert [t.number for t in report.top_trials(study, 3)] == [1, 3, 0]
    assert [t.number for t in report.top_trials(study, 10)] == [1, 3, 0, 2]  # pruned after, despite 0.95
    table = report.summary_table(study, 10).splitlines()
    assert table[0].split() == ["trial", "valid_acc", "state", "epochs", "aug_strength", "head_lr"]
    assert table[1].split() == ["1", "0.9000", "COMPLETE", "3", "light", "0.01"]
    assert table[4].split() == ["2", "0.9500", "PRUNED", "1", "none", "0.001"]
    assert report.summary_table(optuna.create_study()) == "no trial finished"


def test_next_commands_are_exact():
    local = report.next_commands("abc", None, "sqlite:///optuna.db", "3")
    assert local["score the sweep's winner on the test split (once)"] == "python -m src.final_test --run-id abc"
    assert local["browse the runs"] == "mlflow ui --port 5000   # then open http://127.0.0.1:5000/#/experiments/3/runs"
    assert local["browse the study"].startswith("optuna-dashboard sqlite:///optuna.db")
    journal = report.next_commands("abc", None, "journal:///data/sweep.log", "3")
    assert journal["browse the study"].startswith("optuna-dashboard /data/sweep.log ")  # its file path
    remote = report.next_commands("abc", "http://10.0.0.2:5000", "postgresql://u@h/optuna", "3")
    assert remote["score the sweep's winner on the test split (once)"].endswith("--tracking-uri http://10.0.0.2:5000")
    assert remote["browse the runs"] == "open http://10.0.0.2:5000/#/experiments/3/runs in a browser"
    _, page = report.summary(_study(), FIXED, "3", remote, report.ui_base("http://10.0.0.2:5000/"))
    assert "href='http://10.0.0.2:5000/#/experiments/3/runs/run1'" in page


def test_summary_links_the_best_trial_run_and_lists_params_and_commands():
    md, page = report.summary(_study(), FIXED, "7", COMMANDS)
    assert "[trial 1 (run run1)](#/experiments/7/runs/run1)" in md
    assert "| best valid_acc | 0.9000 |" in md
    assert "| trials | 3 complete, 1 fail, 1 pruned |" in md
    assert "| aug_strength | light |" in md and "| head_lr | 0.01 |" in md
    assert "`python -m src.final_test --run-id PARENT`" in md
    assert "<a href='http://127.0.0.1:5000/#/experiments/7/runs/run1' target='_blank'>trial 1 (run run1)</a>" in page
    assert "<code>python -m src.final_test --run-id PARENT</code>" in page
    assert page.count("<tr>") == 5 + 3 + 5 + 4  # facts, params, top trials, commands, each with a header
    fell_back, _ = report.summary(_study(), FIXED, "7", COMMANDS, weights="none")
    assert "resnet18, weights none (asked for imagenet: unavailable), 64 px" in fell_back
    tags = {"best.trial_number": "1", "best.run_id": "run1", "winner.best_trial": "1", "winner.kind": "ensemble",
            "winner.run_id": "ens", "winner.valid_acc": "0.95", "winner.trial_valid_acc": "0.9"}
    won, _ = report.summary(_study(), FIXED, "7", COMMANDS, winner=report.winner_text(tags))
    assert ("| winner (the final test scores it) | an ensemble of the best models (their class probabilities "
            "averaged), valid_acc 0.9500 (the best single model's 0.9000, both fp32; run ens) |") in won
    led = report.winner_text({**tags, "winner.valid_acc": "0.88", "winner.ensemble_valid_acc": "0.88",
                              "winner.lead_p": "0.25", "winner.soup_valid_acc": "none"})
    assert led.endswith("; the single model led it within noise (McNemar p 0.25: a one-model candidate wins only "
                        "below 0.05)")
    assert "noise" not in report.winner_text({**tags, "winner.lead_p": "1"})  # the ensemble ahead: nothing to say
    both = report.winner_text({**tags, "winner.valid_acc": "0.88", "winner.ensemble_valid_acc": "0.88",
                               "winner.lead_p": "0.25", "winner.soup_valid_acc": "0.91"})
    assert both.endswith("; the soup led it within noise (McNemar p 0.25: a one-model candidate wins only below 0.05)")
    soup = report.winner_text({**tags, "winner.kind": "soup", "winner.valid_acc": "0.97", "winner.soup_valid_acc": "0.97",
                               "winner.ensemble_valid_acc": "0.9", "winner.lead_p": "0.001"})
    assert soup.startswith("a soup of the best models' weights, valid_acc 0.9700") and \
        soup.endswith("; it led the ensemble beyond noise (McNemar p 0.001)")
    assert report.winner_text({**tags, "winner.best_trial": "0"}) is None  # chosen beside an older best: stale
    assert report.winner_text({**tags, "winner.kind": "trial"}) is None
    empty_md, _ = report.summary(optuna.create_study(study_name="e"), FIXED, "7", COMMANDS)
    assert "No trial completed yet" in empty_md


def test_study_plots_are_interactive_html_and_png(tmp_path):
    files = report.write_study_plots(_study(), tmp_path)
    names = sorted(f.name for f in files)
    assert names == sorted(["optuna_plots.html", *(f"{n}.png" for n in report.PLOTS)])
    page = (tmp_path / "optuna_plots.html").read_text()
    assert page.count("Plotly.newPlot") == len(report.PLOTS)  # each plot interactive
    assert page.count("plotly.js v") == 1  # plotly.js embedded once: works offline
    for title, _ in report.PLOTS.values():
        assert title in page
    for name in report.PLOTS:
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] >= 600


def test_a_plot_optuna_cannot_draw_is_named_not_fatal(tmp_path):
    # Every trial scored the same (common in a tiny sweep): fANOVA finds no variance to explain.
    files = report.write_study_plots(_study(values=(0.5, 0.5, 0.5)), tmp_path)
    assert "param_importances.png" not in {f.name for f in files}
    assert {"optimization_history.png", "slice.png"} <= {f.name for f in files}
    assert "not drawn: Encountered zero total variance" in (tmp_path / "optuna_plots.html").read_text()


def test_best_params_and_trials_table(tmp_path):
    [best] = report.write_best_params(_study(), tmp_path)
    assert json.loads(best.read_text()) == {"trial_number": 1, "valid_acc": 0.9, "mlflow_run_id": "run1",
                                            "params": {"head_lr": 0.01, "aug_strength": "light"}}
    csv_path, html_path = report.write_trials_table(_study(), tmp_path)
    assert csv_path.read_text().splitlines()[0].startswith("number,value,state,")
    assert "<table" in html_path.read_text()
    assert report.write_best_params(optuna.create_study(), tmp_path) == []


def test_wilson_interval_matches_the_textbook_and_names_trials_within_noise():
    import pytest

    from src.stats import wilson, within_noise

    low, high = wilson(0.8, 100)  # Wilson 95% for 80/100: 0.7112-0.8666
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)
    assert wilson(1.0, 20)[1] == 1.0 and wilson(1.0, 20)[0] == pytest.approx(0.8389, abs=1e-4)
    assert wilson(0.5, 0) == (0.0, 1.0)
    assert within_noise(0.835, {1: 0.825, 2: 0.814, 3: 0.70}, 100) == [1, 2]  # the top three: noise
    assert within_noise(0.835, {1: 0.825, 2: 0.814, 3: 0.70}, 10_000) == []
