"""Recipes: an ordered list of compression steps, validated whole before any work starts.

    name: deit-small-2of4-int8
    steps:
      - prune:    {pattern: "2:4", layers: "blocks.*"}
      - finetune: {epochs: 1, lr: 1e-4, distill: {teacher: self, kind: soft}}
      - quantize: {weights: int8, activations: int8, granularity: per_channel,
                   calibration: {method: percentile, batches: 16}}

Step kinds: ``shrink`` (:class:`~vitcompress.shrink.ShrinkConfig`: remove heads and MLP
neurons), ``prune`` (:class:`~vitcompress.sparsity.PruneConfig`), ``lowrank``
(:class:`~vitcompress.lowrank.LowRankConfig`), ``finetune`` (:class:`FinetuneConfig`),
``quantize`` (:class:`~vitcompress.quantize.QuantizeConfig`). ``layers`` is another name for
``targets``. A cubic ``prune`` step prunes gradually during the ``finetune`` step after it.
``shrink`` changes the layers' shapes, so it comes before prune, lowrank and quantize.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.lowrank import LowRankConfig, LowRankLinear
from vitcompress.models.checkpoints import STRUCTURE_REBUILDERS
from vitcompress.sparsity import PruneConfig
from vitcompress.targets import replace_module, select_modules

STEP_KINDS = ("shrink", "prune", "lowrank", "finetune", "quantize")
TOP_KEYS = ("name", "steps", "description")


@dataclass(frozen=True)
class DistillSpec:
    """Where a fine-tuning step takes its teacher: a run directory, or ``self`` (the model as it
    was before the recipe, i.e. self-distillation of the compressed model from the dense one)."""

    teacher: str = "self"
    kind: str = "soft"
    alpha: float = 0.5
    tau: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in ("soft", "hard"):
            raise VitcompressError(f"finetune.distill.kind must be soft or hard, not {self.kind!r}")
        if not 0 <= self.alpha <= 1:
            raise VitcompressError(f"finetune.distill.alpha must be in [0, 1], got {self.alpha}")
        if not self.tau > 0:
            raise VitcompressError(f"finetune.distill.tau must be > 0, got {self.tau}")
        if self.teacher != "self":
            p = Path(self.teacher)
            if not (p / "config.json").is_file():
                raise VitcompressError(
                    f"finetune.distill.teacher: {p} is not a run directory (no config.json)"
                )


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 128
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    max_steps: int | None = None  # stop early: fine-tune on a budget of optimizer steps
    distill: DistillSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise VitcompressError(f"finetune.epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise VitcompressError(f"finetune.lr must be a number > 0, got {self.lr!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise VitcompressError(
                f"finetune.max_steps must be an integer >= 1, got {self.max_steps!r}"
            )
        if isinstance(self.distill, Mapping):
            object.__setattr__(
                self, "distill", _build(DistillSpec, self.distill, "finetune.distill")
            )


@dataclass(frozen=True)
class Step:
    kind: str
    config: Any
    auto_schedule: bool = False  # a cubic prune whose steps come from the next finetune


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[Step, ...]
    description: str = ""
    source: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "steps": [{s.kind: config_to_dict(s.config)} for s in self.steps],
        }

    @property
    def hash(self) -> str:
        """A stable id: the hash of the resolved recipe (defaults filled in)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def config_to_dict(config: Any) -> dict:
    d = asdict(config) if is_dataclass(config) else dict(config)

    def clean(v: Any) -> Any:
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(d)


