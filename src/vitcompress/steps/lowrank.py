"""The ``lowrank`` step: truncated SVD of Linear (and Conv2d) layers, rank by ratio, energy or
parameter budget. The maths and the factorised modules live in :mod:`vitcompress.lowrank`.

``method: whitened`` is the activation-aware SVD of SVD-LLM: each layer's input second moment is
measured on calibration batches (all layers in one pass, on the dense model), and the truncation
then minimises the layer's output error on those inputs rather than the weight error. The result
has the same structure record (ranks) as plain SVD, so it packs, loads and exports alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.config import as_patterns, check_int
from vitcompress.errors import VitcompressError
from vitcompress.lowrank import (
    LOWRANK_TYPES,
    SPLITS,
    LowRankConv2d,
    LowRankLinear,
    check_unit_fraction,
    input_moment,
    matrix_shape,
    rank_for_budget,
    rank_for_energy,
    rank_for_ratio,
    saves_params,
    svd,
    whitened_svd,
)
from vitcompress.steps.calib import observe_inputs
from vitcompress.steps.registry import Step, StepContext, plain
from vitcompress.targets import Patterns, replace_module, select_modules

METHODS = ("svd", "whitened")
# Fields added after recipe hashes were first stored: left out of a recipe's resolved dict while
# they hold their defaults, so that the hash of every older recipe stays the same.
_NEW_FIELDS = {"method": "svd", "batches": 8}


@dataclass(frozen=True)
class LowRankConfig:
    """How to pick each layer's rank, and which layers.

    Exactly one of ``rank``, ``rank_ratio``, ``energy``, ``budget`` is given.

    Attributes:
        rank: the same rank for every layer (>= 1; clipped to ``min(n, p)``).
        rank_ratio: ``rank = ceil(rank_ratio * min(n, p))``, in (0, 1].
        energy: smallest rank keeping this fraction of ``sum(S^2)``, in (0, 1].
        budget: fraction of each layer's parameters (bias included) the factors may use, in
            (0, 1]; the largest rank that fits (at least 1).
        split: ``"sqrt"`` (``sqrt(S)`` in both factors, default) or ``"second"`` (all of ``S``
            in the second factor, as in study B).
        method: ``"svd"`` (the weight alone) or ``"whitened"`` (activation-aware, calibration
            data: the least output error on it; ``energy`` is then that of the whitened
            spectrum).
        batches: calibration batches a ``whitened`` factorisation reads (at most).
        targets: name patterns; the default is study B's choice, the patch projection and the
            MLP Linears of every block.
        ignore: name patterns to leave out.
    """

    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    budget: float | None = None
    split: str = "sqrt"
    targets: Patterns = ("patch_embed.proj", "blocks.*.mlp.*")
    ignore: Patterns = None
    method: str = "svd"
    batches: int = 8

    def __post_init__(self) -> None:
        for k in ("targets", "ignore"):
            object.__setattr__(self, k, as_patterns(getattr(self, k), f"lowrank.{k}"))
        given = [
            k for k in ("rank", "rank_ratio", "energy", "budget") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise VitcompressError(
                "lowrank: give exactly one of rank, rank_ratio, energy, budget"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1
        ):
            raise VitcompressError(f"lowrank.rank must be an integer >= 1, got {self.rank!r}")
        for k in ("rank_ratio", "energy", "budget"):
            if getattr(self, k) is not None:
                check_unit_fraction(getattr(self, k), f"lowrank.{k}")
        if self.split not in SPLITS:
            raise VitcompressError(f"lowrank.split must be one of {SPLITS}, got {self.split!r}")
        if self.method not in METHODS:
            raise VitcompressError(f"lowrank.method must be one of {METHODS}, got {self.method!r}")
        check_int(self.batches, "lowrank.batches", 1)

    def choose_rank(self, shape: Sequence[int], S: torch.Tensor, bias: bool = True) -> int:
        """The rank for a weight of ``shape`` with singular values ``S``."""
        n, p = matrix_shape(shape)
        if self.rank is not None:
            return min(self.rank, n, p)
        if self.rank_ratio is not None:
            return rank_for_ratio(shape, self.rank_ratio)
        if self.energy is not None:
            return rank_for_energy(S, self.energy)
        return max(1, rank_for_budget(shape, float(self.budget), bias))  # type: ignore[arg-type]


class FactorInfo(NamedTuple):
    """What :func:`factorize_` did to one layer: its rank, and the fraction of the layer's
    parameters kept (bias included), or ``"skipped"`` when factoring would not save any."""

    rank: int
    kept: float | str


def factorize_(model: nn.Module, config: LowRankConfig, calib_data: Iterable | None = None) -> None:
    """Replace each selected Linear / Conv2d by its low-rank factorisation, in place.

    Linears that are already factors of a low-rank layer (``*.first``, ``*.second``) are left
    alone, so running this twice does not factor the factors. A layer whose factors would not
    save parameters stays dense. ``method: whitened`` reads ``calib_data`` (input batches, as
    :mod:`vitcompress.steps.calib` takes them).
    """
    _factorize(model, config, calib_data)


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The unfolded patches a Conv2d multiplies its ``(out, in*kh*kw)`` weight with:
    ``(B*L, in*kh*kw)``, in the order of ``weight.reshape(out, -1)``."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise VitcompressError(
            "lowrank.method = 'whitened' handles Conv2d layers with numeric zero padding only; "
            "ignore this layer or use method: svd"
        )
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, K, L)
    return cols.transpose(1, 2)  # (B, L, in*kh*kw)


def input_moments(
    model: nn.Module, layers: Mapping[str, nn.Module], calib_data: Iterable, batches: int
) -> dict[str, torch.Tensor]:
    """Per layer, the mean input second moment ``X^T X / tokens`` (float64, (p, p)) over at
    most ``batches`` calibration batches, all layers in one pass."""
    acc: dict[str, list[Any]] = {n: [0, 0.0] for n in layers}

    def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            x = _conv_patches(module, x)
        x = x.reshape(-1, x.shape[-1])  # (tokens, p)
        acc[name][0] += x.shape[0]
        acc[name][1] = acc[name][1] + input_moment(x).cpu()

    observe_inputs(model, layers, calib_data, observe, batches)
    return {n: sq / max(count, 1) for n, (count, sq) in acc.items()}


def _factorize(
    model: nn.Module, config: LowRankConfig, calib_data: Iterable | None = None
) -> dict[str, FactorInfo]:
    """:func:`factorize_`, returning ``{layer: FactorInfo(rank, kept)}`` for every selected
    layer, skipped ones included."""
    selected = select_modules(
        model, config.targets, config.ignore, (nn.Linear, nn.Conv2d), "lowrank.targets"
    )
    inside = {
        f"{n}.{c}"
        for n, m in model.named_modules()
        if isinstance(m, LOWRANK_TYPES)
        for c in ("first", "second")
    }
    todo = [
        (n, m)
        for n, m in selected
        if n not in inside and not (isinstance(m, nn.Conv2d) and m.groups != 1)
    ]
    moments: dict[str, torch.Tensor] = {}
    if config.method == "whitened" and todo:
        if calib_data is None:
            raise VitcompressError(
                "lowrank.method = 'whitened' needs calibration data (a few input batches); "
                "or use method: svd"
            )
        moments = input_moments(model, dict(todo), calib_data, config.batches)
    report: dict[str, FactorInfo] = {}
    for name, module in selected:
        if name in inside:
            continue
        shape = module.weight.shape
        n, p = matrix_shape(shape)
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            report[name] = FactorInfo(0, "skipped")
            continue
        has_bias = module.bias is not None
        if name in moments:
            usv = whitened_svd(module.weight, moments[name])
        else:
            usv = svd(module.weight)
        rank = config.choose_rank(shape, usv[1], has_bias)
        if not saves_params(shape, rank):
            report[name] = FactorInfo(rank, "skipped")
            continue
        if isinstance(module, nn.Linear):
            new: nn.Module = LowRankLinear.like(module, rank)
        else:
            new = LowRankConv2d.like(module, rank)
        new.load_svd(usv, module.bias, config.split)
        new.train(module.training)
        replace_module(model, name, new)
        nb = n if has_bias else 0
        report[name] = FactorInfo(rank, (rank * (n + p) + nb) / (n * p + nb))
    return report


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    """``{layer: rank}`` of every low-rank module, e.g. to store next to a checkpoint."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LOWRANK_TYPES)}


