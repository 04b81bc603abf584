"""What a user sees, checked in a real browser: a finished tiny sweep, a real `mlflow server` on
127.0.0.1, headless Chromium (Debian's `chromium` package, installed by .ci/run) driven by
Playwright. Screenshots are saved under the test's temporary directory."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import sweep_args
from src import sweep

pytestmark = pytest.mark.slow
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing(what: str, fix: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; {fix}")
    pytest.skip(f"{what} is missing ({fix})")


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package", "pip install -e '.[test]'")
    path = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if path is None:
        _missing("Chromium", "apt-get install chromium (.ci/run does)")
    with sync_playwright() as p:
        found = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield found
        found.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def finished_sweep(in_tmp, flat_folder):
    return sweep.run_sweep(sweep.parse_args(sweep_args(in_tmp, flat_folder, 2)))


@pytest.fixture
def server(in_tmp):
    port = _free_port()
    log = open(in_tmp / "mlflow-server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{in_tmp}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=in_tmp, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(in_tmp / 'mlflow-server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_mlflow_ui_lists_the_sweep_and_shows_the_best_trials_figures(finished_sweep, server, browser,
                                                                          tmp_path, in_tmp):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect

    result = finished_sweep
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    exp = client.get_run(result.parent_run_id).info.experiment_id
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(60_000)
    # Assertions wait as long as actions do: on a loaded machine the runs grid renders after
    # Playwright's 5 s default (seen in CI beside a benchmark: "4 matching runs", no rows yet).
    expect.set_options(timeout=60_000)
    shots = tmp_path / "screenshots"

    def visit(route: str) -> None:
        # A fresh load: the UI keeps one run's artifact tree across a hash-only navigation.
        page.goto(f"{server}/{route}")
        page.reload()

    # The experiment's runs: the parent, and its nested trial runs once it is expanded.
    visit(f"#/experiments/{exp}/runs")
    parent = page.get_by_role("link", name="s", exact=True)  # the parent run is named after the study
    expect(parent).to_have_attribute("href", f"#/experiments/{exp}/runs/{result.parent_run_id}")
    expect(page.get_by_role("link", name="trial-0", exact=True)).to_have_count(0)  # nested: folded
    page.locator("[role=gridcell]").filter(has=parent).locator("button").first.click()  # expand
    for n in (0, 1):
        expect(page.get_by_role("link", name=f"trial-{n}", exact=True)).to_be_visible()
    page.screenshot(path=shots / "runs.png")

    # The parent's overview: the summary as its description, linking the best trial's run.
    visit(f"#/experiments/{exp}/runs/{result.parent_run_id}")
    best_link = page.get_by_role("link", name=f"trial {result.best_trial_number} (run {result.best_run_id})")
    expect(best_link).to_have_attribute("href", f"#/experiments/{exp}/runs/{result.best_run_id}")
    page.screenshot(path=shots / "parent.png", full_page=True)
    visit(best_link.get_attribute("href"))  # the UI opens it in a new tab
    expect(page.get_by_role("heading", name=f"trial-{result.best_trial_number}", exact=True)).to_be_visible()

    # The best trial's confusion matrix, as an image that really loaded.
    visit(f"#/experiments/{exp}/runs/{result.best_run_id}/artifacts")
    page.get_by_text("confusion", exact=True).click()
    image = page.locator("img[alt='confusion/valid_phase2.png']")  # the UI serves it as a blob
    for attempt in range(3):  # under load a click can land while the tree re-renders and select nothing
        page.get_by_text("valid_phase2.png", exact=True).click()
        try:
            expect(image).to_be_visible(timeout=20_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    local = client.download_artifacts(result.best_run_id, "confusion/valid_phase2.png", str(tmp_path))
    with Image.open(local) as png:
        assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(png.size)
    page.screenshot(path=shots / "best_trial_confusion.png")

    # The parent's interactive Optuna plots render inside the UI (plotly runs in its sandbox).
    visit(f"#/experiments/{exp}/runs/{result.parent_run_id}/artifacts")
    page.get_by_text("study", exact=True).click()
    page.get_by_text("optuna_plots.html", exact=True).click()
    drawn = Path(client.download_artifacts(result.parent_run_id, "study/optuna_plots.html", str(tmp_path)))
    drawn = drawn.read_text().count("Plotly.newPlot")
    assert drawn >= 5
    plots = page.frame_locator("iframe").first.locator(".plotly-graph-div")
    expect(plots).to_have_count(drawn)
    expect(plots.first.locator("svg.main-svg").first).to_be_visible()
    page.screenshot(path=shots / "optuna_plots.png")

    # The one-page summary artifact renders, naming the best trial.
    page.get_by_text("summary.html", exact=True).click()
    summary = page.frame_locator("iframe").first
    expect(summary.get_by_role("link", name=f"trial {result.best_trial_number} (run {result.best_run_id})")).to_be_visible()
    expect(summary.get_by_role("heading", name="Top trials")).to_be_visible()
    for name in ("runs", "parent", "best_trial_confusion", "optuna_plots"):
        with Image.open(shots / f"{name}.png") as shot:
            assert shot.size[0] == 1400