def _build(cls: type, d: Any, what: str) -> Any:
    """A config dataclass from a mapping; unknown keys are an error naming the valid ones."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise VitcompressError(f"{what}: expected a mapping of options, got {type(d).__name__}")
    d = dict(d)
    if "layers" in d:
        if "targets" in d:
            raise VitcompressError(f"{what}: give 'layers' or 'targets', not both")
        d["targets"] = d.pop("layers")
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in valid]
    if unknown:
        shown = [("layers" if v == "targets" else v) for v in valid]
        raise VitcompressError(
            f"{what}: unknown key {unknown[0]!r}; valid keys: {', '.join(shown)}"
        )
    try:
        return cls(**d)
    except TypeError as e:
        raise VitcompressError(f"{what}: {e}") from None


def _step_config(kind: str, options: Any, index: int) -> Any:
    what = f"step {index + 1} ({kind})"
    if kind == "prune":
        if isinstance(options, Mapping) and options.get("schedule") == "cubic":
            if options.get("n_steps") is None:
                # placeholder; the finetune step that follows sets the real schedule
                options = {**options, "n_steps": 1}
        return _prefixed(lambda: _build(PruneConfig, options, what), what)
    if kind == "lowrank":
        return _prefixed(lambda: _build(LowRankConfig, options, what), what)
    if kind == "shrink":
        from vitcompress.shrink import ShrinkConfig

        return _prefixed(lambda: _build(ShrinkConfig, options, what), what)
    if kind == "finetune":
        return _prefixed(lambda: _build(FinetuneConfig, options, what), what)
    if kind == "quantize":
        from vitcompress.quantize import QuantizeConfig

        return _prefixed(lambda: _build(QuantizeConfig, options, what), what)
    raise VitcompressError(
        f"step {index + 1}: unknown step {kind!r}; steps are {', '.join(STEP_KINDS)}"
    )


def _prefixed(fn, what: str):
    try:
        return fn()
    except VitcompressError as e:
        msg = str(e)
        raise VitcompressError(msg if msg.startswith("step ") else f"{what}: {msg}") from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping (parsed YAML) and return it; nothing is applied."""
    if not isinstance(data, Mapping):
        raise VitcompressError(f"{source}: a recipe is a mapping with 'name' and 'steps'")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise VitcompressError(
            f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}"
        )
    steps_raw = data.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise VitcompressError(f"{source}: 'steps' must be a non-empty list")
    steps = []
    for i, item in enumerate(steps_raw):
        if not isinstance(item, Mapping) or len(item) != 1:
            raise VitcompressError(
                f"{source}: step {i + 1} must be a mapping with exactly one key (the step kind)"
            )
        ((kind, options),) = item.items()
        auto = (
            kind == "prune"
            and isinstance(options, Mapping)
            and options.get("schedule") == "cubic"
            and options.get("n_steps") is None
        )
        steps.append(Step(kind, _step_config(kind, options, i), auto))
    _check_order(steps, source)
    return Recipe(
        name=str(data.get("name") or "recipe"),
        steps=tuple(steps),
        description=str(data.get("description", "")),
        source=dict(data),
    )


def _check_order(steps: list[Step], source: str) -> None:
    for i, s in enumerate(steps):
        if s.kind == "shrink":
            before = [t.kind for t in steps[:i] if t.kind in ("prune", "lowrank", "quantize")]
            if before:
                raise VitcompressError(
                    f"{source}: step {i + 1}: shrink changes the layers' shapes, so it must come "
                    f"before {before[0]} (put it first)"
                )
        if s.kind == "prune" and s.config.schedule == "cubic":
            nxt = steps[i + 1].kind if i + 1 < len(steps) else None
            if nxt != "finetune":
                raise VitcompressError(
                    f"{source}: step {i + 1}: a cubic prune happens during fine-tuning; follow it "
                    "with a finetune step"
                )
        if s.kind == "quantize" and i + 1 < len(steps):
            raise VitcompressError(
                f"{source}: step {i + 2} ({steps[i + 1].kind}) comes after quantize; quantize must "
                "be the last step (quantization-aware training is not supported)"
            )


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise VitcompressError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise VitcompressError(f"{path}: not valid YAML ({first})") from None
    return parse_recipe(data, str(path))


