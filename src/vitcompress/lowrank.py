"""Low-rank SVD factorisation of Linear (and Conv2d) layers, with rank chosen by ratio, energy
or parameter budget.

For ``y = x W^T + b`` with ``W`` of shape ``(n, p)`` (out, in), keep the ``r`` largest singular
values, ``W ~ U_r S_r V_r^T``, and run ``y = second(first(x))`` where ``first`` is a bias-free
``Linear(p, r)`` and ``second`` a ``Linear(r, n)`` carrying the original bias. By default the
singular values are split as ``sqrt(S_r)`` into both factors (``first.weight = sqrt(S_r) V_r^T``,
``second.weight = U_r sqrt(S_r)``): the product is the same as the study's ``V_r^T`` /
``U_r S_r`` split (``split="second"``), but both factors then have the same dynamic range, which
is what a later per-channel int8 quantization of both wants. The SVD runs in float64; factors are
stored back in the layer's dtype.

A Conv2d (groups=1) is a Linear over its unfolded patches, ``W`` reshaped to
``(out, in*kh*kw)``; it becomes ``Conv2d(in, r, kernel, stride, padding, bias=False)`` followed by
a 1x1 ``Conv2d(r, out)`` with the bias. This covers the ViT patch projection
(``patch_embed.proj``), which study B factorises.

A factorisation that does not save parameters (``r * (n + p) >= n * p``) is skipped: the layer
stays dense and :func:`factorize_` reports it as ``"skipped"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.targets import Patterns, check_patterns, replace_module, select_modules

SPLITS = ("sqrt", "second")

# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """``(n, p)`` of a weight seen as a matrix: out by everything else."""
    if len(shape) < 2:
        raise VitcompressError(f"low rank needs a weight of 2 or more dims, got {tuple(shape)}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``W`` (reshaped to ``(out, -1)``) in float64: ``U (n, k), S (k,), Vh (k, p)``."""
    W2 = W.detach().reshape(W.shape[0], -1).to(torch.float64)  # (n, p)
    return torch.linalg.svd(W2, full_matrices=False)


