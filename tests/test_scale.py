"""Scale out, for real: PostgreSQL and an `mlflow server` on 127.0.0.1 (started by src/stack.py,
as without Docker), several worker processes on one study, one of them killed mid-trial; the
journal storage with --workers; and docker-compose.yml checked against the README."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from src import device, final_test, launcher, stack, sweep
from src.study import make_storage

REPO = Path(__file__).resolve().parents[1]
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_postgres() -> bool:
    try:
        stack._pg_bin("initdb")
        return True
    except SystemExit:
        return False


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not _have_postgres():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run installs it (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    folder = tmp_path_factory.mktemp("stack")
    found = stack.start(folder, _free_port(), _free_port())
    yield found
    stack.stop(folder, remove=True)


# Each epoch sleeps a little in the workers, so the test can kill one in the middle of a trial.
_SLOW_WORKER = ("import sys, time; import src.train as T; f = T.train_epoch; "
                "T.train_epoch = lambda *a, **k: (time.sleep(0.5), f(*a, **k))[1]; "
                "from src.sweep import main; sys.exit(main(sys.argv[1:]))")


_PLAIN_WORKER = "import sys; from src.sweep import main; sys.exit(main(sys.argv[1:]))"


def _worker(tmp_path, args, code=_SLOW_WORKER):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _args(data, storage, tracking, trials, study):
    return ["--data", str(data), "--trials", str(trials), "--weights", "none", "--image-size", "16",
            "--batch-size", "8", "--max-epochs", "2", "--precision", "fp32", "--storage", storage,
            "--tracking-uri", tracking, "--study-name", study]  # fp32: see conftest.sweep_args


@pytest.mark.slow
def test_three_workers_one_study_one_killed_and_final_test_on_the_server(tmp_path, flat_folder, servers):
    n = 5
    args = _args(flat_folder, servers["storage"], servers["tracking_uri"], n, "scale")
    workers = [_worker(tmp_path, args) for _ in range(3)]
    victim = workers[0]
    deadline, lost = time.time() + 240, None
    storage = optuna.storages.RDBStorage(servers["storage"])  # one pool: a new one per poll exhausts the server
    while lost is None and time.time() < deadline:  # a trial of the first worker, mid-way
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="scale", storage=storage).trials
        except KeyError:
            continue
        lost = next((t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values
                     and t.user_attrs.get("tlsweep.worker", {}).get("pid") == victim.pid), None)
    assert lost is not None, "the first worker never got a trial going"
    victim.send_signal(signal.SIGKILL)
    for w in workers[1:]:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="scale", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert len([t for t in study.trials if t.state in DONE]) == n  # the cap is the study's, not a worker's
    assert study.trials[lost.number].state == optuna.trial.TrialState.FAIL
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == lost.number)
    assert retry.params == lost.params and retry.state in DONE
    assert retry.user_attrs["tlsweep.worker"]["pid"] != victim.pid  # taken up by another worker

    client = MlflowClient(servers["tracking_uri"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    exp = client.get_run(parent_id).info.experiment_id
    parents = client.search_runs([exp], "tags.`tlsweep.role` = 'parent' and tags.`optuna.study_name` = 'scale'")
    assert [p.info.run_id for p in parents] == [parent_id]  # created once, found by the others
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=100)
    children = [r for r in runs if r.data.tags["tlsweep.role"] == "trial"]
    soups = [r for r in runs if r.data.tags["tlsweep.role"] == "soup"]
    ensembles = [r for r in runs if r.data.tags["tlsweep.role"] == "ensemble"]
    assert len(soups) <= 1 and len(ensembles) <= 1  # made once, by the last worker to end
    assert len(ensembles) == (len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2)
    assert len(runs) == len(children) + len(soups) + len(ensembles)
    with_runs = [t for t in study.trials if t.user_attrs.get("tlsweep.fail_kind") != "surplus"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [t.number for t in with_runs]
    assert not [r for r in children if r.info.status == "RUNNING"]
    for r in children:
        if r.data.tags["optuna.state"] == "COMPLETE":
            names = [a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")]
            assert "checkpoints/phase2_best.pt" in names
    assert client.get_run(lost.user_attrs["mlflow_run_id"]).info.status == "KILLED"

    assert final_test.main(["--run-id", parent_id, "--tracking-uri", servers["tracking_uri"]]) == 0
    assert 0 <= client.get_run(parent_id).data.metrics["test/acc"] <= 1


@pytest.mark.slow
def test_workers_that_confirm_at_once_run_each_job_once(tmp_path, flat_folder, servers, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _args(flat_folder, servers["storage"], servers["tracking_uri"], 3, "confirm")
    assert sweep.main(args) == 0  # the trials; then two hosts' sweeps end at once and confirm
    both = [_worker(tmp_path, [*args, "--confirm-top", "2", "--confirm-folds", "3"], code=_PLAIN_WORKER)
            for _ in range(2)]
    for w in both:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    storage = optuna.storages.RDBStorage(servers["storage"])
    study = optuna.load_study(study_name="confirm", storage=storage)
    side = optuna.load_study(study_name="confirm:confirm", storage=storage)
    done = [t for t in side.trials if t.state == optuna.trial.TrialState.COMPLETE]
    jobs = sorted((t.system_attrs["tlsweep.job"]["trial"], t.system_attrs["tlsweep.job"]["fold"]) for t in done)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plan = sorted(sorted(complete, key=lambda t: (-t.value, t.number))[:2], key=lambda t: t.number)
    assert jobs == sorted((t.number, f) for t in plan for f in range(3))  # each job once, none missing
    client = MlflowClient(servers["tracking_uri"])
    parent = study.user_attrs["mlflow_parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`tlsweep.role` = 'confirm'")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(parent).data.tags["confirm.winner_trial"] in {str(t.number) for t in plan}


def _race(n, fn):
    """Run fn() in n threads released at the same instant; the exceptions they raised."""
    import threading

    gate, errors = threading.Barrier(n), []

    def one():
        gate.wait()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_workers_starting_together_on_an_empty_database_all_open_the_storage(servers):
    """Optuna creates its tables on first use; on PostgreSQL concurrent creators collide on the
    catalog (pg_type). Each attempt is a new empty database (this failed every time unfixed)."""
    import psycopg

    base = servers["storage"].rsplit("/", 1)[0]
    for attempt in range(3):
        db = f"empty{attempt}"
        with psycopg.connect(base.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db}")
            conn.execute(f"CREATE DATABASE {db}")
        assert _race(6, lambda: make_storage(f"{base}/{db}")) == []
        assert optuna.get_all_study_summaries(make_storage(f"{base}/{db}")) == []


def test_workers_starting_together_share_one_experiment(servers):
    """Many workers create the experiment in the same instant; the losers of the insert use the
    winner's (this race failed a CI run with RESOURCE_ALREADY_EXISTS)."""
    from src.tracking import EXPERIMENT_KIND, Tracker

    tracker = Tracker(servers["tracking_uri"])
    for attempt in range(10):  # each attempt is a fresh name, so a fresh race
        name, found = f"race-{attempt}", []
        assert _race(8, lambda: found.append(tracker.experiment_id(name))) == []
        assert len(set(found)) == 1 and len(found) == 8
        exp = MlflowClient(servers["tracking_uri"]).get_experiment(found[0])
        assert exp.name == name and exp.tags[EXPERIMENT_KIND] == "custom_model_development"