def check_recipe_names(recipe: Recipe, model: nn.Module) -> None:
    """Check every step's layer patterns against the modules that will exist at that step.

    Runs on a copy on the meta device (no memory, no maths): a low-rank step renames ``fc1`` to
    ``fc1.first``/``fc1.second``, so later patterns are checked against the renamed tree.
    """
    import torch

    with torch.device("meta"):
        shadow = copy.deepcopy(model).to("meta")
    for i, step in enumerate(recipe.steps):
        what = f"step {i + 1} ({step.kind})"
        cfg = step.config
        if step.kind == "prune":
            select_modules(shadow, cfg.targets, cfg.ignore, (nn.Linear, nn.Conv2d), what)
        elif step.kind == "shrink":
            from vitcompress.models.vit import Attention, Mlp

            kinds = ((Attention,) if cfg.heads > 0 else ()) + ((Mlp,) if cfg.mlp > 0 else ())
            select_modules(shadow, cfg.targets, cfg.ignore, kinds, what)
        elif step.kind == "lowrank":
            chosen = select_modules(shadow, cfg.targets, cfg.ignore, (nn.Linear, nn.Conv2d), what)
            for name, mod in chosen:
                if isinstance(mod, nn.Linear) and not name.endswith((".first", ".second")):
                    new = LowRankLinear(mod.in_features, mod.out_features, 1, mod.bias is not None,
                                        device="meta")  # fmt: skip
                    replace_module(shadow, name, new)
        elif step.kind == "quantize":
            select_modules(shadow, cfg.targets, cfg.ignore, (nn.Linear,), what)


def recipe_from_steps(name: str, steps: list[dict]) -> Recipe:
    return parse_recipe({"name": name, "steps": steps}, name)


# --------------------------------------------------------------------------------------------
# Applying a recipe
# --------------------------------------------------------------------------------------------


@dataclass
class RecipeData:
    """What the steps may need: a training loader (fine-tuning), a calibration loader (static
    activation ranges, Wanda), and the device. Loaders are only touched by steps that need them.
    """

    train_loader: Any = None
    calib_loader: Any = None
    device: Any = "cpu"
    seed: int = 0


def needs_calibration(recipe: Recipe) -> bool:
    for s in recipe.steps:
        if s.kind == "prune" and s.config.method == "wanda":
            return True
        if s.kind == "shrink" and s.config.method == "activation" and s.config.mlp > 0:
            return True
        if s.kind == "quantize" and not s.config.dynamic:
            from vitcompress.quantize import _is_scaled

            for fmt in (s.config.activation_format, s.config.matmul_format):
                if fmt is not None and _is_scaled(fmt):
                    return True
    return False


def needs_training(recipe: Recipe) -> bool:
    return any(s.kind == "finetune" for s in recipe.steps)


