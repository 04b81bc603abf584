"""ONNX export of a sweep's model: dynamic batch, preprocessing and classes in the metadata, and
ONNX Runtime's logits checked against PyTorch's at export (src/export.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import sweep_args
from src import export, final_test, predict, sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_export_writes_an_onnx_model_that_labels_as_pytorch_does(in_tmp, split_folder, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    args = sweep_args(in_tmp, split_folder, 2, "--image-size", "32", "--soup-top", "0", "--ensemble-top", "0")
    result = sweep.run_sweep(sweep.parse_args(args))
    assert final_test.main(["--run-id", result.parent_run_id, "--tracking-uri", uri, "--model-name", "cats"]) == 0
    out = in_tmp / "model.onnx"
    capsys.readouterr()
    assert export.main(["--model", "models:/cats@champion", "--format", "onnx", "--out", str(out),
                        "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "parity: max abs logit difference" in printed and "over 8 images" in printed  # real training images
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    classes = json.loads(meta["classes"])
    assert meta["image_size"] == "32" and len(json.loads(meta["mean"])) == 3 and classes == ["cat", "dog", "owl"]
    # the graph takes any batch size and gives the labels src.predict gives
    model, config = export.load_model("models:/cats@champion", export.Tracker(uri))
    images = sorted((split_folder / "test").rglob("*.png"))
    batch = export.parity_inputs(export.Tracker(uri), "models:/cats@champion", config)[:3]
    logits = ort.InferenceSession(str(out)).run(["logits"], {"images": batch.numpy()})[0]
    assert logits.shape == (3, 3)
    rows, _ = predict.predict(model, config, images[:3], 8, predict.pick_device("cpu"))
    test_batch = np.stack([export.D.build_transform("none", 32, config["mean"], config["std"], False)(
        export.D.load_rgb(p)).numpy() for p in images[:3]])
    onnx_labels = ort.InferenceSession(str(out)).run(["logits"], {"images": test_batch})[0].argmax(1).tolist()
    assert onnx_labels == [labels[0] for _, labels, _ in rows]

    # without the optional extra (its import blocked in a fresh process): a clear message, nothing written
    blocked = ("import sys; sys.modules['onnxruntime'] = None; from src import export; "
               f"sys.exit(export.main(['--model', 'models:/cats@champion', '--out', {str(in_tmp / 'again.onnx')!r}, "
               f"'--tracking-uri', {uri!r}]))")
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "pip install -e '.[onnx]'" in run.stderr and not (in_tmp / "again.onnx").exists()
