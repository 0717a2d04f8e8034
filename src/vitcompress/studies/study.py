"""Reading a study: the file (or a built-in name), its settings, and its models and teachers.

A study is a YAML file (or a built-in name: ``smoke``, ``seed``, ``seed-scratch``, ``seed-full``)::

    name: my-study
    description: ViT and DeiT, formats x sparsity
    data: fashion-mnist          # a data spec or a list of them; ``--data`` overrides it
    limit: null                  # keep the first N images of each split (smoke runs only)
    seed: 0
    device: auto                 # where each run trains and evaluates: auto | cpu | cuda[:N]
    speed: true                  # measure latency and throughput of every run (CPU)
    resources: {cpus: 1, gpus: 0}   # what one run asks of a Ray cluster (--executor ray)
    teachers:                    # trained once, used by the models below
      resnet: {preset: resnet-micro, epochs: 2, lr: 2.0e-3}
    models:                      # label: how to get its trained baseline
      vit-nano:  {preset: vit-nano, epochs: 2}
      deit-nano: {preset: deit-nano, epochs: 2, teacher: resnet, distill: hard}
      mine:      {run: runs/my-vit}           # an existing trained run directory
    recipes:                     # templates; each one expands over its grid (see grid.py)
      - name: dense-$format
        grid:
          format:
            fp32: {weights: fp32, activations: null}
            int8: {weights: int8, activations: int8}
        steps:
          - quantize: $format

Model keys: ``preset``, ``run`` or ``from``. ``run: DIR`` uses an existing run as it is
(trained here, or made by ``vitcompress import``); ``from: DIR`` does the same, and with
``finetune: {epochs: 3, lr: 1.0e-4, img_size: 224, ...}`` (TrainConfig fields, fine-tuning
defaults) first fine-tunes it on the study's data, with new heads for its classes and a
resampled position embedding for another size (``train --init-from``). With ``preset``,
training settings ``epochs``, ``lr``, ``batch_size``,
``weight_decay``, ``warmup_epochs``, ``label_smoothing``, ``augment``, ``img_size``,
``patch_size``, ``drop_path``, ``amp`` (``bf16``: autocast, faster for a ResNet on the CPU);
``limit`` (this model's own image limit, e.g. for a teacher; runs on a model are evaluated on its
first N test images too); ``teacher`` (a label under ``teachers`` or ``models``, or a run
directory) with ``distill`` (``hard`` or ``soft``, default hard), ``distill_alpha``,
``distill_tau``. Teachers take the same keys. ``teacher`` and ``distill`` also go with ``run``
and ``from``: they name the teacher that the runs' fine-tunes distil from (``$distill``) and,
with ``from`` and ``finetune``, the baseline's own fine-tune. ``zoo:NAME`` names a shipped
model wherever a run directory goes.

Every model and teacher becomes a :class:`Baseline` named by a hash of what it is trained from
(preset, training settings, teacher, data, limit, seed; for an existing run, its path), never of
the output directory, so the same study names the same baselines in every process.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vitcompress.config import check_keys, is_int, load_yaml
from vitcompress.errors import VitcompressError
from vitcompress.train import TrainConfig
from vitcompress.zoo import PREFIX as ZOO_PREFIX
from vitcompress.zoo import run_path

BUILTIN = ("smoke", "seed", "seed-scratch", "seed-full")
TOP_KEYS = (
    "name", "description", "data", "limit", "seed", "device", "speed", "resources", "teachers",
    "models", "recipes",
)  # fmt: skip
# The training settings a study's model may set, with TrainConfig's defaults. A baseline's
# hash is taken over exactly these, so adding a key here would rename every baseline.
TRAIN_KEYS = (
    "epochs", "lr", "batch_size", "weight_decay", "warmup_epochs", "label_smoothing", "augment",
    "img_size", "patch_size", "drop_path", "distill_alpha", "distill_tau", "amp",
)  # fmt: skip
TRAIN_DEFAULTS: dict[str, Any] = {k: getattr(TrainConfig(), k) for k in TRAIN_KEYS}
MODEL_KEYS = ("preset", "run", "from", "finetune", "teacher", "distill", "limit", *TRAIN_DEFAULTS)
DEFAULT_RESOURCES = MappingProxyType({"cpus": 1, "gpus": 0})


@dataclass(frozen=True)
class Baseline:
    """A trained model the runs start from: a preset trained here, or an existing run.

    ``train`` is plain data (it is hashed, pickled to workers and written to JSON): read it, do
    not change it.
    """

    label: str
    hash: str
    preset: str | None
    run: str | None  # an existing run directory (absolute)
    train: dict
    teacher: str | None  # hash of the teacher baseline, or an absolute run directory
    distill: str | None
    data: str
    limit: int | None
    seed: int
    family: str
    size: str
    init_from: str | None = None  # an existing run this baseline is fine-tuned from (absolute)

    def directory(self, out: Path) -> Path:
        """Where this baseline is (an existing run) or is trained to: ``out/baselines/<hash>``."""
        return Path(self.run) if self.run else Path(out) / "baselines" / self.hash


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a baseline, a data spec and a recipe (teachers still symbolic).

    ``recipe`` and ``config`` are plain data (hashed into ``id``, stored in the results): read
    them, do not change them.
    """

    id: str
    study: str
    model: str
    recipe_name: str
    recipe: dict
    baseline: str  # hash
    data: str
    family: str
    size: str
    preset: str | None
    config: dict


