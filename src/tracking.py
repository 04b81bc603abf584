"""The importer of `mlflow` (with src/served.py, the logged model): parent/child runs, metrics, artifacts, figures.

Conventions (kept stable; docs/results.md lists them too):
  experiment   one per data set, the folder's name (or --experiment; src/naming.py)
  parent run   one per Optuna study; tags tlsweep.role=parent, optuna.study_name, best.*;
               params: the fixed settings (backbone, weights, image_size, search_size, ...)
  child run    one per trial, run name trial-<n>, nested under the parent; tags
               tlsweep.role=trial, optuna.trial_number, optuna.state (RUNNING|COMPLETE|PRUNED|
               FAIL|INTERRUPTED), optuna.fail_reason, tlsweep.fail_kind, optuna.retry_of,
               data.skipped_images
  metrics      train/loss train/acc valid/loss valid/acc lr/head lr/backbone at step = global
               epoch; phase1/epochs phase1/best_valid_acc phase2/... at the end of each phase;
               test/acc test/loss test/macro_f1 from final_test
  artifacts    checkpoints/phase{1,2}_best.pt, confusion/valid_phase{1,2}.{png,csv},
               figures/* (src/figures.py), confusion/test.{png,csv}, report/test_per_class.csv;
               parent: sweep/<file>, dataset/summary.json, dataset/split.json, summary.html,
               study/* (src/report.py)
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .errors import UserError

ROLE = "tlsweep.role"
EXPERIMENT_KIND = "mlflow.experimentKind"
HEALTH_TIMEOUT_S = 10
# Artifacts here are few and local; MLflow's per-download progress bars only clutter the output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Store:
    """A tracking store (None = MLflow's default, sqlite:///mlflow.db with ./mlruns) and its
    experiments: connecting, failing fast with the URI, experiments made once by racing workers."""

    def __init__(self, tracking_uri: str | None = None):
        self.uri = tracking_uri or mlflow.get_tracking_uri()
        try:
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        except Exception as exc:  # unsupported scheme and the like
            raise self._unusable(exc) from exc

    def _unusable(self, exc: Exception) -> UserError:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return UserError(f"cannot use MLflow tracking store --tracking-uri {self.uri} "
                         f"({type(exc).__name__}: {first}); check the URI and that the server is up")

    def check_reachable(self) -> None:
        """Fail fast, with the URI in the message, if the tracking store cannot be used."""
        try:
            if self.uri.startswith(("http://", "https://")):
                # MLflow's client retries for minutes; a plain probe with a short timeout does not.
                urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S).close()
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # MlflowException, connection errors
            raise self._unusable(exc) from exc

    # -- runs -------------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment {name!r} in {self.uri} was deleted; restore it "
                            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or pass "
                            f"--experiment with another name")
        if exp is None:
            try:
                return self._tag_kind(self.client.create_experiment(name))
            except MlflowException as exc:  # workers starting together race to create it
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
        if EXPERIMENT_KIND not in exp.tags:
            self._tag_kind(exp.experiment_id)
        return exp.experiment_id

    def _tag_kind(self, exp_id: str) -> str:
        """Without this tag MLflow 3's UI may open the experiment on its GenAI/traces page."""
        try:
            self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
        except MlflowException:
            # Another worker set it in the same instant (a server reports that insert race as
            # BAD_REQUEST, not RESOURCE_ALREADY_EXISTS): fine if the tag is there now.
            if EXPERIMENT_KIND not in self.client.get_experiment(exp_id).tags:
                raise
        return exp_id



def oldest_run(client: MlflowClient, experiment_id: str, tags: dict, finished: bool = False) -> str | None:
    """The id of the oldest active run with all these tags (ties: the smallest id), if any;
    `finished`: of the FINISHED ones, the first to have ended."""
    where = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()]
                         + (["attributes.status = 'FINISHED'"] if finished else []))
    runs = client.search_runs([experiment_id], filter_string=where, max_results=100)
    when = (lambda r: r.info.end_time) if finished else (lambda r: r.info.start_time)
    return min(runs, key=lambda r: (when(r), r.info.run_id)).info.run_id if runs else None