@pytest.mark.slow
def test_workers_flag_on_a_journal_file(tmp_path, flat_folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _args(flat_folder, f"journal://{tmp_path}/journal.log", f"sqlite:///{tmp_path}/mlflow.db", 4, "j")
    assert sweep.main([*args, "--workers", "2"]) == 0
    assert "4 finished trials" in capsys.readouterr().out
    study = optuna.load_study(study_name="j", storage=make_storage(f"journal://{tmp_path}/journal.log"))
    done = [t for t in study.trials if t.state in DONE]
    assert len(done) == 4
    assert len({t.user_attrs["tlsweep.worker"]["pid"] for t in done}) == 2  # both worked
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4  # no worker repeats another's draw
    # each worker computed on its half of the cores, not on all of them
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    threads = {client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["train.threads"] for t in done}
    assert threads == {str(max(1, device.cores() // 2))}, threads


@pytest.mark.slow
def test_workers_take_the_confirmations_jobs_on_their_share_and_the_launcher_decides(
        tmp_path, flat_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    journal, tracking = f"journal://{tmp_path}/journal.log", f"sqlite:///{tmp_path}/mlflow.db"
    args = _args(flat_folder, journal, tracking, 4, "jc")
    assert sweep.main([*args, "--workers", "2", "--confirm-top", "2", "--confirm-folds", "2"]) == 0
    storage = make_storage(journal)
    study = optuna.load_study(study_name="jc", storage=storage)
    side = optuna.load_study(study_name="jc:confirm", storage=storage)
    done = [t for t in side.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4  # 2 configurations x 2 folds, each once
    job_pids = {t.user_attrs["tlsweep.worker"]["pid"] for t in done}
    assert os.getpid() not in job_pids  # the workers ran them, not the launcher (this process)
    client = MlflowClient(tracking)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["confirm.winner_trial"] in {str(t.system_attrs["tlsweep.job"]["trial"]) for t in done}
    runs = client.search_runs([parent.info.experiment_id], "tags.`tlsweep.role` = 'confirm'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    # each on its worker's share of the cores, but a last job that ran alone on all of them
    assert {r.data.tags["train.threads"] for r in runs} == {str(max(1, device.cores() // 2))}
    alone = [r.data.tags["train.threads_alone"] for r in runs if "train.threads_alone" in r.data.tags]
    assert alone in ([], [str(device.cores())])


def test_workers_get_their_share_of_the_cores_and_gpus_in_turn(caplog):
    env = launcher.worker_env(1, 2, {"PATH": "/bin"}, cores=16, gpus=0, device="auto")
    assert (env["TLSWEEP_WORKER"], env["TLSWEEP_THREADS"], env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == \
        ("1", "8", "8", "8") and env["PATH"] == "/bin" and "CUDA_VISIBLE_DEVICES" not in env
    assert launcher.worker_env(0, 3, {}, cores=2, gpus=0, device="cpu")["TLSWEEP_THREADS"] == "1"  # never 0
    given = launcher.worker_env(0, 2, {"OMP_NUM_THREADS": "3"}, cores=16, gpus=0, device="cpu")
    assert given["TLSWEEP_THREADS"] == "3" and device.SPLIT_ENV not in given  # the user's share: never widened
    assert env[device.SPLIT_ENV] == "16"  # the launcher's split: a last confirmation job alone may take it back
    assert device.SPLIT_ENV not in launcher.worker_env(0, 2, {"MKL_NUM_THREADS": "2"}, 16, 0, "cpu")
    nested = launcher.worker_env(0, 2, {"OMP_NUM_THREADS": "4,2", "MKL_NUM_THREADS": "5"}, 16, 0, "cpu")
    assert (nested["TLSWEEP_THREADS"], nested["OMP_NUM_THREADS"], nested["MKL_NUM_THREADS"]) == ("4", "4,2", "5")
    assert [launcher.worker_env(i, 3, {}, 48, 2, "auto")["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    assert "CUDA_VISIBLE_DEVICES" not in launcher.worker_env(0, 2, {}, 48, 2, "cuda:1")  # the user named one
    assert launcher.worker_env(1, 2, {"CUDA_VISIBLE_DEVICES": "3"}, 48, 2, "auto")["CUDA_VISIBLE_DEVICES"] == "3"
    with caplog.at_level("WARNING", logger="tlsweep"):
        launcher.check_worker_count(2, 2)
        assert not caplog.records
        launcher.check_worker_count(4, 2)
    assert "--workers 4 is more than the 2 CPU core(s)" in caplog.text and "--workers 2" in caplog.text


def test_workers_on_sqlite_are_refused(tmp_path, flat_folder, capsys):
    args = _args(flat_folder, f"sqlite:///{tmp_path}/o.db", f"sqlite:///{tmp_path}/m.db", 2, "s")
    assert sweep.main([*args, "--workers", "3"]) == 2
    err = capsys.readouterr().err
    assert "SQLite takes one writer" in err and "journal://" in err and "postgresql" in err
    assert not (tmp_path / "o.db").exists()


def test_docker_compose_matches_the_readme():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"postgres", "mlflow", "worker"}
    readme = (REPO / "docs" / "scale-out.md").read_text()  # linked from the README's reference list
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port) in readme, f"{name} port {port} is not in the README"
    assert "docker compose up --build --scale worker=" in readme
    # the worker reaches both through the compose network, by service name
    command = " ".join(services["worker"]["command"])
    assert "postgresql+psycopg://" in command or "postgresql://" in command
    assert "@postgres:5432/" in command and "http://mlflow:5000" in command
    # workers start only once both servers answer (a worker probes the tracking server once, at start)
    assert services["worker"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "mlflow": {"condition": "service_healthy"}}
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "-h 127.0.0.1" in " ".join(services["postgres"]["healthcheck"]["test"])
    volumes = set(compose["volumes"])
    for name, service in services.items():
        for v in service.get("volumes", []):
            source = v.rsplit(":", 2)[0] if v.count(":") >= 2 else v.split(":")[0]
            bind = source.startswith((".", "/", "${"))  # a host path (DATA_DIR: a variable with a default)
            assert bind or source in volumes, f"{name}: volume {source} is not declared"
    assert any("artifacts" in v for v in services["mlflow"]["volumes"])
    assert "--serve-artifacts" in " ".join(services["mlflow"]["command"])
    assert "deploy" not in services["worker"]  # the base file runs anywhere; GPUs come from the override
    assert "gpu" in readme.lower() and "docker-compose.gpu.yml" in readme
    gpu_file = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    assert gpu_file["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_a_worker_that_finds_a_parent_waits_for_an_older_one_still_on_its_way(tmp_path):
    """A run's start time is taken before it reaches the server, so the oldest parent can appear
    after a younger one: a worker that found the younger one must not keep it (its creator
    deletes it on seeing the older one), it settles and takes the oldest like the creators do."""
    import threading

    from src.study import _elect_parent
    from src.tracking import ROLE, Tracker
    from src.trials import STUDY_UID_ATTR

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracker.experiment_id("e")
    tags = {STUDY_UID_ATTR: "u", ROLE: "parent"}
    younger = tracker.client.create_run(exp, start_time=int(time.time() * 1000), tags=tags).info.run_id
    older_start = int(time.time() * 1000) - 1000  # taken before the younger one's, arriving after it
    late = threading.Timer(0.3, lambda: tracker.client.create_run(exp, start_time=older_start, tags=tags))
    late.start()
    elected = _elect_parent(tracker, exp, "s", "u", {}, settle_s=1.0)
    late.join()
    assert elected != younger
    assert tracker.client.get_run(elected).info.start_time == older_start
    assert tracker.client.get_run(younger).info.lifecycle_stage == "active"  # not this worker's to delete
