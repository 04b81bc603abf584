"""What a user reads about a whole sweep: the parent run's artifacts and the terminal summary.

Parent run (written when a sweep, or a worker, ends; rewritten by the next):
  summary.html              one page: counts, best trial with a link to its run, best params,
                            top trials, the commands to run next; the same as Markdown is the
                            run's description (the Overview tab of the MLflow UI)
  study/best_params.json    the best trial's number, value, params and run id
  study/trials.{csv,html}   every trial (Optuna's trials_dataframe)
  study/optuna_plots.html   Optuna's plots, interactive (plotly, one self-contained page)
  study/<plot>.png          the same plots as images (Optuna's matplotlib flavour)
"""
from __future__ import annotations

import html
import json
import logging
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import optuna

from . import trials as T
from .config import Fixed
from .stats import LEAD_P
from .tracking import Tracker

log = logging.getLogger("tlsweep")

# name -> (title, takes an importance evaluator); `plot_<name>` exists in optuna.visualization
# (plotly) and in optuna.visualization.matplotlib.
PLOTS = {
    "optimization_history": ("Optimization history", False),
    "intermediate_values": ("Validation accuracy per epoch of every trial (pruned ones stop early)", False),
    "param_importances": ("Parameter importances (fANOVA)", True),
    "parallel_coordinate": ("Parallel coordinates", False),
    "slice": ("Slice plots: the objective against each parameter", False),
    "timeline": ("Timeline of the trials (per state; workers overlap)", False),
}
SCORE = "score the sweep's winner on the test split (once)"  # the key of that command in next_commands
WHAT = {"soup": "a soup of the best models' weights",
        "ensemble": "an ensemble of the best models (their class probabilities averaged)"}
MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui --port 5000`
DESCRIPTION_MAX = 7500  # MLflow keeps tag values up to 8000 characters


def top_trials(study: optuna.Study, top: int = 5) -> list:
    """Complete trials by value (best first), then, if fewer than `top`, pruned ones by the last
    accuracy they reported (a pruned trial's value is a mid-training one, so it ranks below)."""
    pruned = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
              if t.intermediate_values]
    done = sorted(T.completed(study), key=lambda t: -t.value)
    late = sorted(pruned, key=lambda t: -t.intermediate_values[max(t.intermediate_values)])
    return (done + late)[:top]


def _value(t) -> float | None:
    if t.value is not None:
        return t.value
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_rows(study: optuna.Study, top: int = 5) -> tuple[list[str], list[list[str]]]:
    """The top trials as a table: header and rows of strings (terminal, Markdown and HTML)."""
    trials = top_trials(study, top)
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", "valid_acc", "state", "epochs", *keys]
    rows = [[str(t.number), f"{_value(t):.4f}" if _value(t) is not None else "-", t.state.name,
             str(len(t.intermediate_values)), *(_fmt(t.params.get(k, "")) for k in keys)] for t in trials]
    return header, rows


def summary_table(study: optuna.Study, top: int = 5) -> str:
    """The terminal's table of the top trials (value, state, epochs used, params)."""
    header, rows = trial_rows(study, top)
    if not rows:
        return "no trial finished"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows])


def ui_base(tracking_uri: str | None) -> str:
    """Where the MLflow UI is: the tracking server itself, or what `mlflow ui --port 5000` serves."""
    return tracking_uri.rstrip("/") if tracking_uri and tracking_uri.startswith("http") else MLFLOW_UI


def next_commands(parent_id: str, tracking_uri: str | None, storage: str, experiment_id: str) -> dict:
    """The exact commands a user runs next: score the winner, browse runs, browse the study."""
    uri = f" --tracking-uri {tracking_uri}" if tracking_uri else ""
    runs = f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs"
    if tracking_uri and tracking_uri.startswith("http"):
        browse = f"open {runs} in a browser"
    else:
        browse = ("mlflow ui --port 5000" + (f" --backend-store-uri {tracking_uri}" if tracking_uri else "")
                  + f"   # then open {runs}")
    return {SCORE: f"python -m src.final_test --run-id {parent_id}{uri}",
            "browse the runs": browse,
            "browse the study": f"optuna-dashboard {dashboard_storage(storage)}   # pip install optuna-dashboard"}


def dashboard_storage(storage: str) -> str:
    """What optuna-dashboard takes: an RDB URL as is; a journal file by its path."""
    return storage.removeprefix("journal://") if storage.startswith("journal://") else storage


# -- parent artifacts ------------------------------------------------------------------------
def log_report(tracker: Tracker, parent_id: str, experiment_id: str, study: optuna.Study, fixed: Fixed,
               weights: str, commands: dict, ui: str = MLFLOW_UI) -> None:
    """Everything a user looks at on the parent run (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_trials_table(study, tmp) + write_best_params(study, tmp) + write_study_plots(study, tmp)
        if files:
            tracker.log_files(parent_id, files, "study")
        markdown, page = summary(study, fixed, experiment_id, commands, ui, weights,
                                 winner_text(tracker.get_run(parent_id).data.tags))
        (tmp / "summary.html").write_text(page)
        tracker.log_files(parent_id, [tmp / "summary.html"], "")
    if len(markdown) > DESCRIPTION_MAX:
        markdown = markdown[:DESCRIPTION_MAX] + "\n\n(cut; see summary.html)"
    tracker.set_tags(parent_id, {"mlflow.note.content": markdown})


def write_trials_table(study: optuna.Study, folder: Path) -> list[Path]:
    """Every trial as one row (number, value, state, times, params, user attrs): `trials.csv` to
    load, `trials.html` to read."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "datetime_start", "duration",
                                          "params", "user_attrs"))
    if frame.empty:
        return []
    frame = frame.drop(columns=[c for c in frame.columns if c == f"user_attrs_{T.WORKER_ATTR}"])
    csv_path, html_path = folder / "trials.csv", folder / "trials.html"
    frame.to_csv(csv_path, index=False)
    html_path.write_text(f"<h1>Trials of study {html.escape(study.study_name)}</h1>\n"
                         + frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    return [csv_path, html_path]


def write_best_params(study: optuna.Study, folder: Path) -> list[Path]:
    best = T.best(study)
    if best is None:
        return []
    path = folder / "best_params.json"
    path.write_text(json.dumps({"trial_number": best.number, "valid_acc": best.value, "params": best.params,
                                "mlflow_run_id": T.run_id(best)}, indent=2))
    return [path]


class _ImportancesOnce(optuna.importance.BaseImportanceEvaluator):
    """fANOVA, seeded (the same study gives the same importances), computed once for both the
    plotly and the matplotlib plot of a report."""

    def __init__(self):
        self._fanova, self._found = optuna.importance.FanovaImportanceEvaluator(seed=0), {}

    def evaluate(self, study, params=None, *, target=None):
        key = (tuple(params) if params is not None else None, target)
        if key not in self._found:
            self._found[key] = self._fanova.evaluate(study, params=params, target=target)
        return self._found[key]


def write_study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's plots: interactive in one self-contained HTML page (plotly.js embedded once, so
    it works offline and in the MLflow UI), and each as a PNG. A plot Optuna cannot draw (e.g.
    importances when every trial scored the same) is left out, with a note on the page."""
    import matplotlib.pyplot as plt
    import optuna.visualization as plotly_vis
    from optuna.visualization import matplotlib as mpl_vis

    sections, files, first = [], [], True
    importances = {"evaluator": _ImportancesOnce()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both flavours warn of experimental arguments
        for name, (title, importance) in PLOTS.items():
            try:
                args = importances if importance else {}
                fig = getattr(plotly_vis, f"plot_{name}")(study, **args)
                ax = getattr(mpl_vis, f"plot_{name}")(study, **args)
            except Exception as exc:  # noqa: BLE001 - one plot must not cost the rest of the report
                sections.append(f"<h2>{html.escape(title)}</h2><p>not drawn: {html.escape(str(exc))}</p>")
                log.info("skipped study plot %s: %s", name, exc)
                continue
            sections.append(f"<h2>{html.escape(title)}</h2>"
                            + fig.to_html(full_html=False, include_plotlyjs=first, default_height=500))
            first = False
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            panels = len(ax.flat) if hasattr(ax, "flat") else 1  # slice: one per parameter
            figure.set_size_inches(max(10, 4 * panels), 6)
            figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            files.append(folder / f"{name}.png")
    page = folder / "optuna_plots.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.study_name)}"
                    f"</title></head><body><h1>Study {html.escape(study.study_name)}</h1>{''.join(sections)}"
                    f"</body></html>")
    return [page, *files]


# -- the one-page summary --------------------------------------------------------------------
def winner_text(tags: dict) -> str | None:
    """What the final test scores when it is not one trial (the soup or the ensemble, src/winner.py),
    from the parent's tags; None when it is the best (or confirmed) trial."""
    won = T.winner(tags)
    if won is None or won[0] not in WHAT:
        return None
    text = (f"{WHAT[won[0]]}, valid_acc {float(tags['winner.valid_acc']):.4f} (the best single model's "
            f"{float(tags.get('winner.trial_valid_acc', 'nan')):.4f}, both fp32; run {won[1]})")
    lead, ensemble = tags.get("winner.lead_p", "none"), tags.get("winner.ensemble_valid_acc", "none")
    if lead == "none" or ensemble == "none":
        return text
    accs = {k: float(tags[f"winner.{k}_valid_acc"]) for k in ("trial", "soup")
            if tags.get(f"winner.{k}_valid_acc", "none") != "none"}
    one = T.one_model(accs)
    name = {"trial": "single model", "soup": "soup"}[one]
    if won[0] == "ensemble" and accs[one] > float(ensemble):
        text += (f"; the {name} led it within noise (McNemar p {float(lead):.2g}: a one-model candidate wins "
                 f"only below {LEAD_P})")
    elif won[0] == "soup":
        text += f"; it led the ensemble beyond noise (McNemar p {float(lead):.2g})"
    return text


def summary(study: optuna.Study, fixed: Fixed, experiment_id: str, commands: dict,
            ui: str = MLFLOW_UI, weights: str | None = None, winner: str | None = None) -> tuple[str, str]:
    """(Markdown, HTML) of the same page; `winner` says what the final test scores when it is not
    the best trial (`winner_text`). The Markdown is the run's description, shown inside the
    MLflow UI: its link to the best trial's run is relative (`#/experiments/<id>/runs/<run>`),
    so it works wherever the UI is served. The HTML is an artifact, which the UI shows in a
    sandbox that cannot navigate: its link is absolute (`ui`), for a browser tab."""
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    best = T.best(study)
    weights = weights or fixed.weights  # the effective ones: the demo falls back to random init
    used = weights if weights == fixed.weights else f"{weights} (asked for {fixed.weights}: unavailable)"
    facts = [("trials", ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"),
             ("model", f"{fixed.backbone}, weights {used}, {fixed.image_size} px, batch {fixed.batch_size}"),
             ("epochs per phase", f"up to {fixed.max_epochs_phase1} + {fixed.max_epochs_phase2}")]
    link = None
    if best is not None:
        run_id = T.run_id(best) or ""
        link = (f"#/experiments/{experiment_id}/runs/{run_id}", f"trial {best.number} (run {run_id})")
        facts.insert(1, ("best valid_acc", f"{best.value:.4f}"))
    if winner:
        facts.insert(0, ("winner (the final test scores it)", winner))
    header, rows = trial_rows(study, 10)
    params = [[k, _fmt(v)] for k, v in sorted(best.params.items())] if best else []
    cmd_rows = [[what, cmd] for what, cmd in commands.items()]
    md = [f"# Sweep `{study.study_name}`", ""]
    md += [f"**Best trial:** [{link[1]}]({link[0]}) (its figures: confusion/, figures/)", ""] if link else \
          ["**No trial completed yet.**", ""]
    md += _md_table(["", ""], [[k, v] for k, v in facts])
    md += ["", "## Best parameters", ""] + (_md_table(["parameter", "value"], params) if params else ["none"])
    md += ["", "## Top trials", ""] + (_md_table(header, rows) if rows else ["none"])
    md += ["", "## Next", ""] + [f"- {what}: `{cmd}`" for what, cmd in commands.items()]
    md += ["", "Files: `summary.html`, `study/trials.html`, `study/optuna_plots.html`, `study/*.png`, "
               "`study/best_params.json`, `dataset/`, `sweep/`."]
    body = [f"<h1>Sweep {html.escape(study.study_name)}</h1>"]
    body.append(f"<p><b>Best trial:</b> <a href='{html.escape(ui + '/' + link[0])}' target='_blank'>"
                f"{html.escape(link[1])}</a> (a link for a browser tab; inside the MLflow UI, use the "
                f"same link on this run's Overview)</p>"
                if link else "<p><b>No trial completed yet.</b></p>")
    body += [_html_table(["", ""], [[k, v] for k, v in facts]), "<h2>Best parameters</h2>",
             _html_table(["parameter", "value"], params), "<h2>Top trials</h2>", _html_table(header, rows),
             "<h2>Next</h2>", _html_table(["", "command"], cmd_rows, code_column=1)]
    page = ("<!doctype html><html><head><meta charset='utf-8'><style>body{font-family:sans-serif}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
            f"</style></head><body>{''.join(body)}</body></html>")
    return "\n".join(md), page


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    clean = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(clean, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(clean, r)) + " |" for r in rows)]


def _html_table(header: list[str], rows: list[list[str]], code_column: int | None = None) -> str:
    def cell(i, v):
        v = html.escape(str(v))
        return f"<td><code>{v}</code></td>" if i == code_column else f"<td>{v}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return (f"<table><tr>{head}</tr>"
            + "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows) + "</table>")