def restore_lowrank_(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Give a fresh dense model the low-rank structure ``ranks`` (from :func:`lowrank_ranks`).

    The new factors are not loaded with anything meaningful: call ``load_state_dict`` next.
    """
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise VitcompressError(
                f"no layer named {name!r} to restore a low-rank layer in"
            ) from None
        if isinstance(module, nn.Linear):
            new: nn.Module = LowRankLinear.like(module, rank)
        elif isinstance(module, nn.Conv2d):
            new = LowRankConv2d.like(module, rank)
        else:
            raise VitcompressError(
                f"{name}: a low-rank layer replaces a Linear or Conv2d, found "
                f"{type(module).__name__}"
            )
        replace_module(model, name, new)


class LowRankStep(Step):
    kind = "lowrank"
    config_cls = LowRankConfig
    result_defaults = {"rank_ratio": None}

    def to_dict(self, config: LowRankConfig) -> dict:
        d = plain(config)
        return {k: v for k, v in d.items() if k not in _NEW_FIELDS or v != _NEW_FIELDS[k]}

    def needs_calibration(self, config: LowRankConfig) -> bool:
        return config.method == "whitened"

    def check_layers(self, shadow: nn.Module, config: LowRankConfig, what: str) -> None:
        chosen = select_modules(shadow, config.targets, config.ignore, (nn.Linear, nn.Conv2d), what)
        for name, mod in chosen:  # later steps see fc1.first / fc1.second
            if isinstance(mod, nn.Linear) and not name.endswith((".first", ".second")):
                replace_module(shadow, name, LowRankLinear.like(mod, 1))

    def apply(self, model: nn.Module, config: LowRankConfig, ctx: StepContext, index: int) -> dict:
        info = _factorize(model, config, ctx.calib_loader)
        return {"layers": {n: {"rank": r.rank, "kept": r.kept} for n, r in info.items()}}

    def describe(self, model: nn.Module) -> dict | None:
        ranks = lowrank_ranks(model)
        return {"ranks": ranks} if ranks else None

    def rebuild(self, model: nn.Module, record: dict) -> None:
        restore_lowrank_(model, record["ranks"])

    def result_fields(
        self, model: nn.Module, config: LowRankConfig, report: dict | None, so_far: dict
    ) -> dict:
        ratio = config.rank_ratio
        if ratio is None:  # ranks by energy or budget: the mean kept fraction of the full rank
            ranks = [
                (m.rank, min(m.first.in_features, m.second.out_features))
                for m in model.modules()
                if isinstance(m, LowRankLinear)
            ]
            ratio = sum(r / full for r, full in ranks) / len(ranks) if ranks else None
        return {"rank_ratio": ratio}


STEP = LowRankStep()

__all__ = [
    "METHODS",
    "STEP",
    "FactorInfo",
    "LowRankConfig",
    "factorize_",
    "input_moments",
    "lowrank_ranks",
    "restore_lowrank_",
]
