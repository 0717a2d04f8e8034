"""Optimal Brain Surgeon machinery shared by GPTQ and SparseGPT: pure tensor functions.

A Linear layer ``y = x W^T`` compressed to ``Q`` loses ``||X W^T - X Q^T||^2`` on its
calibration inputs ``X`` (tokens x inputs). Row by row this is the quadratic form
``(w - q)^T H (w - q) / 2`` of the Hessian ``H = 2 X^T X / n``, the same ``in x in`` matrix for
every output row. Optimal Brain Surgeon compresses one input column at a time and moves the
error it makes onto the columns not yet compressed: with ``U`` the upper Cholesky factor of
``H^-1``, column ``j``'s error ``(w_j - q_j) / U_jj`` times row ``U_j,j:`` is the optimal update
of the columns that follow (Frantar et al., GPTQ, 2022, sec. 3-4). Both algorithms therefore
need only :func:`inverse_hessian_cholesky`.

Choices that are not obvious:

- Dead inputs (``H_jj = 0``: the input was zero on every calibration token) get ``H_jj = 1``,
  as in the reference implementations, so that ``H`` can be inverted. Their rows and columns of
  ``H`` are otherwise zero, so their weights are compressed on their own (round to nearest, or
  pruned by magnitude) and pass no error to the other columns. Unlike the reference we do not
  zero their weights: an input the calibration data never showed is no evidence that the input
  is useless.
- Dampening adds ``damp * mean(diag H)`` to the diagonal (``damp`` = 0.01 in both papers): it
  keeps the inverse finite when inputs are collinear (few calibration tokens, LayerNorm outputs
  that sum to a constant) and limits how far one column's error is pushed onto the others.
- Everything is float64: the Cholesky factors of an ill-conditioned ``H`` lose digits in fp32,
  and on a CPU the cost is small next to the forward passes that collect ``H``.
"""

from __future__ import annotations

import torch

from vitcompress.errors import VitcompressError


def check_hessian(h: torch.Tensor, columns: int) -> None:
    """A square ``columns x columns`` matrix of finite numbers, or a one-line error."""
    if h.ndim != 2 or h.shape != (columns, columns):
        raise VitcompressError(
            f"the Hessian is {tuple(h.shape)}, the weight has {columns} inputs: expected "
            f"({columns}, {columns})"
        )
    if not bool(torch.isfinite(h).all()):
        raise VitcompressError("the Hessian holds NaN or Inf: the calibration inputs are broken")


def check_options(damp: float, block_size: int, where: str) -> None:
    """``damp`` a finite number > 0 and ``block_size`` an integer >= 1, or a one-line error."""
    ok = isinstance(damp, int | float) and not isinstance(damp, bool) and 0 < damp < float("inf")
    if not ok:
        raise VitcompressError(f"{where}.damp = {damp!r}: expected a number > 0, e.g. 0.01")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise VitcompressError(
            f"{where}.block_size = {block_size!r}: expected an integer >= 1, e.g. 128"
        )


def inverse_hessian_cholesky(
    h: torch.Tensor, damp: float = 0.01, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (float64), dead
    inputs set to ``H_jj = 1`` first (module docstring).

    Args:
        h: the Hessian ``2 X^T X / n`` (in x in), any float dtype; not modified.
        damp: the dampening, relative to the mean diagonal; > 0.
        perm: an order of the inputs (GPTQ's act order): ``U`` is then the factor of the
            permuted matrix ``H[perm][:, perm]``.

    Raises:
        VitcompressError: ``H`` is not positive definite even once dampened (raise ``damp``).
    """
    H = h.detach().to(torch.float64).clone()  # (in, in)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    if perm is not None:
        H = H[perm][:, perm]
    diag = torch.diagonal(H)
    diag += damp * diag.mean()
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise VitcompressError(
            f"the Hessian is not positive definite even with damp {damp:g}: too few or "
            "degenerate calibration inputs; use more calibration data or a larger damp (e.g. 0.1)"
        )
    return L  # (in, in), upper triangular


__all__ = ["check_hessian", "check_options", "inverse_hessian_cholesky"]
