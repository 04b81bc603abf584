"""The scored winner becomes a registered MLflow model (alias champion) that predicts from images,
in a fresh process, with exactly the final test's labels (src/registry.py, src/served.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import sweep_args
from src import final_test, predict, register, sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
paths = json.loads(sys.argv[2])
out = model.predict(pd.DataFrame({"path": paths}), params={"top_k": 2})
print(json.dumps({"label": list(out["label"]), "columns": list(out.columns)}))
"""


def _sweep(tmp, data, study, *extra):
    args = sweep_args(tmp, data, 2, "--image-size", "32", "--soup-top", "0", *extra)
    args[args.index("--study-name") + 1] = study
    return sweep.run_sweep(sweep.parse_args(args))


def test_the_scored_winner_is_registered_and_predicts_its_test_labels_in_a_fresh_process(in_tmp, split_folder):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    first = _sweep(in_tmp, split_folder, "cats")
    result = final_test.run_final_test(first.parent_run_id, uri, register=True)
    assert result.registered == ("cats", "1")
    champion = client.get_model_version_by_alias("cats", "champion")
    assert str(champion.version) == "1"
    tags = client.get_run(first.parent_run_id).data.tags
    assert champion.tags["tlsweep.model_run_id"] == tags["final_test.trial_run_id"] == result.trial_run_id
    assert champion.tags["tlsweep.parent_run_id"] == first.parent_run_id
    assert float(champion.tags["test.acc"]) == pytest.approx(result.acc, abs=1e-6)
    split = json.loads(Path(client.download_artifacts(first.parent_run_id, "dataset/split.json", str(in_tmp))).read_text())
    classes = json.loads(champion.tags["classes"])
    assert classes == split["classes"] and champion.tags["preprocess.image_size"] == "32"
    assert "chosen on validation" in champion.description

    # a fresh process with only the package: the same labels as the final test, image by image
    test_paths = [str(Path(split["root"]) / rel) for rel, _ in split["test"]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run([sys.executable, "-c", PREDICT, "models:/cats@champion", json.dumps(test_paths)],
                         capture_output=True, text=True, env=env, cwd=in_tmp, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    predicted = json.loads(out.stdout.strip().splitlines()[-1])
    assert predicted["label"] == [classes[i] for i in result.preds]
    assert sum(p == classes[t] for p, t in zip(predicted["label"], result.targets)) / len(test_paths) == result.acc
    assert predicted["columns"][:4] == ["label", "probability", "label_2", "probability_2"]
    assert predicted["columns"][4:] == [f"prob:{c}" for c in classes]

    # a second sweep's winner, under the same name: version 2, and the alias moves to it
    second = _sweep(in_tmp, split_folder, "dogs", "--seed", "1")
    assert final_test.main(["--run-id", second.parent_run_id, "--tracking-uri", uri, "--model-name", "cats"]) == 0
    assert str(client.get_model_version_by_alias("cats", "champion").version) == "2"
    # a forced re-scoring, not registered; src.register registers it once, tagged as forced
    assert final_test.main(["--run-id", first.parent_run_id, "--tracking-uri", uri, "--force", "--no-register"]) == 0
    assert str(client.get_model_version_by_alias("cats", "champion").version) == "2"
    assert register.main(["--run-id", first.parent_run_id, "--tracking-uri", uri, "--model-name", "cats"]) == 0
    third = client.get_model_version_by_alias("cats", "champion")
    assert (str(third.version), third.tags["tlsweep.forced"]) == ("3", "true")
    assert register.main(["--run-id", first.parent_run_id, "--tracking-uri", uri]) == 2  # registered already


def test_registration_refuses_what_it_cannot_register_and_the_model_refuses_bad_images(in_tmp, split_folder, capsys,
                                                                                      monkeypatch):
    import mlflow
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    result = _sweep(in_tmp, split_folder, "cats")
    assert register.main(["--run-id", result.parent_run_id, "--tracking-uri", uri]) == 2
    assert f"python -m src.final_test --run-id {result.parent_run_id}" in capsys.readouterr().err
    assert register.main(["--run-id", result.best_run_id, "--tracking-uri", uri]) == 2
    assert "not a sweep's parent run" in capsys.readouterr().err
    # a name the registry cannot take fails before the one scoring
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri, "--model-name", "a/b"]) == 2
    assert "--model-name" in capsys.readouterr().err
    assert "final_test.count" not in MlflowClient(uri).get_run(result.parent_run_id).data.tags
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri]) == 0

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cats@champion")
    image = next(Path(split_folder / "test").rglob("*.png"))
    one = model.predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert list(one["label"]) == list(model.predict(pd.DataFrame({"path": [str(image)]}))["label"])
    with pytest.raises(MlflowException, match="row 1: the 9 bytes given is not a readable image"):
        model.predict(pd.DataFrame({"image": [image.read_bytes(), b"not a png"]}))
    with pytest.raises(MlflowException, match="top_k 9"):
        model.predict(pd.DataFrame({"path": [str(image)]}), params={"top_k": 9})
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")  # what MLflow's scoring server sets
    with pytest.raises(MlflowException, match="TLSWEEP_SERVE_PATHS=1"):
        model.predict(pd.DataFrame({"path": [str(image)]}))
    assert list(model.predict(pd.DataFrame({"image": [image.read_bytes()]}))["label"]) == list(one["label"])


