"""The scale-out stack without Docker: PostgreSQL (Optuna storage + MLflow backend) and an MLflow
tracking server with an artifact store, on 127.0.0.1, from installed packages.

    python -m src.stack start [--dir .stack] [--pg-port 55432] [--mlflow-port 55000]
    python -m src.stack stop  [--dir .stack]

`start` prints the --storage and --tracking-uri to give every worker. PostgreSQL comes from
Debian's `postgresql` package (`apt-get install postgresql`: initdb and pg_ctl under
/usr/lib/postgresql/<version>/bin); the MLflow server from this environment's `mlflow`. As root,
PostgreSQL runs as the `postgres` user (it refuses root). Everything lives under --dir; `stop`
stops both servers and keeps the data, so `start` again resumes.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

USER = "tlsweep"
DATABASES = ("optuna", "mlflow")


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise SystemExit(f"PostgreSQL's {name} was not found; install it (Debian: apt-get install postgresql)")
    return found


def _as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_home(folder: Path) -> Path:
    """PostgreSQL's data and socket folder: under `folder`, or, as root (PostgreSQL runs as the
    `postgres` user, who may not reach `folder`), under that user's home, one per `folder`."""
    if os.geteuid() != 0:
        return folder / "pg"
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    return Path(os.path.expanduser("~postgres")) / f"tlsweep-{key}"  # persistent, unlike /tmp


def urls(pg_port: int, mlflow_port: int) -> dict:
    return {"storage": f"postgresql+psycopg://{USER}@127.0.0.1:{pg_port}/optuna",
            "tracking_uri": f"http://127.0.0.1:{mlflow_port}",
            "mlflow_backend": f"postgresql+psycopg://{USER}@127.0.0.1:{pg_port}/mlflow"}


def start(folder: Path, pg_port: int = 55432, mlflow_port: int = 55000, timeout_s: float = 120) -> dict:
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    stop(folder)  # a start on a running stack restarts it
    for port in (pg_port, mlflow_port):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"port {port} on 127.0.0.1 is in use (another stack?); pick another with "
                                 f"--pg-port/--mlflow-port, or stop it")
    pg_home = _pg_home(folder)
    pg_data, sock = pg_home / "data", pg_home / "sock"
    found = urls(pg_port, mlflow_port)
    sock.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for d in (pg_home, sock):
            shutil.chown(d, "postgres")
    if not (pg_data / "PG_VERSION").is_file():
        subprocess.run(_as_pg_user([_pg_bin("initdb"), "-D", str(pg_data), "-U", USER, "--auth=trust",
                                    "--encoding=UTF8"]), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(_as_pg_user([_pg_bin("pg_ctl"), "-D", str(pg_data), "-l", str(pg_home / "postgres.log"), "-w",
                                "-o", f"-p {pg_port} -k {sock} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, stdout=subprocess.DEVNULL)
    for db in DATABASES:
        exists = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", USER, "-d", "postgres", "-tAc",
                                 f"SELECT 1 FROM pg_database WHERE datname = '{db}'"],
                                check=True, capture_output=True, text=True).stdout.strip()
        if not exists:
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", USER, "-d", "postgres", "-c",
                            f"CREATE DATABASE {db}"], check=True, stdout=subprocess.DEVNULL)
    log = open(folder / "mlflow.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", found["mlflow_backend"],
         "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "mlflow.pid").write_text(str(server.pid))
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited ({server.returncode}); see {folder / 'mlflow.log'}")
        try:
            urllib.request.urlopen(found["tracking_uri"] + "/health", timeout=2).close()
            if server.poll() is None:  # ours answered, not someone else's on the port
                break
        except OSError:
            time.sleep(0.5)
    else:
        raise SystemExit(f"mlflow server did not answer on {found['tracking_uri']} in {timeout_s} s")
    (folder / "urls.json").write_text(json.dumps(found))
    return found


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def stop(folder: Path, remove: bool = False) -> None:
    """Stop both servers (data kept; `remove`: also delete it, e.g. after a test)."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        return
    pid_file = folder / "mlflow.pid"
    if pid_file.is_file():
        group = int(pid_file.read_text())
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):  # the server and its workers
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait_s
            while time.time() < deadline and _group_alive(group):
                time.sleep(0.2)
            if not _group_alive(group):
                break
        pid_file.unlink()
    pg_data = _pg_home(folder) / "data"
    if (pg_data / "postmaster.pid").is_file():
        subprocess.run(_as_pg_user([_pg_bin("pg_ctl"), "-D", str(pg_data), "-m", "fast", "-w", "stop"]),
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if remove:
        shutil.rmtree(pg_data.parent, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", type=Path, default=Path(".stack"), help="where data, logs and artifacts live (default .stack)")
    p.add_argument("--pg-port", type=int, default=55432)
    p.add_argument("--mlflow-port", type=int, default=55000)
    args = p.parse_args(argv)
    if args.action == "stop":
        stop(args.dir)
        return 0
    found = start(args.dir, args.pg_port, args.mlflow_port)
    print(f"--storage {found['storage']} --tracking-uri {found['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
