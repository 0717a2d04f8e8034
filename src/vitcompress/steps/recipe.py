"""Recipes: an ordered list of compression steps, validated whole before any work starts.

    name: deit-small-2of4-int8
    steps:
      - prune:    {pattern: "2:4", layers: "blocks.*"}
      - finetune: {epochs: 1, lr: 1e-4, distill: {teacher: self, kind: soft}}
      - quantize: {weights: int8, activations: int8, granularity: per_channel,
                   calibration: {method: percentile, batches: 16}}

Each step key names a registered step (:mod:`vitcompress.steps.registry`), whose config class
validates the options. ``layers`` is another name for ``targets``. Order rules come from the
steps themselves (shrink before prune, lowrank and quantize; a cubic prune before a finetune;
quantize last). :func:`compress_` applies a recipe to a model in place: the Python API and the
``compress`` command take the same path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vitcompress.config import load_yaml
from vitcompress.errors import VitcompressError
from vitcompress.runs import load_run
from vitcompress.sparsity import enforce_masks_
from vitcompress.steps.registry import (
    Step,
    StepContext,
    get_step,
    meta_copy,
    result_defaults,
)

TOP_KEYS = ("name", "steps", "description")


@dataclass(frozen=True)
class RecipeStep:
    """One step of a recipe: its kind and its validated config."""

    kind: str
    config: Any

    @property
    def impl(self) -> Step:
        return get_step(self.kind)


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[RecipeStep, ...]
    description: str = ""
    source: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "steps": [{s.kind: s.impl.to_dict(s.config)} for s in self.steps],
        }

    @property
    def hash(self) -> str:
        """A stable id: the hash of the resolved recipe (defaults filled in)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def needs_calibration(self) -> bool:
        return any(s.impl.needs_calibration(s.config) for s in self.steps)

    def needs_training(self) -> bool:
        return any(s.impl.needs_training(s.config) for s in self.steps)

    def batch_size(self, default: int = 128) -> int:
        """The training batch size its fine-tunes ask for (the largest), else ``default``."""
        sizes = [s.config.batch_size for s in self.steps if s.impl.needs_training(s.config)]
        return max(sizes, default=default)


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
        step = get_step(kind, f"step {i + 1}")
        what = f"step {i + 1} ({kind})"
        try:
            config = step.parse(options, what)
        except VitcompressError as e:
            msg = str(e)
            raise VitcompressError(msg if msg.startswith("step ") else f"{what}: {msg}") from None
        steps.append(RecipeStep(kind, config))
    _check_order(steps, source)
    name = data.get("name") or "recipe"
    return Recipe(str(name), tuple(steps), str(data.get("description", "")), dict(data))


def _check_order(steps: list[RecipeStep], source: str) -> None:
    kinds = [s.kind for s in steps]
    for i, s in enumerate(steps):
        before = [k for k in kinds[:i] if k in s.impl.must_precede]
        if before:
            raise VitcompressError(
                f"{source}: step {i + 1}: {s.kind} changes the layers' shapes, so it must come "
                f"before {before[0]} (put it first)"
            )
        if s.impl.last and i + 1 < len(steps) and kinds[i + 1] != s.kind:
            raise VitcompressError(
                f"{source}: step {i + 2} ({kinds[i + 1]}) comes after {s.kind}; {s.kind} must "
                "be the last step"
            )
        why = s.impl.check_order(s.config, i, kinds)
        if why:
            raise VitcompressError(f"{source}: step {i + 1}: {why}")


BUILTIN_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))


def load_recipe(path: str | Path) -> Recipe:
    """A recipe from a YAML file, or a built-in one by name (``int8-smallest``)."""
    p = Path(path)
    if not p.is_file() and (BUILTIN_RECIPES / f"{path}.yaml").is_file():
        p = BUILTIN_RECIPES / f"{path}.yaml"
    elif not p.is_file():
        names = ", ".join(builtin_recipes())
        raise VitcompressError(f"recipe file not found: {path} (built-in recipes: {names})")
    return parse_recipe(load_yaml(p, "recipe"), str(p))