def _auto_cubic(cfg: PruneConfig, total_steps: int) -> PruneConfig:
    """Fill in a cubic schedule left open: ramp over the first 2/3 of fine-tuning, ten prunings,
    so the last third recovers accuracy at the final sparsity."""
    from dataclasses import replace

    ramp = max(1, (2 * total_steps) // 3)
    freq = cfg.frequency if cfg.frequency > 1 else max(1, ramp // 10)
    return replace(cfg, n_steps=max(1, ramp // freq), frequency=freq)


def apply_recipe(
    model: nn.Module,
    recipe: Recipe,
    data: RecipeData,
    teacher_for: Any = None,
) -> tuple[list[dict], list[dict]]:
    """Apply ``recipe`` to ``model`` in place, step by step.

    Returns ``(records, reports)``: records describe the structure each step left (stored in
    config.json so the model can be rebuilt before its weights load); reports say what each
    step did (achieved sparsity per layer, ranks, fine-tuning metrics).
    """
    from vitcompress.lowrank import factorize_, lowrank_ranks
    from vitcompress.sparsity import enforce_masks_, get_masks, prune_

    records: list[dict] = []
    reports: list[dict] = []
    pending_pruner: Step | None = None
    for i, step in enumerate(recipe.steps):
        cfg = step.config
        if step.kind == "prune":
            if cfg.schedule == "cubic":
                pending_pruner = step  # applied during the next finetune step
                continue
            achieved = prune_(model, cfg, data.calib_loader)
            records.append({"kind": "prune", "layers": sorted(get_masks(model))})
            reports.append({"step": i + 1, "kind": "prune", "sparsity": achieved})
        elif step.kind == "shrink":
            from vitcompress.shrink import shrink_, shrink_structure

            info = shrink_(model, cfg, data.calib_loader)
            records.append({"kind": "shrink", "structure": shrink_structure(model)})
            reports.append(
                {"step": i + 1, "kind": "shrink",
                 "blocks": {n: {"before": r["before"], "after": r["after"]}
                            for n, r in info.items()}}
            )  # fmt: skip
        elif step.kind == "lowrank":
            info = factorize_(model, cfg)
            records.append({"kind": "lowrank", "ranks": lowrank_ranks(model)})
            reports.append(
                {"step": i + 1, "kind": "lowrank",
                 "layers": {n: {"rank": r.rank, "kept": r.kept} for n, r in info.items()}}
            )  # fmt: skip
        elif step.kind == "finetune":
            metrics, pruner_report = _finetune(model, cfg, data, teacher_for, pending_pruner)
            if pending_pruner is not None:
                records.append({"kind": "prune", "layers": sorted(get_masks(model))})
                reports.append({"step": i, "kind": "prune", "sparsity": pruner_report})
                pending_pruner = None
            reports.append({"step": i + 1, "kind": "finetune", **metrics})
        elif step.kind == "quantize":
            from vitcompress.quantize import quantize_

            quantize_(model, cfg, data.calib_loader)
            records.append({"kind": "quantize", "config": config_to_dict(cfg)})
            reports.append({"step": i + 1, "kind": "quantize", "weights": cfg.weights,
                            "activations": cfg.activations})  # fmt: skip
        enforce_masks_(model)
    return records, reports


def _finetune(model, cfg: FinetuneConfig, data: RecipeData, teacher_for, prune_step):
    from vitcompress.sparsity import GradualPruner, enforce_masks_
    from vitcompress.train import TrainConfig, train

    if data.train_loader is None:
        raise VitcompressError("finetune needs training data")
    teacher = None
    if cfg.distill is not None:
        teacher = teacher_for(cfg.distill.teacher) if teacher_for else None
        if teacher is None:
            raise VitcompressError(f"no teacher available for {cfg.distill.teacher!r}")
    steps_per_epoch = len(data.train_loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    callbacks = []
    pruner = None
    if prune_step is not None:
        prune_cfg = prune_step.config
        if prune_step.auto_schedule:
            prune_cfg = _auto_cubic(prune_cfg, total)
        pruner = GradualPruner(model, prune_cfg)
        pruner.step(0)
        callbacks.append(lambda step: pruner.step(step))
    else:
        callbacks.append(lambda step: enforce_masks_(model))
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        min_lr=cfg.lr / 100,
        weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup_epochs,
        label_smoothing=cfg.label_smoothing,
        distill=cfg.distill.kind if cfg.distill else None,
        distill_alpha=cfg.distill.alpha if cfg.distill else 0.5,
        distill_tau=cfg.distill.tau if cfg.distill else 3.0,
        seed=data.seed,
        max_steps=cfg.max_steps,
    )
    metrics = train(
        model, data.train_loader, None, tcfg, teacher=teacher, device=data.device,
        after_step=callbacks,
    )  # fmt: skip
    report = None
    if pruner is not None:
        pruner.step(10**12)  # make sure the final sparsity is reached, whatever the length
        pruner.apply()
        report = pruner.report()
    metrics.pop("history", None)
    return metrics, report


def _rebuild_prune(model: nn.Module, record: dict) -> None:
    import torch

    from vitcompress.sparsity import apply_masks_

    masks = {}
    for name in record["layers"]:
        w = model.get_submodule(name).weight
        masks[name] = torch.ones_like(w, dtype=torch.bool)
    apply_masks_(model, masks)


def _rebuild_shrink(model: nn.Module, record: dict) -> None:
    from vitcompress.shrink import restore_shrink_

    restore_shrink_(model, record["structure"])


def _rebuild_lowrank(model: nn.Module, record: dict) -> None:
    from vitcompress.lowrank import restore_lowrank_

    restore_lowrank_(model, record["ranks"])


def _rebuild_quantize(model: nn.Module, record: dict) -> None:
    from vitcompress.quantize import QuantizeConfig, quantize_

    quantize_(model, QuantizeConfig(**record["config"]), calibrate=False)


STRUCTURE_REBUILDERS.update(
    {
        "shrink": _rebuild_shrink,
        "prune": _rebuild_prune,
        "lowrank": _rebuild_lowrank,
        "quantize": _rebuild_quantize,
    }
)
