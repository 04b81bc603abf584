"""Typed settings: the fixed part of a sweep, the search space, and one trial's full config.

A sweep file (TOML, see `sweeps/default.toml`) has these tables:
  [fixed]   settings shared by every trial (fields of `Fixed`);
  [demo]    overrides of [fixed] applied only on the built-in demo data;
  [search]  one entry per sampled parameter: {low, high[, log]} for a range,
            {choices = [...]} for levels, or a plain value to pin it. SEARCHED must all be
            there; OPTIONAL may be, and a parameter left out takes its value in OPTIONAL;
  [prune]   how trials are pruned (fields of `PruneSettings`; optional);
  [start]   some sampled parameters' values for a new study's first trial (optional; src/start.py).
CLI flags override [fixed] (and [demo]); nothing else reads the file.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .fidelity import HALF, PHASE1_VIEWS, SEARCH_KEYS, resolve_search

SEARCHED = ("head_lr", "backbone_lr_ratio", "patience", "aug_strength")
# Optional searched parameters and what a sweep file without them trains with (as before them):
#   weight_decay     AdamW's decoupled decay, never on 1-D parameters (biases, norm weights); 0: Adam;
#   label_smoothing  of the training loss only (valid/loss stays plain cross-entropy);
#   lr_schedule      "constant", or "cosine": per optimizer step over the phase's max epochs, after
#                    a linear warmup over its first WARMUP_FRACTION of steps (src/train.py);
#   unfreeze         phase 2 trains the backbone's last N natural stages (`model.stages`), or "all".
OPTIONAL = {"weight_decay": 0.0, "label_smoothing": 0.0, "lr_schedule": "constant", "unfreeze": "all"}
LR_SCHEDULES = ("constant", "cosine")
PRUNERS = ("median", "percentile", "halving", "none")

# Augmentation levels (`data.build_transform`: its pixel amounts are the full size's, scaled at a
# search size); all end at size x size. The first five
# start from the image resized (shorter side S = size / 0.875) and center-cropped to S x S:
# "none" is exactly the evaluation transform; "seed" is the seed recipe's flip + RandomCrop(pad
# 8). The FRAME_LEVELS start from the whole frame instead (shorter side S, the longer side
# center-cropped to at most MAX_ASPECT x S), as the standard RandomResizedCrop recipe does.
AUG_LEVELS = {
    "none":   "center crop (the evaluation transform)",
    "light":  "RandomResizedCrop(scale 0.6-1) + horizontal flip",
    "seed":   "center crop, horizontal flip + RandomCrop(pad 8)",
    "medium": "RandomResizedCrop(scale 0.35-1) + flip + ColorJitter(0.2, 0.2, 0.2)",
    "strong": "RandomResizedCrop(scale 0.2-1) + flip + TrivialAugmentWide",
    "frame_light": "from the whole frame: RandomResizedCrop(scale 0.35-1, ratio 3/4-4/3) + flip",
    "frame":  "from the whole frame: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + flip (the standard recipe)",
}
FRAME_LEVELS = ("frame_light", "frame")
SIZED_LEVELS = ("seed", "strong")  # pixel amounts (padding, translations): scaled at a search size
MAX_ASPECT = 1.5  # a frame's longer side is at most this times its shorter one (the rest is cut evenly)


@dataclass(frozen=True)
class Fixed:
    backbone: str = "resnet18"          # torchvision model name
    weights: str = "imagenet"           # "imagenet", "none", or a path to a state dict
    image_size: int = 224               # crop side in pixels
    batch_size: int = 32                # images per optimizer step
    max_epochs_phase1: int = 10         # head-only epochs (frozen backbone)
    max_epochs_phase2: int = 10         # fine-tuning epochs
    phase2_head_lr_factor: float = 1.0  # phase-2 head lr = head_lr * this
    seed: int = 0                       # study seed
    search_size: int = 0                # trials train at this side, the best again at image_size (0: off;
                                        # "half" in a sweep file or flag: `half_size`, resolved by resolve_fixed)
    search_epochs: int = 0              # a search-size trial's phase-2 epochs (0: all; "half"): fidelity.searched
    phase1_views: str = "augmented"     # what phase 1 trains on: fidelity.PHASE1_VIEWS


@dataclass(frozen=True)
class PruneSettings:
    """[prune]: which Optuna pruner judges trials, and when. Every pruner sees a phase-aligned
    view (src/pruning.py): phase-2 epoch e of every trial is its step e, whatever phase 1 did."""
    pruner: str = "median"      # median | percentile | halving (successive halving) | none
    phase1: bool = False        # also prune inside phase 1 (against other trials' phase-1 epochs)
    startup_trials: int = 5     # median/percentile: never prune before this many trials completed
    warmup_epochs: int = 2      # never prune before this epoch of a phase (halving: its first rung)
    percentile: float = 25.0    # percentile: keep the trials in the top this-many percent at an epoch (Optuna's)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None        # levels, or a single pinned value


@dataclass(frozen=True)
class SweepFile:
    path: Path
    fixed: Fixed
    demo: dict[str, Any]
    search: dict[str, ParamSpec]
    prune: PruneSettings = PruneSettings()
    start: dict[str, Any] = field(default_factory=dict)  # [start]: the first trial's values


@dataclass(frozen=True)
class TrialConfig:
    """Everything needed to rebuild and retrain one trial; stored in its checkpoints."""
    backbone: str
    weights: str
    image_size: int
    batch_size: int
    max_epochs_phase1: int
    max_epochs_phase2: int
    phase2_head_lr_factor: float
    head_lr: float
    backbone_lr_ratio: float
    patience: int
    aug_strength: str
    seed: int                           # this trial's seed (derived from study seed + trial number)
    weight_decay: float = 0.0           # OPTIONAL parameters: their defaults train as before them
    label_smoothing: float = 0.0
    lr_schedule: str = "constant"
    unfreeze: str | int = "all"
    search_size: int = 0                # the study's (Fixed); image_size == search_size: a search-size model
    search_epochs: int = 0              # the study's (Fixed)
    phase1_views: str = "augmented"     # the study's (Fixed); a checkpoint from before it: "augmented"
    classes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def build(cls, fixed: Fixed, sampled: dict[str, Any], *, weights: str, seed: int,
              classes) -> "TrialConfig":
        """The sweep's fixed settings, then the effective weights, the trial's own seed and the
        sampled values: every field of `Fixed` is a field here, so none is copied by hand."""
        return cls(**{**dataclasses.asdict(fixed), "weights": weights, "seed": seed,
                      "classes": tuple(classes), **sampled})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "classes" else v) for k, v in d.items() if k in known})


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown} in [{where}]; allowed: {sorted(allowed)}")


def _fixed_value(name: str, value: Any, path: Path, where: str) -> Any:
    if name in SEARCH_KEYS and value == HALF:
        return value
    expected = {f.name: f.type for f in dataclasses.fields(Fixed)}[name]
    choices = {"phase1_views": list(PHASE1_VIEWS)}.get(name)  # a str field with named values
    ok = {"str": isinstance(value, str) and value in (choices or [value]), "float": isinstance(value, (int, float))
          and not isinstance(value, bool), "int": isinstance(value, int) and not isinstance(value, bool)}[expected]
    if not ok:
        raise UserError(f"{path}: [{where}] {name} = {value!r} should be " + (f"one of {choices}" if choices else
                        f"a {expected}") + (f' or "{HALF}"' if name in SEARCH_KEYS else ""))
    if expected in ("int", "float") and name not in ("seed", *SEARCH_KEYS) and value <= 0:
        raise UserError(f"{path}: [{where}] {name} = {value!r} must be > 0")
    if name in ("seed", *SEARCH_KEYS) and value < 0:
        raise UserError(f"{path}: [{where}] {name} = {value!r} must be >= 0")
    return float(value) if expected == "float" else value


def _param_spec(name: str, raw: Any, path: Path) -> ParamSpec:
    if not isinstance(raw, dict):          # a plain value pins the parameter
        return ParamSpec(name, choices=(raw,))
    _check_keys(raw, {"low", "high", "log", "choices"}, f"search.{name}", path)
    if "choices" in raw:
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{path}: [search] {name}.choices must be a non-empty list, got {choices!r}")
        return ParamSpec(name, choices=tuple(choices))
    if "low" not in raw or "high" not in raw:
        raise UserError(f"{path}: [search] {name} needs low and high (or choices, or a plain value)")
    low, high, log = raw["low"], raw["high"], raw.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{path}: [search] {name}.log = {log!r} must be true or false")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise UserError(f"{path}: [search] {name} low={low!r} high={high!r} must be numbers")
    if not low < high or (log and low <= 0):
        raise UserError(f"{path}: [search] {name} has an impossible range low={low!r} high={high!r}"
                        f"{' (log needs low > 0)' if log else ''}; fix it so that 0 < low < high")
    return ParamSpec(name, low=low, high=high, log=log)


def _check_values(spec: ParamSpec, path: Path) -> None:
    """Each sampled parameter's values must make sense, checked before any trial runs."""
    values = list(spec.choices) if spec.choices is not None else [spec.low, spec.high]
    where = f"{path}: [search] {spec.name}"
    levels = {"aug_strength": list(AUG_LEVELS), "lr_schedule": list(LR_SCHEDULES)}.get(spec.name)
    if levels is not None:
        bad = [v for v in values if v not in levels]
        if bad:
            raise UserError(f"{where} has unknown level(s) {bad}; use {levels}")
        return
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    if spec.name == "unfreeze":
        if spec.choices is None or not all(v == "all" or whole(v) for v in values):
            raise UserError(f"{where} = {values} must be choices of \"all\" or whole numbers of stages >= 1, "
                            f"e.g. {{ choices = [\"all\", 2, 3] }}")
        return
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if spec.name == "patience":
        if not numbers or not all(float(v).is_integer() and v >= 1 for v in values):
            raise UserError(f"{where} = {values} must be whole numbers of epochs >= 1")
        return
    floor, ceiling = {"backbone_lr_ratio": (">= 0", None), "weight_decay": (">= 0", None),
                      "label_smoothing": (">= 0", 1.0)}.get(spec.name, ("> 0", None))
    ok = (lambda v: v >= 0) if floor == ">= 0" else (lambda v: v > 0)
    if not numbers or not all(ok(v) and (ceiling is None or v < ceiling) for v in values):
        raise UserError(f"{where} = {values} must be numbers {floor}{f' and < {ceiling:g}' if ceiling else ''}")