@dataclass(frozen=True)
class Study:
    """A study expanded: its runs in file order and its baselines by hash, teachers first."""

    name: str
    source: str
    runs: tuple[RunSpec, ...]
    baselines: Mapping[str, Baseline]
    device: str = "auto"
    speed: bool = True
    resources: Mapping[str, float] = field(default_factory=lambda: DEFAULT_RESOURCES)

    def __post_init__(self) -> None:
        # read-only views, so that a study shared by the runner's helpers stays what was expanded
        object.__setattr__(self, "runs", tuple(self.runs))
        object.__setattr__(self, "baselines", MappingProxyType(dict(self.baselines)))
        object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))

    def run_ids(self) -> list[str]:
        return [r.id for r in self.runs]


@dataclass(frozen=True)
class Settings:
    """A study's top-level settings, checked; ``data`` already overridden by ``--data``."""

    name: str
    source: str
    data: tuple[str, ...]
    limit: int | None
    seed: int
    device: str
    speed: bool
    resources: Mapping[str, float]


def digest(obj: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``obj`` as canonical JSON.

    Run ids and baseline hashes are these digests: the encoding (sorted keys, no spaces,
    ``str`` for what JSON cannot hold) must never change, or every stored run is renamed.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def safe_name(s: str) -> str:
    """``s`` with anything but letters, digits and ``._+-`` made ``_``: a file name part."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("_") or "x"


def builtin_study_path(name: str) -> Path:
    """The YAML file of a built-in study (shipped as package data)."""
    return Path(str(resources.files("vitcompress.studies").joinpath("builtin", f"{name}.yaml")))


def load_study(study: str | Path) -> tuple[dict, str]:
    """The study mapping and where it came from: a built-in name or a YAML file."""
    path = Path(study)
    if not path.is_file():
        if str(study) in BUILTIN:
            path = builtin_study_path(str(study))
        else:
            raise VitcompressError(
                f"study not found: {study} (a YAML file, or a built-in: {', '.join(BUILTIN)})"
            )
    data = load_yaml(path, "study")
    if not isinstance(data, Mapping):
        raise VitcompressError(f"{path}: a study is a mapping with 'models' and 'recipes'")
    return dict(data), str(path)


def read_study(study: str | Path | Mapping, data: str | None = None) -> tuple[dict, Settings]:
    """The study mapping and its checked top-level settings (models and recipes not yet).

    ``data`` replaces the study's data spec(s). Errors name the file (``study`` for a mapping).
    """
    if isinstance(study, Mapping):
        doc, src = dict(study), "study"
    else:
        doc, src = load_study(study)
    check_keys(doc, TOP_KEYS, src)
    name = doc.get("name") or Path(src).stem
    if not isinstance(name, str):
        raise VitcompressError(f"{src}: name must be a string")
    datas = [data] if data else doc.get("data", "fashion-mnist")
    datas = [datas] if isinstance(datas, str) else datas
    if not isinstance(datas, list) or not datas or not all(isinstance(d, str) for d in datas):
        raise VitcompressError(f"{src}: data must be a data spec or a list of them")
    from vitcompress.data import parse_spec

    for d in datas:
        try:
            parse_spec(d)
        except VitcompressError as e:
            raise VitcompressError(f"{src}: data: {e}") from None
    limit = doc.get("limit")
    if limit is not None and (not is_int(limit) or limit < 1):
        raise VitcompressError(f"{src}: limit must be an integer >= 1 or null, got {limit!r}")
    seed = doc.get("seed", 0)
    if not is_int(seed):
        raise VitcompressError(f"{src}: seed must be an integer, got {seed!r}")
    device = str(doc.get("device", "auto"))
    speed = doc.get("speed", True)
    if not isinstance(speed, bool):
        raise VitcompressError(f"{src}: speed must be true or false, got {speed!r}")
    res = doc.get("resources") or {}
    if not isinstance(res, Mapping):
        raise VitcompressError(f"{src}: resources must be a mapping like {{cpus: 1, gpus: 0}}")
    check_keys(res, ("cpus", "gpus"), f"{src}: resources")
    resources_ = {k: res.get(k, v) for k, v in DEFAULT_RESOURCES.items()}
    for k, v in resources_.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise VitcompressError(f"{src}: resources.{k} must be a number >= 0, got {v!r}")
    models = doc.get("models")
    if not isinstance(models, Mapping) or not models:
        raise VitcompressError(f"{src}: 'models' must be a non-empty mapping of label: settings")
    settings = Settings(
        name, src, tuple(datas), limit, seed, device, speed, MappingProxyType(resources_)
    )
    return doc, settings


def _family_size(preset: str) -> tuple[str, str]:
    fam, _, size = preset.partition("-")
    if fam.startswith("resnet") and not size:
        return "resnet", fam[len("resnet") :]
    return fam, size


def _check_train(train: dict, where: str) -> None:
    try:
        TrainConfig(**train)
    except VitcompressError as e:
        raise VitcompressError(f"{where}: {e}") from None


def _model_entries(doc: Mapping, src: str) -> dict[str, tuple[str, dict]]:
    """(where, settings) of every teacher and model by label, keys checked."""
    entries: dict[str, tuple[str, dict]] = {}
    for section in ("teachers", "models"):
        block = doc.get(section) or {}
        if not isinstance(block, Mapping):
            raise VitcompressError(f"{src}: '{section}' must be a mapping of label: settings")
        for label, spec in block.items():
            where = f"{src}: {section}.{label}"
            if label in entries:
                raise VitcompressError(f"{where}: label {label!r} is used twice")
            if not isinstance(spec, Mapping):
                raise VitcompressError(f"{where}: expected a mapping like {{preset: vit-nano}}")
            check_keys(spec, MODEL_KEYS, where)
            entries[str(label)] = (where, dict(spec))
    return entries


def _run_identity(spec: str, run: Path) -> str:
    """What names an existing run in its baseline's hash: its absolute path, or for a shipped
    model its zoo name and a digest of its weights (the same wherever the package is installed,
    another once the zoo is retrained)."""
    if not spec.startswith(ZOO_PREFIX):
        return str(run)
    weights = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()[:16]
    return f"{spec}@{weights}"


def _existing_run(
    label: str,
    spec: dict,
    where: str,
    data: str,
    limit: int | None,
    seed: int,
    teacher: str | None = None,
    distill: str | None = None,
) -> Baseline:
    key = "run" if "run" in spec else "from"
    extra = [k for k in spec if k not in (key, "finetune", "limit", "teacher", "distill")]
    if extra:
        raise VitcompressError(f"{where}: {extra[0]!r} does not apply to an existing run")
    run = run_path(Path(str(spec[key])).expanduser()).resolve()
    if not (run / "config.json").is_file():
        raise VitcompressError(f"{where}: run {run} is not a run directory (no config.json)")
    try:
        cfg = json.loads((run / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitcompressError(f"{where}: corrupt {run / 'config.json'}: {e}") from None
    model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    preset = str(model.get("preset") or run.name)
    fam, size = _family_size(preset)
    if spec.get("finetune") is None:
        if "limit" in spec:
            raise VitcompressError(f"{where}: 'limit' does not apply to an existing run")
        # an existing run is named by where it is: it is not retrained, nothing else names it
        # (but its teacher, which its fine-tunes' $distill names)
        ident: dict = {"run": _run_identity(str(spec[key]), run)}
        if teacher is not None:
            ident.update(teacher=teacher, distill=distill)
        h = digest(ident)
        return Baseline(label, h, None, str(run), {}, teacher, distill, data, limit, seed, fam,
                        size)  # fmt: skip
    if key != "from":
        raise VitcompressError(f"{where}: 'finetune' goes with 'from: RUN_DIR', not 'run'")
    ft = spec["finetune"]
    if not isinstance(ft, Mapping):
        raise VitcompressError(f"{where}: finetune must be a mapping of training settings")
    check_keys(ft, [k for k in TrainConfig.__dataclass_fields__ if k not in ("seed", "distill")],
               f"{where}: finetune")  # fmt: skip
    try:
        train = TrainConfig.for_finetune(**ft).to_dict()
    except VitcompressError as e:
        raise VitcompressError(f"{where}: finetune: {e}") from None
    for k in ("seed", "distill"):
        train.pop(k)
    own_limit = spec.get("limit", limit)
    if own_limit is not None and (not is_int(own_limit) or own_limit < 1):
        raise VitcompressError(f"{where}: limit must be an integer >= 1, got {own_limit!r}")
    ident = {"from": _run_identity(str(spec[key]), run), "finetune": train, "data": data,
             "limit": own_limit, "seed": seed}  # fmt: skip
    if teacher is not None:
        ident.update(teacher=teacher, distill=distill)
    return Baseline(label, digest(ident), None, None, train, teacher, distill, data, own_limit,
                    seed, fam, size, init_from=str(run))  # fmt: skip


def resolve_models(
    doc: Mapping, src: str, data: str, limit: int | None, seed: int
) -> tuple[dict[str, Baseline], dict[str, str]]:
    """All baselines (teachers and models) on ``data`` by hash, and the hash of each label.

    A teacher is resolved before its students (its hash is part of theirs), so the returned
    mapping lists teachers first.
    """
    from vitcompress.models import PRESETS

    entries = _model_entries(doc, src)
    by_label: dict[str, str] = {}
    baselines: dict[str, Baseline] = {}

    def teacher_of(spec: Mapping, where: str, stack: tuple[str, ...]) -> tuple:
        """``(teacher, distill)``: a teacher baseline's hash or a run directory, and how."""
        if spec.get("teacher") is None:
            if spec.get("distill") is not None:
                raise VitcompressError(f"{where}: distill needs a teacher")
            return None, None
        t = str(spec["teacher"])
        if t in entries:
            teacher_ref = resolve(t, stack)
        else:
            tp = run_path(Path(t).expanduser()).resolve()
            if not (tp / "config.json").is_file():
                raise VitcompressError(
                    f"{where}: teacher {t!r} is neither a label under teachers/models "
                    "nor a run directory"
                )
            teacher_ref = str(tp)
        distill = spec.get("distill", "hard")
        if distill not in ("hard", "soft"):
            raise VitcompressError(f"{where}: distill must be hard or soft, not {distill!r}")
        return teacher_ref, distill

    def resolve(label: str, stack: tuple[str, ...]) -> str:
        if label in by_label:
            return by_label[label]
        where, spec = entries[label]
        if label in stack:
            raise VitcompressError(f"{where}: teacher cycle {' -> '.join((*stack, label))}")
        if sum(k in spec for k in ("preset", "run", "from")) != 1:
            raise VitcompressError(f"{where}: give exactly one of 'preset', 'run' or 'from'")
        teacher_ref, distill = teacher_of(spec, where, stack + (label,))
        if "run" in spec or "from" in spec:
            b = _existing_run(label, spec, where, data, limit, seed, teacher_ref, distill)
        else:
            preset = str(spec["preset"])
            if preset not in PRESETS:
                raise VitcompressError(
                    f"{where}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}"
                )
            train = {k: spec.get(k, v) for k, v in TRAIN_DEFAULTS.items()}
            _check_train(train, where)
            own_limit = spec.get("limit", limit)
            if own_limit is not None and (not is_int(own_limit) or own_limit < 1):
                raise VitcompressError(f"{where}: limit must be an integer >= 1, got {own_limit!r}")
            fam, size = _family_size(preset)
            ident = {"preset": preset, "train": train, "teacher": teacher_ref, "distill": distill,
                     "data": data, "limit": own_limit, "seed": seed}  # fmt: skip
            b = Baseline(label, digest(ident), preset, None, train, teacher_ref, distill, data,
                         own_limit, seed, fam, size)  # fmt: skip
        baselines.setdefault(b.hash, b)
        by_label[label] = b.hash
        return b.hash

    for label in entries:
        resolve(label, ())
    return baselines, by_label
