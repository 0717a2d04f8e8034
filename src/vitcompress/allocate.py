"""Per-layer settings under a budget: measure what each choice costs each layer, then choose.

1. **Sensitivity**, measured once: for every selected layer and every candidate setting
   (a weight format, a sparsity, a rank ratio, or a combination), compress that layer *alone* on
   a copy of the model and measure the damage on calibration images: the KL divergence of the
   compressed model's predictions from the dense model's (no labels needed), averaged per image.
2. **Cost** of every (layer, candidate): the bytes the layer takes packed (exactly as
   ``bytes_stored`` counts them: the layer compressed alone, packed, minus the dense remainder)
   or its BOPs (:mod:`vitcompress.cost`).
3. **Choice**: the assignment with the least summed sensitivity whose summed cost fits the
   budget, a multiple-choice knapsack solved exactly by dynamic programming over the cost
   (discretised into ``resolution`` steps of the budget). Summing per-layer damages is the
   usual first-order assumption (HAWQ, ZeroQ's Pareto frontier); the result is checked by
   compressing the whole model with the chosen recipe.

The assignment is written as an ordinary recipe (``prune`` / ``lowrank`` / ``quantize`` steps,
one per group of layers with the same setting) that ``vitcompress compress`` runs and a user can
read, edit and re-run.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitcompress.config import check_choice
from vitcompress.cost import model_cost
from vitcompress.errors import VitcompressError
from vitcompress.pack import bytes_stored, module_bytes
from vitcompress.quantize import round_rest_
from vitcompress.steps.calib import forward_batch, model_device
from vitcompress.steps.recipe import apply_recipe, parse_recipe
from vitcompress.steps.registry import StepContext
from vitcompress.targets import select_modules

METRICS = ("bytes", "bops")

# name -> the recipe steps that apply it to the layers {layers}. Weight formats are weight-only
# for a bytes budget and W/A8 for a BOPs budget (activations matter there).
CANDIDATES: dict[str, list[dict]] = {
    "fp32": [],
    "int8": [{"quantize": {"weights": "int8", "activations": None}}],
    "int6": [{"quantize": {"weights": "int6", "activations": None}}],
    "int4": [{"quantize": {"weights": "int4", "activations": None, "granularity": "per_group",
                           "group_size": 32}}],
    "int3": [{"quantize": {"weights": "int3", "activations": None, "granularity": "per_group",
                           "group_size": 32}}],
    "2:4+int8": [{"prune": {"pattern": "2:4"}},
                 {"quantize": {"weights": "int8", "activations": None}}],
    "50%+int8": [{"prune": {"sparsity": 0.5}},
                 {"quantize": {"weights": "int8", "activations": None}}],
    "75%+int8": [{"prune": {"sparsity": 0.75}},
                 {"quantize": {"weights": "int8", "activations": None}}],
    # about 2 bits a weight, for budgets past 8x: a layer that tolerates them frees bytes for
    # the sensitive ones
    "int2": [{"quantize": {"weights": "int2", "activations": None, "granularity": "per_group",
                           "group_size": 32}}],
    "75%+int4": [{"prune": {"sparsity": 0.75}},
                 {"quantize": {"weights": "int4", "activations": None, "granularity": "per_group",
                               "group_size": 32}}],
}  # fmt: skip
BOPS_CANDIDATES: dict[str, list[dict]] = {
    "fp32": [],
    "w8a8": [{"quantize": {"weights": "int8", "activations": "int8"}}],
    "w6a8": [{"quantize": {"weights": "int6", "activations": "int8"}}],
    "w4a8": [{"quantize": {"weights": "int4", "activations": "int8"}}],
    "w8a6": [{"quantize": {"weights": "int8", "activations": "int6"}}],
    "w6a6": [{"quantize": {"weights": "int6", "activations": "int6"}}],
    "w4a6": [{"quantize": {"weights": "int4", "activations": "int6"}}],
}  # fmt: skip


@dataclass(frozen=True)
class Choice:
    layer: str
    candidate: str
    damage: float  # mean KL (nats per image) with only this layer compressed this way
    cost: float  # bytes or BOPs of the layer compressed this way


@dataclass(frozen=True)
class Allocation:
    metric: str
    budget: float
    dense_cost: float  # the whole model's cost, dense
    base_cost: float  # every layer as it is, the other parameters in ``rest``
    assignment: dict[str, str]  # layer -> candidate
    rest: str
    predicted_damage: float  # summed per-layer damages
    predicted_cost: float  # measured on the model compressed by the chosen recipe
    table: list[Choice]


def parse_budget(text: str | float, metric: str, dense: float) -> float:
    """A budget: a number of bytes / BOPs, ``"150KB"``, ``"1.5MB"``, ``"2.5G"`` (BOPs), or a
    reduction ``"8x"`` (the dense model's cost / 8)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m:
            raise VitcompressError(f"budget {text!r}: give e.g. 8x, 150KB or 2.5G")
        num, unit = float(m.group(1)), m.group(2).lower()
        scale = {"": 1, "x": None, "k": 1e3, "kb": 1024, "m": 1e6, "mb": 1024**2, "g": 1e9,
                 "gb": 1024**3, "gbops": 1e9, "mbops": 1e6, "t": 1e12}  # fmt: skip
        if unit not in scale:
            raise VitcompressError(f"budget {text!r}: unknown unit {unit!r}")
        value = dense / num if unit == "x" else num * scale[unit]
    if not value > 0 or not math.isfinite(value):
        raise VitcompressError(f"budget {text!r} must be positive")
    return value


def _layer_recipe(candidate: list[dict], layers: list[str], name: str = "probe") -> dict:
    steps = []
    for step in candidate:
        ((kind, opts),) = step.items()
        steps.append({kind: {**opts, "layers": list(layers)}})
    return {"name": name, "steps": steps}


def _kl(model: nn.Module, batches: list, ref: list[torch.Tensor]) -> float:
    device = model_device(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for b, p_ref in zip(batches, ref, strict=True):
            out = _logits(model, b, device)
            total += float(F.kl_div(out.log_softmax(-1), p_ref, reduction="sum", log_target=True))
            n += out.shape[0]
    return total / n


def _logits(model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        forward_batch(model, batch, device)
    finally:
        handle.remove()
    out = captured[-1]
    return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out


def _cost(model: nn.Module, metric: str, config: dict, shape: tuple[int, ...]) -> float:
    if metric == "bytes":
        return float(bytes_stored(model, config))
    return float(model_cost(model, shape, config)["bops"])


def sensitivity(
    model: nn.Module,
    calib: Iterable,
    config: dict,
    input_shape: tuple[int, ...],
    metric: str = "bytes",
    candidates: dict[str, list[dict]] | None = None,
    layers: str | list[str] = "*",
    batches: int = 4,
    rest: str = "int8",
) -> tuple[list[Choice], float, float]:
    """Every (layer, candidate)'s damage and cost change; the dense fp32 model's cost, and the
    cost of the base every candidate starts from (the model with its other parameters in
    ``rest``: biases, norms, embeddings, the patch projection; see ``quantize``'s ``rest``)."""
    check_choice(metric, METRICS, "metric")
    cands = candidates or (CANDIDATES if metric == "bytes" else BOPS_CANDIDATES)
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in select_modules(model, layers, None, (nn.Linear,), "allocate.layers")]
    data = [b for _, b in zip(range(batches), calib, strict=False)]
    if not data:
        raise VitcompressError("allocate: the calibration data is empty")
    device = model_device(model)
    with torch.no_grad():
        ref = [_logits(model, b, device).log_softmax(-1) for b in data]
    dense_cost = _cost(model, metric, config, input_shape)
    base = copy.deepcopy(model)
    round_rest_(base, rest)  # every parameter no candidate touches, as the recipe leaves it
    base_cost = _cost(base, metric, config, input_shape)
    table = []
    for name in tqdm(names, desc="sensitivity", leave=False, disable=None):
        before = module_bytes(base.get_submodule(name)) if metric == "bytes" else 0
        for cand, steps in cands.items():
            probe = copy.deepcopy(base)
            probe.get_submodule(name).load_state_dict(model.get_submodule(name).state_dict())
            try:
                if steps:
                    apply_recipe(probe, parse_recipe(_layer_recipe(steps, [name])),
                                 StepContext(calib_loader=data))  # fmt: skip
            except VitcompressError:
                continue  # a setting this layer cannot take (2:4 of an odd width, ...)
            layer = probe.get_submodule(name)
            round_rest_(layer, rest)  # as the recipe's last quantize step does
            if metric == "bytes":  # tensors pack one by one: the layer's own bytes suffice
                cost = float(module_bytes(layer) - before)
            else:
                cost = _cost(probe, metric, config, input_shape) - base_cost
            table.append(Choice(name, cand, _kl(probe, data, ref), cost))
    return table, dense_cost, base_cost


def choose(table: list[Choice], budget_delta: float, resolution: int = 2000) -> dict[str, str]:
    """The assignment minimising the summed damage with summed cost change <= budget_delta
    (a multiple-choice knapsack; cost changes are negative savings). Exact up to the
    discretisation of costs into ``resolution`` steps."""
    layers: dict[str, list[Choice]] = {}
    for c in table:
        layers.setdefault(c.layer, []).append(c)
    # costs as savings >= 0 relative to the most expensive choice of each layer
    worst = {n: max(c.cost for c in cs) for n, cs in layers.items()}
    need = sum(worst.values()) - budget_delta  # savings needed
    if need <= 0:
        return {n: min(cs, key=lambda c: c.damage).candidate for n, cs in layers.items()}
    max_saving = sum(worst[n] - min(c.cost for c in cs) for n, cs in layers.items())
    if max_saving < need:
        raise VitcompressError(
            f"the budget cannot be met: the candidates save at most {max_saving:,.0f} of the "
            f"{need:,.0f} needed"
        )
    unit = need / resolution
    cap = resolution  # savings counted in units, capped at what is needed
    inf = math.inf
    best = [0.0] + [inf] * cap  # best[s] = least damage with savings >= s units (capped)
    picks: list[list[int | None]] = []
    for n, cs in layers.items():
        nxt = [inf] * (cap + 1)
        pick: list[int | None] = [None] * (cap + 1)
        for s in range(cap + 1):
            if best[s] == inf:
                continue
            for j, c in enumerate(cs):
                gain = int((worst[n] - c.cost) / unit)  # floor: never overstates a saving
                t = min(cap, s + gain)
                d = best[s] + c.damage
                if d < nxt[t]:
                    nxt[t], pick[t] = d, j * (cap + 1) + s
        picks.append(pick)
        best = nxt
    if best[cap] == inf:
        raise VitcompressError("the budget cannot be met with these candidates")
    assignment, t = {}, cap
    for (n, cs), pick in zip(reversed(list(layers.items())), reversed(picks), strict=True):
        j, s = divmod(pick[t], cap + 1)
        assignment[n] = cs[j].candidate
        t = s
    return assignment


def allocate(
    model: nn.Module,
    calib: Iterable,
    config: dict,
    input_shape: tuple[int, ...],
    budget: str | float,
    metric: str = "bytes",
    candidates: dict[str, list[dict]] | None = None,
    layers: str | list[str] = "*",
    batches: int = 4,
    rest: str = "int8",
    measured: tuple[list[Choice], float, float] | None = None,
    name: str = "alloc",
    config_for: Callable[[dict], dict] | None = None,
) -> Allocation:
    """Measure, then choose per-layer settings that fit ``budget`` (module docstring).

    ``measured``: what :func:`sensitivity` returned for the same arguments, to choose for
    several budgets without measuring again. A bytes budget is checked on the whole packed
    file, whose header holds the run's config: ``config_for(recipe)`` gives the config the
    compressed run will store for the recipe named ``name`` (default: ``config`` as it is)."""
    if measured is None:
        measured = sensitivity(model, calib, config, input_shape, metric, candidates, layers,
                               batches, rest)  # fmt: skip
    table, dense, base = measured
    target = parse_budget(budget, metric, dense)
    cands = candidates or (CANDIDATES if metric == "bytes" else BOPS_CANDIDATES)
    by = {(c.layer, c.candidate): c for c in table}
    data = [b for _, b in zip(range(batches), calib, strict=False)]
    margin = 0.0
    for _ in range(4):  # the file header grows a little with every compressed layer: check
        assignment = choose(table, target - base - margin)
        chosen = [by[(n, k)] for n, k in assignment.items()]
        alloc = Allocation(metric, target, dense, base, assignment, rest,
                           sum(c.damage for c in chosen), 0.0, table)  # fmt: skip
        recipe = allocation_recipe(alloc, name, cands)
        probe = copy.deepcopy(model)
        apply_recipe(probe, parse_recipe(recipe), StepContext(calib_loader=data))
        real = _cost(probe, metric, config_for(recipe) if config_for else config, input_shape)
        if real <= target:
            return replace(alloc, predicted_cost=real)
        margin += real - target
    raise VitcompressError(f"the budget {target:,.0f} cannot be met (best found: {real:,.0f})")


def allocation_recipe(
    alloc: Allocation, name: str, candidates: dict[str, list[dict]] | None = None
) -> dict:
    """The assignment as a recipe: each setting's steps on the layers that chose it (steps of
    the same kind and options merged), prunes before quantisation, and the last quantize step
    rounding everything left to the allocation's ``rest``, as the sensitivity was measured."""
    cands = candidates or (CANDIDATES if alloc.metric == "bytes" else BOPS_CANDIDATES)
    merged: dict[str, dict] = {}  # one step per (kind, options), its layers gathered
    for layer, cand in sorted(alloc.assignment.items()):
        for step in cands[cand]:
            ((kind, opts),) = step.items()
            key = repr((kind, sorted(opts.items())))
            merged.setdefault(key, {"kind": kind, "opts": opts, "layers": []})["layers"].append(
                layer
            )
    order = {"shrink": 0, "lowrank": 1, "prune": 2, "quantize": 3}
    steps = [{m["kind"]: {**m["opts"], "layers": m["layers"]}} for m in merged.values()]
    steps.sort(key=lambda s: order.get(next(iter(s)), 9))
    if alloc.rest != "fp32":  # the last quantize step rounds what no step quantised
        if not steps or "quantize" not in steps[-1]:
            steps.append({"quantize": {"weights": "fp32", "activations": None,
                                       "layers": sorted(alloc.assignment)[:1]}})  # fmt: skip
        steps[-1]["quantize"]["rest"] = alloc.rest
    if not steps:
        raise VitcompressError("allocate: every layer stays as it is; no recipe to write")
    desc = (
        f"Chosen by vitcompress allocate: {alloc.metric} budget {alloc.budget:,.0f} "
        f"(dense fp32 {alloc.dense_cost:,.0f}), summed damage {alloc.predicted_damage:.4f} "
        "nats/image. Per layer: " + ", ".join(f"{n}={c}" for n, c in alloc.assignment.items())
    )
    return {"name": name, "description": desc, "steps": steps}


__all__ = [
    "BOPS_CANDIDATES",
    "CANDIDATES",
    "Allocation",
    "Choice",
    "allocate",
    "allocation_recipe",
    "choose",
    "parse_budget",
    "sensitivity",
]