class Tracker(Store):
    """Our runs in a store: the parent and trial runs, their values and artifacts, lookups."""

    def run_exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def create_parent(self, experiment_id: str, study_name: str, tags: dict) -> str:
        tags = {ROLE: "parent", "optuna.study_name": study_name, **tags}
        run = self.client.create_run(experiment_id, run_name=study_name,
                                     tags={k: str(v) for k, v in tags.items()})  # a server takes strings only
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def start_trial(self, parent_id: str, trial_number: int, params: dict) -> str:
        exp_id = self.client.get_run(parent_id).info.experiment_id
        run = self.client.create_run(exp_id, run_name=f"trial-{trial_number}", tags={
            MLFLOW_PARENT_RUN_ID: parent_id, ROLE: "trial", "optuna.trial_number": str(trial_number),
            "optuna.state": "RUNNING"})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def start_child(self, parent_id: str, run_name: str, role: str, tags: dict, params: dict | None = None) -> str:
        """A run of our own under the parent that is not an Optuna trial (the soup, a confirmation)."""
        run = self.client.create_run(self.client.get_run(parent_id).info.experiment_id, run_name=run_name, tags={
            MLFLOW_PARENT_RUN_ID: parent_id, ROLE: role, **{k: str(v) for k, v in tags.items()}})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in (params or {}).items()])
        return run.info.run_id

    def end_run(self, run_id: str, state: str, reason: str | None = None, status: str | None = None,
                tags: dict | None = None) -> None:
        """state is the Optuna state name; the MLflow status follows from it unless given."""
        tags = {"optuna.state": state, **(tags or {})}
        if reason:
            tags["optuna.prune_reason" if state == "PRUNED" else "optuna.fail_reason"] = reason[:5000]
        self.set_tags(run_id, tags)
        status = status or {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status=status)

    def run_status(self, run_id: str) -> str | None:
        try:
            return self.client.get_run(run_id).info.status
        except MlflowException:
            return None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # -- values -----------------------------------------------------------------------------
    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_epoch(self, run_id: str, record) -> None:
        metrics = {"train/loss": record.train_loss, "train/acc": record.train_acc,
                   "valid/loss": record.valid_loss, "valid/acc": record.valid_acc, "phase": record.phase}
        metrics.update({f"lr/{name}": lr for name, lr in record.lrs.items()})
        self.log_metrics(run_id, metrics, step=record.step)

    # -- artifacts --------------------------------------------------------------------------
    def log_files(self, run_id: str, paths, artifact_dir: str) -> None:
        for p in paths:
            self.client.log_artifact(run_id, str(p), artifact_dir)

    def log_json(self, run_id: str, obj, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def artifact_names(self, run_id: str, path: str) -> list[str]:
        return [Path(a.path).name for a in self.client.list_artifacts(run_id, path)]

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        if Path(artifact_path).name not in self.artifact_names(run_id, str(Path(artifact_path).parent)):
            raise UserError(f"run {run_id} has no artifact {artifact_path} in {self.uri}; it was pruned or failed "
                            f"before saving it, or --keep-checkpoints left it out: pick one of the best trials")
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

    def load_json(self, run_id: str, artifact_path: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return json.loads(self.download(run_id, artifact_path, Path(tmp)).read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise UserError(f"artifact {artifact_path} of run {run_id} in {self.uri} is damaged ({exc}); "
                                f"re-run the sweep's command once (it logs it again) or restore it") from exc

    # -- lookups ----------------------------------------------------------------------------
    def get_run(self, run_id: str):
        """The run, or a clear error for an id this store does not know."""
        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            raise UserError(f"run {run_id!r} was not found in tracking store {self.uri}. If the sweep "
                            f"logged elsewhere, pass the same --tracking-uri it printed.") from exc

    def find_run(self, experiment_id: str, tags: dict, finished: bool = False) -> str | None:
        return oldest_run(self.client, experiment_id, tags, finished)

    def keep_oldest(self, experiment_id: str, tags: dict, mine: str | None, finished: bool = False) -> str | None:
        """Workers that may each have made a run with these tags (`mine`: this one's, if any) all
        keep the oldest (`finished`: the first FINISHED one to have ended: never a run another
        worker is still writing, or one a kill left); this worker deletes its own if it is not that one."""
        oldest = self.find_run(experiment_id, tags, finished) or mine
        if mine is not None and oldest != mine:
            self.client.delete_run(mine)
        return oldest

    def children(self, parent_id: str) -> list:
        exp_id = self.client.get_run(parent_id).info.experiment_id
        return self.client.search_runs([exp_id], filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_id}'",
                                       max_results=10000)


def log_params(tracker: Tracker, run_id: str, params: dict, tries: int = 3) -> None:
    """Params the run does not have yet (MLflow refuses to change one; the first value stays).
    Workers starting together log the same parent's params at once: a key another one wrote in
    between is a refused batch, so read again and log what is still missing."""
    for attempt in range(tries):
        have = tracker.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in have]
        if not new:
            return
        try:
            tracker.client.log_batch(run_id, params=new)
            return
        except MlflowException:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
