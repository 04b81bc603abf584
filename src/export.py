"""CLI: export a sweep's model to ONNX, checked against PyTorch at export.

    python -m src.export --model URI --format onnx --out model.onnx [--tracking-uri URI]

URI as `src.predict` takes it (models:/NAME@alias, models:/NAME/VERSION, a parent or trial run
id). The graph takes a float32 batch `images` of N x 3 x S x S, already preprocessed (decode to
RGB, resize the shorter side to round(S / 0.875), center crop S, scale to 0-1, normalize), with a
dynamic batch axis, and gives `logits` (N x classes). The preprocessing constants and the class
names are in the model's metadata (`metadata_props`: `classes` and `mean`, `std` as JSON,
`image_size`, `resize`). Parity: ONNX Runtime and PyTorch (fp32) logits on the input example
the registry holds (or a training image of the sweep) and on a batch of the sweep's training
images; the max abs difference is printed and above `TOLERANCE` the export fails (the file is
not kept). Needs the optional extra: pip install -e '.[onnx]' (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from . import data as D
from .errors import UserError
from .files import write_atomic
from .registry import load_model, split_of
from .tracking import Tracker

TOLERANCE = 1e-3
PARITY_IMAGES = 8


def need_onnx():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as exc:
        raise UserError(f"ONNX export needs the optional extra ({exc.name} is not installed): "
                        f"pip install -e '.[onnx]'") from exc
    return onnx, onnxruntime


def parity_inputs(tracker: Tracker, uri: str, config: dict) -> torch.Tensor:
    """Preprocessed real images: the sweep's first readable training images (never test ones),
    found through the run's parent; a random batch only when the data folder is gone."""
    transform = D.eval_transform(config)
    images, split = [], split_of(uri, tracker)
    if split:
        for rel, _ in split["train"][:4 * PARITY_IMAGES]:
            try:
                images.append(transform(D.load_rgb(Path(split["root"]) / rel)))
            except D.DataError:
                continue
            if len(images) == PARITY_IMAGES:
                break
    if not images:
        print("warning: the sweep's training images are not readable here; parity is checked on random inputs",
              file=sys.stderr)
        return torch.randn(PARITY_IMAGES, 3, config["image_size"], config["image_size"])
    return torch.stack(images)


def export_onnx(model: torch.nn.Module, config: dict, inputs: torch.Tensor, out: Path) -> float:
    """Write `out` (atomically) and return the max abs logit difference ORT vs PyTorch."""
    onnx, ort = need_onnx()
    model = model.eval().float()
    size = config["image_size"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        program = torch.onnx.export(model, (inputs[:2],), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(path))
        proto = onnx.load(str(path))
        meta = {"classes": json.dumps(list(config["classes"])), "mean": json.dumps(list(config["mean"])),
                "std": json.dumps(list(config["std"])), "image_size": str(size),
                "resize": f"shorter side to {D.stored_side(size)} px, center crop {D.stored_side(size)}, then {size}",
                "backbone": config["backbone"]}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for batch in (inputs[:1], inputs):  # one image, and a batch of another size than the export's
            with torch.no_grad():
                expected = model(batch).float().numpy()
            got = session.run(["logits"], {"images": batch.numpy()})[0]
            worst = max(worst, float(abs(got - expected).max()))
        if worst > TOLERANCE:
            raise UserError(f"ONNX Runtime's logits differ from PyTorch's by up to {worst:.2e} (more than "
                            f"{TOLERANCE:g}); the export is not kept")
        write_atomic(out, lambda t: t.write_bytes(path.read_bytes()))
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, or a run id")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's own)")
    args = p.parse_args(argv)
    try:
        need_onnx()
        if not args.out.parent.is_dir():
            raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist; create it or write elsewhere")
        tracker = Tracker(args.tracking_uri)
        model, config = load_model(args.model, tracker)
        inputs = parity_inputs(tracker, args.model, config)
        worst = export_onnx(model, config, inputs, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"parity: max abs logit difference ONNX Runtime vs PyTorch {worst:.2e} over {len(inputs)} images")
    print(f"wrote {args.out} (input images: N x 3 x {config['image_size']} x {config['image_size']}, "
          f"{len(config['classes'])} classes; preprocessing in its metadata)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
