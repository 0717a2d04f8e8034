"""The registry of compression steps: one :class:`Step` per technique, found by its recipe key.

Adding a technique is one new module in ``vitcompress/steps/`` that defines a :class:`Step`
subclass and an instance ``STEP``, plus its line in :data:`STEP_MODULES`. Everything that used
to switch on the step kind (parsing and ordering a recipe, checking its layer patterns,
applying it, recording and rebuilding the compressed structure, the result fields, the runtime
that executes the result) asks the registry instead.

The structure record is one schema for ``config.json`` (``"compression"``) and the packed file
alike: a list of ``{"kind": <step kind>, ...}`` entries, each written by its step's
:meth:`Step.describe` from the modules of the compressed model, and replayed in order by
:meth:`Step.rebuild` on a freshly built dense model before its weights load.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vitcompress.config import build_config
from vitcompress.errors import VitcompressError

# One line per step, in the order their structure is rebuilt: a step that changes layer shapes
# (shrink) before one that renames layers (lowrank) before those that wrap them.
STEP_MODULES: tuple[str, ...] = (
    "vitcompress.steps.shrink",
    "vitcompress.steps.lowrank",
    "vitcompress.steps.prune",
    "vitcompress.steps.finetune",
    "vitcompress.steps.smooth",
    "vitcompress.steps.quantize",
    "vitcompress.steps.noise",
)


@dataclass
class StepContext:
    """What the steps of one recipe share while they are applied.

    ``train_loader`` (fine-tuning) and ``calib_loader`` (static activation ranges, Wanda,
    activation-scored shrinking) are only touched by steps that need them. ``teacher_for`` maps
    a distillation teacher spec (``"self"`` or a run directory) to a model. ``deferred`` holds
    work a step leaves to a later one (a cubic prune happens during the next fine-tune), and
    ``reports`` what each step did, by step index.
    """

    train_loader: Any = None
    calib_loader: Any = None
    device: Any = "cpu"
    seed: int = 0
    teacher_for: Callable[[str], nn.Module | None] | None = None
    deferred: dict[str, Any] = field(default_factory=dict)
    reports: dict[int, dict] = field(default_factory=dict)


class Step:
    """What one compression technique declares. Subclasses set ``kind`` and ``config_cls`` and
    override the hooks that apply to them; the defaults do nothing.

    Attributes:
        kind: the recipe key (``quantize``, ``prune``, ...).
        config_cls: the frozen config dataclass a recipe's options build (unknown keys refused).
        must_precede: step kinds that may not come before this one (shrink changes shapes, so
            prune, lowrank and quantize must follow it).
        last: only steps of its own kind may follow it (quantize: no quantization-aware
            training; several quantize steps give different layers different formats).
        result_defaults: the result fields this step owns, with their value when no step of
            this kind ran.
    """

    kind: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    must_precede: ClassVar[tuple[str, ...]] = ()
    last: ClassVar[bool] = False
    result_defaults: ClassVar[dict[str, Any]] = {}

    # --- recipes ---------------------------------------------------------------------------
    def parse(self, options: Any, what: str) -> Any:
        """The config for a recipe's options (a mapping, or None for all defaults)."""
        return build_config(self.config_cls, options, what)

    def to_dict(self, config: Any) -> dict:
        """The config as plain data, defaults filled in (what a recipe's hash is taken of)."""
        return plain(config)

    def check_order(self, config: Any, index: int, kinds: list[str]) -> str | None:
        """A reason this step cannot stand at ``index`` among ``kinds``, or None."""
        return None

    def needs_calibration(self, config: Any) -> bool:
        return False

    def needs_training(self, config: Any) -> bool:
        return False

    def check_layers(self, shadow: nn.Module, config: Any, what: str) -> None:
        """Check the config's layer patterns on ``shadow`` (a meta-device copy of the model as
        it will be when this step runs); change ``shadow`` as the step would change the model's
        module tree, so that later steps are checked against the right names."""

    # --- applying ---------------------------------------------------------------------------
    def apply(self, model: nn.Module, config: Any, ctx: StepContext, index: int) -> dict | None:
        """Apply the step to ``model`` in place; returns a report of what it did (None when it
        left its work to a later step, which then reports for it)."""
        raise NotImplementedError

    # --- structure ---------------------------------------------------------------------------
    def describe(self, model: nn.Module) -> dict | None:
        """The part of ``model``'s structure this step made (None: nothing of it here)."""
        return None

    def rebuild(self, model: nn.Module, record: dict) -> None:
        """Give a freshly built dense model the structure :meth:`describe` recorded."""

    # --- results -----------------------------------------------------------------------------
    def result_fields(
        self, model: nn.Module, config: Any, report: dict | None, so_far: dict
    ) -> dict:
        """Result fields after the whole recipe ran (``report``: what this step reported)."""
        return {}

    def runtime(self, model: nn.Module, config: Any) -> tuple[nn.Module | None, str, Any] | None:
        """How a runtime here executes a model this step left: ``(module or None, runtime name,
        input dtype)``; None when the step does not decide it."""
        return None


def plain(config: Any) -> dict:
    """A config dataclass (or mapping) as JSON-able plain data; tuples become lists."""
    d = asdict(config) if is_dataclass(config) else dict(config)

    def clean(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(d)


@functools.cache
def all_steps() -> dict[str, Step]:
    """Every registered step by kind, in :data:`STEP_MODULES` order (imported on first use, so
    that a step module can import the registry)."""
    steps: dict[str, Step] = {}
    for path in STEP_MODULES:
        step = importlib.import_module(path).STEP
        if not isinstance(step, Step) or not step.kind:
            raise TypeError(f"{path}.STEP is not a Step with a kind")
        if step.kind in steps:
            raise TypeError(f"step kind {step.kind!r} is registered twice")
        steps[step.kind] = step
    return steps


def get_step(kind: Any, where: str = "recipe") -> Step:
    """The step registered under ``kind``; an unknown kind is a one-line error."""
    steps = all_steps()
    step = steps.get(kind) if isinstance(kind, str) else None
    if step is None:
        raise VitcompressError(f"{where}: unknown step {kind!r}; steps are {', '.join(steps)}")
    return step


def describe_structure(model: nn.Module) -> list[dict]:
    """The compressed structure of ``model``: every step's record, in rebuild order."""
    records = []
    for kind, step in all_steps().items():
        rec = step.describe(model)
        if rec:
            records.append({"kind": kind, **rec})
    return records


def rebuild_structure_(model: nn.Module, records: Iterable[dict], where: str = "model") -> None:
    """Replay structure ``records`` (:func:`describe_structure`, or a ``config.json``'s
    ``"compression"`` list) on a freshly built dense model, in their order."""
    for rec in records:
        if not isinstance(rec, dict):
            raise VitcompressError(f"{where}: a compression record is not a mapping: {rec!r}")
        get_step(rec.get("kind"), where).rebuild(model, rec)


def result_defaults() -> dict[str, Any]:
    """Every step-owned result field with its value when that step did not run."""
    out: dict[str, Any] = {}
    for step in all_steps().values():
        out.update(step.result_defaults)
    return out


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device: its module tree, no memory, no maths."""
    import copy

    with torch.device("meta"):
        return copy.deepcopy(model).to("meta")


__all__ = [
    "STEP_MODULES",
    "Step",
    "StepContext",
    "all_steps",
    "describe_structure",
    "get_step",
    "meta_copy",
    "plain",
    "rebuild_structure_",
    "result_defaults",
]
