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
stays dense (:func:`saves_params`). The config, the verb ``factorize_`` and the recipe step live in
:mod:`vitcompress.steps.lowrank`.

Activation-aware ("whitened") SVD, as in SVD-LLM (Wang et al. 2024): plain SVD minimises
``||W - W'||``, which treats every input direction alike, while a layer's inputs are far from
isotropic (a few channels carry most of the energy in a ViT). What matters is the output error on
real inputs, ``||X W^T - X W'^T||_F = ||(W - W') S||_F`` with ``S S^T = X^T X`` (Cholesky). So
:func:`whitened_svd` truncates the SVD of ``W S`` and un-whitens the right factor,
``W' = U_r S_r (V_r^T S^-1)``: the best rank-``r`` layer for the calibration tokens. Its result
has the same shape as :func:`svd`'s (``Vh`` no longer has orthonormal rows), so ranks, splits and
factor modules are shared, and a whitened layer is stored and exported like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vitcompress.errors import VitcompressError

SPLITS = ("sqrt", "second")
# The smallest eigenvalue a whitened SVD lets the input moment have, relative to its mean
# diagonal: small enough not to change a well-conditioned layer, large enough that S^-1 stays
# bounded on a dead input channel.
WHITEN_DAMP = 1e-6

# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """``(n, p)`` of a weight seen as a matrix: out by everything else."""
    if len(shape) < 2:
        raise VitcompressError(f"low rank needs a weight of 2 or more dims, got {tuple(shape)}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``W`` (reshaped to ``(out, -1)``) in float64: ``U (n, k), S (k,), Vh (k, p)``."""
    W2 = W.detach().reshape(W.shape[0], -1).to(torch.float64)  # (n, p)
    return torch.linalg.svd(W2, full_matrices=False)


def input_moment(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 of a batch of layer inputs ``x`` (..., p): the second moment
    :func:`whitened_svd` needs (summed over batches by the caller).

    The product runs in fp32 (the batch's own precision, and far faster on a CPU); the running
    sum over batches is float64, so that many batches do not lose small terms.
    """
    x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, p)
    return (x2.T @ x2).double()  # (p, p)


def whitening(C: torch.Tensor, damp: float = WHITEN_DAMP) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S S^T = C + lam I`` for a symmetric PSD ``C`` (p, p).

    ``lam = 0`` when ``C`` is well conditioned; when its smallest eigenvalue is below
    ``damp * mean(diag(C))`` (a dead input channel, fewer tokens than channels, rounding), ``lam``
    lifts it there, as SVD-LLM shifts a matrix that is not positive definite: ``S^-1`` then stays
    bounded. A zero ``C`` (the layer never saw a non-zero input) gives the identity, i.e. plain SVD.
    """
    C = C.detach().to(torch.float64)
    C = (C + C.T) / 2  # (p, p); summed products are symmetric only up to rounding
    p = C.shape[0]
    eye = torch.eye(p, dtype=torch.float64, device=C.device)
    mean = float(C.diagonal().mean()) if p else 0.0
    if not mean > 0 or not bool(torch.isfinite(C).all()):
        return eye
    floor = damp * mean
    low = float(torch.linalg.eigvalsh(C)[0])
    if low < floor:
        C = C + (floor - low) * eye
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:  # rounding at the floor itself: lift once more
        L = torch.linalg.cholesky(C + floor * eye)
    return L


def whitened_svd(
    W: torch.Tensor, C: torch.Tensor, damp: float = WHITEN_DAMP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (n, k), S (k,), Vh (k, p)`` with ``W = U diag(S) Vh`` and every truncation
    ``U_r diag(S_r) Vh_r`` the rank-``r`` matrix of least output error ``||(W - W') X^T||_F``
    for inputs whose second moment is ``C = X^T X`` (module docstring). In float64.

    ``S`` is the spectrum of the whitened weight ``W L`` (``L = whitening(C)``), ``U`` its left
    singular vectors, ``Vh = V^T L^-1`` (rows not orthonormal). With ``C`` a multiple of the
    identity every truncation is :func:`svd`'s. Pass the *mean* moment (``X^T X`` over the
    token count) so that ``S`` keeps the scale of the weight and a ``sqrt`` split stays balanced.
    """
    W2 = W.detach().reshape(W.shape[0], -1).to(torch.float64)  # (n, p)
    if C.shape != (W2.shape[1], W2.shape[1]):
        raise VitcompressError(
            f"whitened SVD: input moment of shape {tuple(C.shape)} for a weight with "
            f"{W2.shape[1]} inputs"
        )
    L = whitening(C.to(W2.device), damp)  # (p, p), lower
    U, S, Vh = torch.linalg.svd(W2 @ L, full_matrices=False)  # (n, k), (k,), (k, p)
    Vh = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)  # Vh L^-1, (k, p)
    return U, S, Vh


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


def check_unit_fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise VitcompressError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


def rank_for_ratio(shape: Sequence[int], ratio: float) -> int:
    """``ceil(ratio * min(n, p))``, ``ratio`` in (0, 1]."""
    ratio = check_unit_fraction(ratio, "rank_ratio")
    n, p = matrix_shape(shape)
    # round() first so that 0.1 * 30 = 3.0000000000000004 gives 3, not 4
    return max(1, math.ceil(round(ratio * min(n, p), 9)))


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(S[:r]^2) / sum(S^2) >= energy``, ``energy`` in (0, 1].

    ``S`` are singular values in descending order. A zero matrix gives rank 1.
    """
    energy = check_unit_fraction(energy, "energy")
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
    n, p = matrix_shape(shape)
    nb = n if bias else 0
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise VitcompressError(f"budget must be a number, got {budget!r}")
    if isinstance(budget, float):
        params = check_unit_fraction(budget, "budget") * (n * p + nb)
    else:
        if budget < 1:
            raise VitcompressError(f"budget as a parameter count must be >= 1, got {budget}")
        params = float(budget)
    r = math.floor(round((params - nb) / (n + p), 9))
    return max(0, min(r, min(n, p)))


def saves_params(shape: Sequence[int], rank: int) -> bool:
    """True when rank ``rank`` factors have fewer weights than the dense ``(n, p)`` matrix."""
    n, p = matrix_shape(shape)
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
    def like(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Unloaded factors of rank ``rank`` in ``linear``'s place (shapes, bias, device, dtype)."""
        w = linear.weight
        bias = linear.bias is not None
        return cls(linear.in_features, linear.out_features, rank, bias, w.device, w.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, split: str = "sqrt") -> LowRankLinear:
        """The rank-``rank`` SVD approximation of ``linear`` (bias copied)."""
        new = cls.like(linear, rank)
        new.load_svd(svd(linear.weight), linear.bias, split)
        return new

    def load_svd(self, usv: tuple, bias: torch.Tensor | None, split: str) -> None:
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
        new.load_svd(svd(conv.weight), conv.bias, split)
        return new

    def load_svd(self, usv: tuple, bias: torch.Tensor | None, split: str) -> None:
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

__all__ = [
    "LOWRANK_TYPES",
    "LowRankConv2d",
    "LowRankLinear",
    "factors_from_svd",
    "input_moment",
    "rank_for_budget",
    "rank_for_energy",
    "rank_for_ratio",
    "saves_params",
    "svd",
    "svd_factors",
    "whitened_svd",
    "whitening",
]