def test_predict_labels_files_and_folders_as_the_final_test_did(in_tmp, split_folder, capsys):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    result = _sweep(in_tmp, split_folder, "cats")
    assert predict.main(["--model", result.parent_run_id, str(split_folder), "--out", str(in_tmp / "p.csv"),
                         "--tracking-uri", uri]) == 2  # not scored yet
    assert f"python -m src.final_test --run-id {result.parent_run_id}" in capsys.readouterr().err
    scored = final_test.run_final_test(result.parent_run_id, uri, register=True)
    split = json.loads((Path(MlflowClient(uri).download_artifacts(result.parent_run_id, "dataset/split.json",
                                                                   str(in_tmp)))).read_text())
    truth = {str(Path(split["root"]) / rel): (split["classes"][t], split["classes"][p])
             for (rel, _), t, p in zip(split["test"], scored.targets, scored.preds)}
    for model in ("models:/cats@champion", "models:/cats/1", result.parent_run_id):
        out = in_tmp / "preds.csv"
        assert predict.main(["--model", model, str(split_folder / "test"), "--out", str(out), "--top-k", "2",
                             "--batch-size", "64", "--tracking-uri", uri]) == 0, capsys.readouterr().err
        rows = pd.read_csv(out)
        assert list(rows.columns) == ["path", "label", "probability", "label_2", "probability_2"]
        assert {p: lab for p, lab in zip(rows["path"], rows["label"])} == {p: v[1] for p, v in truth.items()}
        assert sum(rows["label"][i] == truth[p][0] for i, p in enumerate(rows["path"])) / len(rows) == scored.acc
    # an unreadable file is listed and counted, the rest labelled; nothing readable: exit 1
    (in_tmp / "junk").mkdir()
    (in_tmp / "junk" / "broken.png").write_bytes(b"not a png")
    image = next(iter(truth))
    capsys.readouterr()
    assert predict.main(["--model", "models:/cats@champion", image, str(in_tmp / "junk"), "--out", str(in_tmp / "two.csv"),
                         "--tracking-uri", uri]) == 0
    assert "unreadable: " in capsys.readouterr().err and len(pd.read_csv(in_tmp / "two.csv")) == 1
    assert predict.main(["--model", "models:/cats@champion", str(in_tmp / "junk"), "--out", str(in_tmp / "none.csv"),
                         "--tracking-uri", uri]) == 1
    assert not (in_tmp / "none.csv").exists()
    # clear errors: an unknown alias or name, an empty folder, a bad --top-k
    (in_tmp / "empty").mkdir()
    for args, message in ((["--model", "models:/cats@best", image], "cannot be loaded"),
                          (["--model", "models:/dogs@champion", image], "registered models there: ['cats']"),
                          (["--model", "models:/cats@champion", str(in_tmp / "empty")], "has no images"),
                          (["--model", "models:/cats@champion", image, "--top-k", "99"], "--top-k 99")):
        assert predict.main([*args, "--out", str(in_tmp / "x.csv"), "--tracking-uri", uri]) == 2
        assert message in capsys.readouterr().err


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_mlflow_models_serve_answers_with_the_labels_predict_gives_and_refuses_bad_input(in_tmp, split_folder):
    import base64
    import time
    import urllib.request
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    result = _sweep(in_tmp, split_folder, "cats")
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri]) == 0
    images = sorted((split_folder / "test").rglob("*.png"))[:4]
    assert predict.main(["--model", "models:/cats@champion", *map(str, images), "--out", str(in_tmp / "p.csv"),
                         "--tracking-uri", uri]) == 0
    expected = list(pd.read_csv(in_tmp / "p.csv")["label"])
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/cats@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri,  # as in an activated venv: its uvicorn
                                   "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                              cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=open(in_tmp / "serve.log", "w"),
                              start_new_session=True)  # its own process group: the server and its workers stop together
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the server did not start: {(in_tmp / 'serve.log').read_text()[-2000:]}")
        encoded = [[base64.b64encode(p.read_bytes()).decode()] for p in images]
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": encoded}})
        assert status == 200, body
        assert [row["label"] for row in json.loads(body)["predictions"]] == expected
        bad = base64.b64encode(b"this is not an image").decode()
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[bad]]}})
        assert 400 <= status < 500 and "not a readable image" in body
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["path"], "data": [[str(images[0])]]}})
        assert 400 <= status < 500 and "TLSWEEP_SERVE_PATHS=1" in body  # a path reads the server's disk: off
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