def _start_value(name: str, value: Any, spec: ParamSpec | None, path: Path) -> Any:
    """A [start] value: one its [search] entry can draw, as the type it is sampled as."""
    if spec is None or (spec.choices is not None and len(spec.choices) == 1):
        raise UserError(f"{path}: [start] {name} = {value!r}: {name} is "
                        f"{'pinned in [search]' if spec else 'not sampled by [search]'}; [start] gives the first "
                        f"trial's value of a sampled parameter, so drop the key or sample {name} in [search]")
    whole = isinstance(spec.low, int) and isinstance(spec.high, int)
    if spec.choices is not None:
        if value not in spec.choices or isinstance(value, bool):
            raise UserError(f"{path}: [start] {name} = {value!r} is not one of its [search] choices "
                            f"{list(spec.choices)}; give one of them")
        return spec.choices[list(spec.choices).index(value)]  # the choice itself: 2.0 given, 2 kept
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and spec.low <= value <= spec.high
            and (not whole or float(value).is_integer())):
        return int(value) if whole else float(value)
    raise UserError(f"{path}: [start] {name} = {value!r} is outside its [search] range "
                    f"{spec.low!r}-{spec.high!r}; give a value in it")


def _prune_settings(raw: Any, path: Path) -> PruneSettings:
    if not isinstance(raw, dict):
        raise UserError(f"{path}: prune must be a table ([prune]), got {raw!r}")
    fields = {f.name: f.type for f in dataclasses.fields(PruneSettings)}
    _check_keys(raw, set(fields), "prune", path)
    for name, value in raw.items():
        kind = fields[name]
        ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              "float": isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 100}[kind]
        if not ok:
            want = {"str": "a string", "bool": "true or false", "int": "a whole number >= 0",
                    "float": "a number between 0 and 100"}[kind]
            raise UserError(f"{path}: [prune] {name} = {value!r} should be {want}")
    if raw.get("pruner", "median") not in PRUNERS:
        raise UserError(f"{path}: [prune] pruner = {raw['pruner']!r} is not one of {list(PRUNERS)}")
    if raw.get("pruner") == "halving" and raw.get("phase1"):  # its rungs are one record per trial
        raise UserError(f"{path}: [prune] pruner = \"halving\" judges phase 2 only; drop phase1 = true")
    return PruneSettings(**{k: (float(v) if fields[k] == "float" else v) for k, v in raw.items()})


