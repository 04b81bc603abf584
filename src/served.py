"""The scored winner as an MLflow pyfunc model, logged from code: this file is the model's code
(`mlflow.pyfunc.log_model(python_model=<this file>)`, `set_model` below), its one artifact the
winner's checkpoint (loaded with `weights_only=True`: no pickles). The second module allowed to
import mlflow, beside src/tracking.py.

Input: a pandas DataFrame with a `path` column (image files) or an `image` column (encoded
bytes: PNG, JPEG, ...; base64 in a served request's `dataframe_split`); both are optional
columns of the signature, and a row gives one of them. Parameter `top_k` (default 1).
Output, one row per input row: `label` and `probability` (the top class), `label_2` /
`probability_2` ... up to `top_k`, and `prob:<class>` for every class (the prefix keeps a class
called `label` from colliding with the column). Preprocessing is the final test's evaluation
transform exactly (decode to RGB, resize, center crop, normalize), in fp32.

Served (`mlflow models serve`), a `path` input would read the server's own disk: it is refused
unless the server was started with `TLSWEEP_SERVE_PATHS=1`. A row that is not a readable image
is refused with its reason (HTTP 400 when served), never a 500.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

PATHS_WHEN_SERVED = "TLSWEEP_SERVE_PATHS"
SERVING = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # set by MLflow's scoring server
PREFIX = "prob:"
CHAMPION = "champion"
BATCH = 32


def signature(classes: list[str]) -> ModelSignature:
    outputs = [ColSpec("string", "label"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"{PREFIX}{c}") for c in classes]
    return ModelSignature(inputs=Schema([ColSpec("string", "path", required=False),
                                         ColSpec("binary", "image", required=False)]),
                          outputs=Schema(outputs), params=ParamSchema([ParamSpec("top_k", "long", 1)]))


def _refuse(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier(PythonModel):
    def load_context(self, context) -> None:
        from src import data as D  # absolute: MLflow runs this file as a script, not as src.served
        from src import model as M
        self.model, self.config = M.model_from_checkpoint(Path(context.artifacts["checkpoint"]))
        config = self.config
        self.model.eval()
        self.classes = list(config["classes"])
        self.transform = D.eval_transform(config)
        self._load_rgb = D.load_rgb

    def _image(self, row: int, path, image) -> torch.Tensor:
        has_image = image is not None and not (isinstance(image, float) and pd.isna(image))
        has_path = isinstance(path, str) and path != ""
        if has_image == has_path:
            raise _refuse(f"row {row}: give exactly one of `path` (a file) and `image` (encoded bytes)")
        if has_path and os.environ.get(SERVING) == "true" and os.environ.get(PATHS_WHEN_SERVED) != "1":
            raise _refuse(f"row {row}: `path` inputs read the server's own disk and are off; send the file's "
                          f"bytes as base64 `image`, or start the server with {PATHS_WHEN_SERVED}=1")
        if has_image and isinstance(image, str):  # a JSON client that skipped the schema's decoding
            raise _refuse(f"row {row}: `image` must be the encoded file's bytes (base64 in a JSON request)")
        try:
            rgb = self._load_rgb(Path(path) if has_path else io.BytesIO(bytes(image)))
        except Exception as exc:  # data.DataError: names the reason
            what = path if has_path else f"the {len(bytes(image))} bytes given"
            raise _refuse(f"row {row}: {what} is not a readable image ({exc.__cause__ or exc})") from exc
        return self.transform(rgb)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", 1) or 1)
        if not 1 <= top_k <= len(self.classes):
            raise _refuse(f"top_k {top_k}: give 1 to {len(self.classes)} (the number of classes)")
        frame = pd.DataFrame(model_input)
        if not {"path", "image"} & set(frame.columns):
            raise _refuse(f"the input has columns {list(frame.columns)}; give a `path` or an `image` column")
        paths = frame["path"] if "path" in frame else [None] * len(frame)
        images = frame["image"] if "image" in frame else [None] * len(frame)
        tensors = [self._image(i, p, b) for i, (p, b) in enumerate(zip(paths, images))]
        probs = probabilities(self.model, tensors)
        return table(probs, self.classes, top_k)


def probabilities(model: torch.nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Softmax over the classes for each preprocessed image, in fp32, in batches."""
    if not tensors:
        return torch.empty(0, 0)
    with torch.no_grad():
        return torch.cat([torch.softmax(model(torch.stack(tensors[i:i + BATCH])).float(), 1)
                          for i in range(0, len(tensors), BATCH)])


def table(probs: torch.Tensor, classes: list[str], top_k: int = 1) -> pd.DataFrame:
    """The output columns (see the module docstring) from per-image class probabilities."""
    columns: dict[str, list] = {}
    if len(probs):
        top = torch.topk(probs, top_k, dim=1)
        for k in range(top_k):
            suffix = "" if k == 0 else f"_{k + 1}"
            columns[f"label{suffix}"] = [classes[i] for i in top.indices[:, k].tolist()]
            columns[f"probability{suffix}"] = top.values[:, k].double().tolist()
    else:
        columns = {"label": [], "probability": []}
    for c, name in enumerate(classes):
        columns[f"{PREFIX}{name}"] = probs[:, c].double().tolist() if len(probs) else []
    return pd.DataFrame(columns)


def log_and_register(tracking_uri: str | None, run_id: str, checkpoint: Path, example: bytes, name: str,
                     tags: dict, description: str, classes: list[str]):
    """Log the checkpoint as this pyfunc model on run `run_id`, register it as a new version of
    `name` with `tags` and `description`, and move alias `champion` to it; returns the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=__file__, artifacts={"checkpoint": str(checkpoint)},
                                       signature=signature(classes), input_example=pd.DataFrame({"image": [example]}),
                                       pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                                                         "torchvision", "pillow", "pandas"])
    client = MlflowClient(tracking_uri)
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.update_model_version(name, version.version, description=description)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return version


def load_registered(uri: str, tracking_uri: str | None):
    """(model, checkpoint config) of a registered version (`models:/NAME@alias`, `models:/NAME/N`),
    as the pyfunc model holds them; an unknown name, alias or version is a UserError naming them."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from src.errors import UserError
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return _unwrap(mlflow.pyfunc.load_model(uri))
    except MlflowException as exc:
        names = [m.name for m in MlflowClient(tracking_uri).search_registered_models(max_results=20)]
        raise UserError(f"{uri} cannot be loaded from {tracking_uri or mlflow.get_tracking_uri()} ({exc.message}); "
                        f"registered models there: {names or 'none'} (alias: @{CHAMPION}, or a version number)") from exc


def version_tags(uri: str, tracking_uri: str | None) -> dict:
    """The tags of the registered version `models:/NAME@alias` or `models:/NAME/N` names."""
    from mlflow.tracking import MlflowClient
    name, _, rest = uri[len("models:/"):].partition("@")
    client = MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, rest) if rest else client.get_model_version(*name.split("/", 1))
    except MlflowException:
        return {}
    return dict(version.tags)


def _unwrap(pyfunc_model):
    inner = pyfunc_model.unwrap_python_model()
    return inner.model, inner.config


set_model(ImageClassifier())