def as_recipe(recipe: Recipe | Mapping | str | Path) -> Recipe:
    """A :class:`Recipe` from a recipe, a mapping, a YAML file or a built-in name."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def check_recipe_names(recipe: Recipe, model: nn.Module) -> None:
    """Check every step's layer patterns against the modules that will exist at that step.

    Runs on a copy on the meta device (no memory, no maths): a low-rank step renames ``fc1`` to
    ``fc1.first``/``fc1.second``, so later patterns are checked against the renamed tree.
    """
    shadow = meta_copy(model)
    for i, step in enumerate(recipe.steps):
        step.impl.check_layers(shadow, step.config, f"step {i + 1} ({step.kind})")


def apply_recipe(
    model: nn.Module,
    recipe: Recipe,
    ctx: StepContext,
    start: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """Apply ``recipe`` to ``model`` in place, step by step; returns what each step did
    (``[{"step": 1-based index, "kind": ..., **report}]``, in step order).

    ``start`` skips steps already applied (their reports in ``ctx.reports``); ``after_step(i)``
    is called once step ``i`` (0-based) is done."""
    for i, step in enumerate(recipe.steps):
        if i < start:
            continue
        report = step.impl.apply(model, step.config, ctx, i)
        if report is not None:
            ctx.reports[i] = report
        enforce_masks_(model)
        if after_step is not None:
            after_step(i)
    return [
        {"step": i + 1, "kind": recipe.steps[i].kind, **ctx.reports[i]} for i in sorted(ctx.reports)
    ]


def compress_(
    model: nn.Module,
    recipe: Recipe | Mapping | str | Path,
    *,
    calib_data: Iterable | None = None,
    train_data: Iterable | None = None,
    teacher: nn.Module | Callable[[str], nn.Module] | None = None,
    device: Any = "cpu",
    seed: int = 0,
) -> None:
    """Compress ``model`` in place with ``recipe`` (a :class:`Recipe`, a mapping, a YAML file or
    a built-in recipe name), the same path ``vitcompress compress`` takes.

    Args:
        calib_data: input batches for steps that calibrate (static quantization, Wanda,
            activation-scored shrinking): tensors, ``(inputs, labels)`` pairs, or dicts.
        train_data: ``(inputs, labels)`` batches for ``finetune`` steps (a DataLoader).
        teacher: for ``distill`` in a fine-tune: a model, or a function from the recipe's teacher
            spec (``"self"`` or a run directory) to a model. By default ``self`` distils from a
            copy of the model as it was before the recipe.
        device: where fine-tuning runs.
    """
    import copy

    recipe = as_recipe(recipe)
    check_recipe_names(recipe, model)
    if recipe.needs_calibration() and calib_data is None:
        raise VitcompressError(f"recipe {recipe.name!r} calibrates: pass calib_data")
    if recipe.needs_training() and train_data is None:
        raise VitcompressError(f"recipe {recipe.name!r} fine-tunes: pass train_data")
    dense = copy.deepcopy(model) if recipe.needs_training() and teacher is None else None

    def teacher_for(spec: str) -> nn.Module | None:
        if isinstance(teacher, nn.Module):
            return teacher
        if callable(teacher):
            return teacher(spec)
        if spec == "self":
            return dense
        return load_run(spec)[0]

    ctx = StepContext(train_data, calib_data, device, seed, teacher_for)
    apply_recipe(model, recipe, ctx)


def result_fields(model: nn.Module, recipe: Recipe, reports: list[dict]) -> dict:
    """The fields the recipe's steps report about the compressed model (format, sparsity,
    pattern, rank ratio, ...), each step's defaults where it did not run."""
    by_index = {r["step"] - 1: r for r in reports}
    out = result_defaults()
    for i, step in enumerate(recipe.steps):
        out.update(step.impl.result_fields(model, step.config, by_index.get(i), dict(out)))
    return out


def runtime_of(model: nn.Module, recipe: Recipe) -> tuple:
    """``(module or None, runtime name, input dtype)``: how a runtime here executes the model
    the recipe made (the last step that decides it, else fp32 torch)."""
    import torch

    for step in reversed(recipe.steps):
        rt = step.impl.runtime(model, step.config)
        if rt is not None:
            return rt
    return model, "torch-fp32", torch.float32


__all__ = [
    "Recipe",
    "RecipeStep",
    "apply_recipe",
    "as_recipe",
    "builtin_recipes",
    "check_recipe_names",
    "compress_",
    "load_recipe",
    "parse_recipe",
    "result_fields",
    "runtime_of",
]