def load_sweep(path: str | Path) -> SweepFile:
    """Read and validate a sweep file; every problem names the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist; pass --sweep with a file like sweeps/default.toml")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from exc
    _check_keys(doc, {"fixed", "demo", "search", "prune", "start"}, "top level", path)
    for table in ("fixed", "demo", "search", "start"):
        if not isinstance(doc.get(table, {}), dict):
            raise UserError(f"{path}: {table} must be a table ([{table}]), got {doc[table]!r}")
    fixed_names = {f.name for f in dataclasses.fields(Fixed)}
    raw_fixed, raw_demo = doc.get("fixed", {}), doc.get("demo", {})
    _check_keys(raw_fixed, fixed_names, "fixed", path)
    _check_keys(raw_demo, fixed_names, "demo", path)
    fixed = Fixed(**{k: _fixed_value(k, v, path, "fixed") for k, v in raw_fixed.items()})
    demo = {k: _fixed_value(k, v, path, "demo") for k, v in raw_demo.items()}
    raw_search = doc.get("search", {})
    _check_keys(raw_search, set(SEARCHED) | set(OPTIONAL), "search", path)
    missing = [n for n in SEARCHED if n not in raw_search]
    if missing:
        raise UserError(f"{path}: [search] lacks {missing}; give a range, choices or a plain value for each")
    search = {n: _param_spec(n, raw_search[n], path) for n in (*SEARCHED, *OPTIONAL) if n in raw_search}
    for spec in search.values():
        _check_values(spec, path)
    return SweepFile(path=path, fixed=fixed, demo=demo, search=search,
                     prune=_prune_settings(doc.get("prune", {}), path),
                     start={n: _start_value(n, v, search.get(n), path) for n, v in doc.get("start", {}).items()})


def resolve_fixed(sweep: SweepFile, on_demo: bool, overrides: dict[str, Any]) -> Fixed:
    """[fixed], then [demo] when on the demo data, then CLI flags that were given (not None)."""
    values = dataclasses.asdict(sweep.fixed)
    if on_demo:
        values.update(sweep.demo)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("image_size", "batch_size", "max_epochs_phase1", "max_epochs_phase2"):
        if int(values[name]) < 1:
            raise UserError(f"{name} = {values[name]!r} must be at least 1")
    if int(values["seed"]) < 0:
        raise UserError(f"seed = {values['seed']!r} must be >= 0")
    return Fixed(**resolve_search(values))