def factors_from_svd(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, split: str = "sqrt"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation; see :func:`svd_factors`."""
    if split not in SPLITS:
        raise VitcompressError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= rank <= S.numel():
        raise VitcompressError(f"rank must be in [1, {S.numel()}], got {rank}")
    if split == "sqrt":
        s = S[:rank].sqrt()  # (r,)
        return s[:, None] * Vh[:rank], U[:, :rank] * s  # (r, p), (n, r)
    return Vh[:rank], U[:, :rank] * S[:rank]


def svd_factors(
    W: torch.Tensor, rank: int, split: str = "sqrt"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``A (r, p)`` and ``B (n, r)`` with ``W ~ B @ A`` (Eckart-Young optimal).

    ``A`` is the weight of the first (bias-free) Linear, ``B`` that of the second.
    ``split="sqrt"`` puts ``sqrt(S_r)`` in each factor; ``split="second"`` puts ``S_r`` in ``B``
    as study B does (``A = V_r^T``). Computed in float64, returned in ``W``'s dtype; a conv
    weight is taken as ``(out, in*kh*kw)``.
    """
    U, S, Vh = svd(W)
    A, B = factors_from_svd(U, S, Vh, rank, split)
    return A.to(W.dtype), B.to(W.dtype)


def _check_fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise VitcompressError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


def rank_for_ratio(shape: Sequence[int], ratio: float) -> int:
    """``ceil(ratio * min(n, p))``, ``ratio`` in (0, 1]."""
    ratio = _check_fraction(ratio, "rank_ratio")
    n, p = _matrix_shape(shape)
    # round() first so that 0.1 * 30 = 3.0000000000000004 gives 3, not 4
    return max(1, math.ceil(round(ratio * min(n, p), 9)))


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(S[:r]^2) / sum(S^2) >= energy``, ``energy`` in (0, 1].

    ``S`` are singular values in descending order. A zero matrix gives rank 1.
    """
    energy = _check_fraction(energy, "energy")
    sq = S.detach().to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    frac = torch.cumsum(sq, 0) / total
    # the tolerance absorbs rounding of the cumulative sum, so energy=1.0 reaches full rank
    r = int(torch.searchsorted(frac, torch.tensor(energy - 1e-12, dtype=frac.dtype))) + 1
    return min(r, S.numel())


def rank_for_budget(shape: Sequence[int], budget: float | int, bias: bool = True) -> int:
    """Largest ``r`` whose factorised layer has at most ``budget`` parameters.

    The factorised layer has ``r * (n + p)`` weights (plus ``n`` bias). ``budget`` is either an
    int (parameters) or a float in (0, 1] (fraction of the dense layer's parameters, bias
    included). Returns 0 when even rank 1 does not fit.
    """
    n, p = _matrix_shape(shape)
    nb = n if bias else 0
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise VitcompressError(f"budget must be a number, got {budget!r}")
    if isinstance(budget, float):
        params = _check_fraction(budget, "budget") * (n * p + nb)
    else:
        if budget < 1:
            raise VitcompressError(f"budget as a parameter count must be >= 1, got {budget}")
        params = float(budget)
    r = math.floor(round((params - nb) / (n + p), 9))
    return max(0, min(r, min(n, p)))


def saves_params(shape: Sequence[int], rank: int) -> bool:
    """True when rank ``rank`` factors have fewer weights than the dense ``(n, p)`` matrix."""
    n, p = _matrix_shape(shape)
    return rank * (n + p) < n * p


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """``second(first(x))``: a rank-``rank`` stand-in for ``nn.Linear(in_features, out_features)``.

    ``first`` (``Linear(in, rank, bias=False)``) and ``second`` (``Linear(rank, out)``) are plain
    Linears, so name patterns (``blocks.0.mlp.fc1.first``), quantizers and pruning see them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, split: str = "sqrt") -> LowRankLinear:
        """The rank-``rank`` SVD approximation of ``linear`` (bias copied)."""
        w = linear.weight
        new = cls(
            linear.in_features,
            linear.out_features,
            rank,
            linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        new._load(svd(w), linear.bias, split)
        return new

    def _load(self, usv: tuple, bias: torch.Tensor | None, split: str) -> None:
        A, B = factors_from_svd(*usv, self.rank, split)
        with torch.no_grad():
            self.first.weight.copy_(A)
            self.second.weight.copy_(B)
            if bias is not None:
                self.second.bias.copy_(bias)

    def dense_weight(self) -> torch.Tensor:
        """``second.weight @ first.weight``: the ``(out, in)`` matrix this layer applies."""
        return self.second.weight @ self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))  # (..., in) -> (..., rank) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """``second(first(x))``: ``first`` a bias-free ``Conv2d(in, rank)`` with the original kernel,
    stride, padding and dilation, ``second`` a 1x1 ``Conv2d(rank, out)`` with the bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.first = nn.Conv2d(
            in_channels,
            rank,
            kernel_size,
            stride,
            padding,
            dilation,
            bias=False,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> LowRankConv2d:
        """An (unloaded) rank-``rank`` module with ``conv``'s geometry, device and dtype."""
        if conv.groups != 1:
            raise VitcompressError("low rank needs a Conv2d with groups=1")
        w = conv.weight
        return cls(
            conv.in_channels,
            conv.out_channels,
            rank,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, split: str = "sqrt") -> LowRankConv2d:
        """The rank-``rank`` SVD approximation of ``conv`` (bias copied)."""
        new = cls.like(conv, rank)
        new._load(svd(conv.weight), conv.bias, split)
        return new

    def _load(self, usv: tuple, bias: torch.Tensor | None, split: str) -> None:
        A, B = factors_from_svd(*usv, self.rank, split)
        with torch.no_grad():
            self.first.weight.copy_(A.reshape(self.first.weight.shape))  # (r, in, kh, kw)
            self.second.weight.copy_(B.reshape(self.second.weight.shape))  # (out, r, 1, 1)
            if bias is not None:
                self.second.bias.copy_(bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` kernel this layer applies."""
        A = self.first.weight.reshape(self.rank, -1)  # (r, in*kh*kw)
        B = self.second.weight.reshape(self.out_channels, self.rank)  # (out, r)
        return (B @ A).reshape(self.out_channels, *self.first.weight.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))  # (B, in, H, W) -> (B, r, H', W') -> (B, out, H', W')

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"


LOWRANK_TYPES = (LowRankLinear, LowRankConv2d)

# --------------------------------------------------------------------------------------------
# Config and walker
# --------------------------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        for k in ("targets", "ignore"):
            v = getattr(self, k)
            object.__setattr__(self, k, tuple(v) if isinstance(v, (list, tuple)) else v)
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
                _check_fraction(getattr(self, k), f"lowrank.{k}")
        if self.split not in SPLITS:
            raise VitcompressError(f"lowrank.split must be one of {SPLITS}, got {self.split!r}")
        check_patterns(self.targets, "lowrank.targets")
        check_patterns(self.ignore, "lowrank.ignore")

    def choose_rank(self, shape: Sequence[int], S: torch.Tensor, bias: bool = True) -> int:
        """The rank for a weight of ``shape`` with singular values ``S``."""
        n, p = _matrix_shape(shape)
        if self.rank is not None:
            return min(self.rank, n, p)
        if self.rank_ratio is not None:
            return rank_for_ratio(shape, self.rank_ratio)
        if self.energy is not None:
            return rank_for_energy(S, self.energy)
        return max(1, rank_for_budget(shape, float(self.budget), bias))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Mapping) -> LowRankConfig:
        """Build from a recipe mapping; unknown keys are an error."""
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise VitcompressError(
                f"lowrank: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                f"{', '.join(valid)}"
            )
        return cls(**d)


class FactorInfo(NamedTuple):
    """What :func:`factorize_` did to one layer: its rank, and the fraction of the layer's
    parameters kept (bias included), or ``"skipped"`` when factoring would not save any."""

    rank: int
    kept: float | str


def factorize_(model: nn.Module, config: LowRankConfig) -> dict[str, FactorInfo]:
    """Replace each selected Linear / Conv2d by its low-rank factorisation, in place.

    Returns ``{layer: FactorInfo(rank, kept)}`` for every selected layer, skipped ones included.
    Linears that are already factors of a low-rank layer (``*.first``, ``*.second``) are left
    alone, so running this twice does not factor the factors.
    """
    selected = select_modules(
        model, config.targets, config.ignore, (nn.Linear, nn.Conv2d), "lowrank.targets"
    )
    inside = {
        f"{n}.{c}"
        for n, m in model.named_modules()
        if isinstance(m, LOWRANK_TYPES)
        for c in ("first", "second")
    }
    report: dict[str, FactorInfo] = {}
    for name, module in selected:
        if name in inside:
            continue
        shape = module.weight.shape
        n, p = _matrix_shape(shape)
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            report[name] = FactorInfo(0, "skipped")
            continue
        has_bias = module.bias is not None
        usv = svd(module.weight)
        rank = config.choose_rank(shape, usv[1], has_bias)
        if not saves_params(shape, rank):
            report[name] = FactorInfo(rank, "skipped")
            continue
        w = module.weight
        if isinstance(module, nn.Linear):
            new: nn.Module = LowRankLinear(p, n, rank, has_bias, device=w.device, dtype=w.dtype)
        else:
            new = LowRankConv2d.like(module, rank)
        new._load(usv, module.bias, config.split)
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
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None:
            new: nn.Module = LowRankLinear(
                module.in_features,
                module.out_features,
                rank,
                module.bias is not None,
                device=w.device,
                dtype=w.dtype,
            )
        elif isinstance(module, nn.Conv2d):
            new = LowRankConv2d.like(module, rank)
        else:
            raise VitcompressError(
                f"{name}: a low-rank layer replaces a Linear or Conv2d, found "
                f"{type(module).__name__}"
            )
        replace_module(model, name, new)


__all__ = [
    "FactorInfo",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "factorize_",
    "factors_from_svd",
    "lowrank_ranks",
    "rank_for_budget",
    "rank_for_energy",
    "rank_for_ratio",
    "restore_lowrank_",
    "saves_params",
    "svd",
    "svd_factors",
]
