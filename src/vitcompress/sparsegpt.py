"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with second-order error feedback, as a
pure function of a weight matrix and the Hessian of its layer's inputs.

Magnitude pruning zeroes the smallest weights and leaves the rest alone. SparseGPT walks the
input columns in blocks of ``block_size``, chooses which weights to prune by the Optimal Brain
Surgeon saliency ``w^2 / [H^-1]_jj^2`` (the output error that pruning ``w`` alone would
cause), zeroes them column by column and moves each column's error onto the weights not yet
visited, so that the layer's output on the calibration inputs stays close
(:mod:`vitcompress.obs` for the maths). The algorithm is the reference implementation's
(``IST-DASLab/sparsegpt``, ``sparsegpt.py``); ``[H^-1]_jj`` is read off the Cholesky factor
``U`` as ``U_jj^2``, which is what the column's error is divided by.

Choices that are not obvious:

- Unstructured: the mask of a block is chosen when the block starts, over all its rows at
  once (the reference's comparison group: "adaptive mask selection" per block of columns), from
  the weights as the updates of earlier blocks left them. The reference prunes
  ``int(sparsity * block numel) + 1`` weights per block (its threshold is inclusive); we give
  each block its share of the layer's ``round(sparsity * numel)`` zeros (shares in proportion
  to the block's size, rounded so that they add up), so that **every layer has exactly
  ``round(sparsity * numel)`` zeros**, as :mod:`vitcompress.sparsity`'s masks do. Within a block
  the lowest saliencies are pruned; among equal ones the lower flat index is kept.
- N:M: every group of ``M`` consecutive inputs keeps its ``N`` weights of highest saliency,
  chosen when the group starts (so from weights the earlier groups' errors have updated). A
  block holds whole groups: ``block_size`` is rounded down to a multiple of ``M``.
- A prior mask (an earlier prune) is respected: its pruned weights stay pruned and count
  towards the zeros; only when it already prunes more than asked does a layer end with more.
- Conv2d weights are pruned as ``(out, in * kh * kw)`` in memory order, with the Hessian of
  the unfolded patches.
- The reference's joint quantisation is left to the next step: ``prune: {method: sparsegpt}``
  then ``quantize: {algorithm: gptq}`` keeps the zeros (GPTQ respects the mask).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vitcompress.errors import VitcompressError
from vitcompress.obs import check_hessian, check_options, inverse_hessian_cholesky
from vitcompress.sparsity import check_sparsity, n_pruned, nm_mask


class SparseGPTResult(NamedTuple):
    """The pruned weight (pruned entries exactly +0.0) and its mask (``True`` = kept)."""

    weight: torch.Tensor
    mask: torch.Tensor


def _share(total: int, upto: int, whole: int) -> int:
    """``round(total * upto / whole)`` in integers (half up), 0 when ``whole`` is 0."""
    return (2 * total * upto + whole) // (2 * whole) if whole else 0


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask keeping the ``n_keep`` highest scores; ties keep the lower flat index."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:n_keep]] = True
    return keep.reshape(scores.shape)


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    *,
    mask: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> SparseGPTResult:
    """Prune ``w`` by SparseGPT with the Hessian ``h`` of the layer's inputs.

    Args:
        w: the weight, ``(out, in)`` or a conv weight ``(out, in, kh, kw)``.
        h: ``2 X^T X / n`` of the layer's (unfolded) inputs, ``(k, k)`` with ``k = w[0].numel()``.
        sparsity: the fraction of zeros, in [0, 1), for unstructured pruning.
        nm: ``(N, M)``: keep ``N`` of every ``M`` consecutive inputs (instead of ``sparsity``).
        mask: a prior mask (``True`` = kept) whose pruned weights stay pruned.
        damp: dampening relative to the mean diagonal of ``h``.
        block_size: columns per block (mask choice and lazy batch update).
        name: the layer, for error messages.

    Returns:
        A :class:`SparseGPTResult` of ``w``'s shape and dtype.
    """
    if (sparsity is None) == (nm is None):
        raise VitcompressError(f"{name}: sparsegpt needs either a sparsity or an N:M pattern")
    check_options(damp, block_size, "sparsegpt")
    if w.ndim < 2:
        raise VitcompressError(f"{name}: sparsegpt needs a weight of 2 or more dims")
    rows = w.shape[0]
    W = w.detach().reshape(rows, -1).to(torch.float64).clone()  # (out, k)
    cols = W.shape[1]
    check_hessian(h, cols)
    prior = None if mask is None else mask.detach().reshape(rows, -1).to(W.device, torch.bool)
    if prior is not None and prior.shape != W.shape:
        raise VitcompressError(f"{name}: mask {tuple(mask.shape)} != weight {tuple(w.shape)}")
    if nm is not None:
        n, m = nm
        if not 1 <= n < m:
            raise VitcompressError(f"{name}: N:M needs 1 <= N < M, got {n}:{m}")
        if cols % m:
            raise VitcompressError(
                f"{name}: input dimension {cols} is not a multiple of {m}, so {n}:{m} sparsity "
                "does not apply; leave this layer out with ignore"
            )
        block_size = max(m, block_size - block_size % m)  # whole groups in a block
        extra = free = 0
    else:
        check_sparsity(sparsity, f"{name}: sparsity")
        pruned_before = 0 if prior is None else int((~prior).sum())
        extra = max(0, n_pruned(W.numel(), sparsity) - pruned_before)  # zeros still to choose
        free = W.numel() - pruned_before
    U = inverse_hessian_cholesky(h, damp).to(W.device)  # (k, k)
    keep = torch.ones_like(W, dtype=torch.bool)
    free_before = 0  # unpruned weights in the blocks before this one
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (out, b), kept up to date within the block
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d2 = torch.diagonal(U1) ** 2  # [H^-1]_jj, (b,)
        prior1 = None if prior is None else prior[:, i1:i2]
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None:
            free1 = W1.numel() if prior1 is None else int(prior1.sum())
            zeros = _share(extra, free_before + free1, free) - _share(extra, free_before, free)
            free_before += free1
            scores = W1**2 / d2[None, :] ** 2
            if prior1 is not None:  # already pruned: ranked below every kept weight
                scores = scores.masked_fill(~prior1, -torch.inf)
            keep1 = _keep_top(scores, free1 - zeros)
            if prior1 is not None:
                keep1 &= prior1
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                scores = W1[:, g] ** 2 / d2[None, g] ** 2
                pg = None if prior1 is None else prior1[:, g]
                keep1[:, g] = nm_mask(W1[:, g], nm[0], nm[1], pg, scores, name)
            col = W1[:, i]  # (out,)
            q = col.masked_fill(~keep1[:, i], 0.0)
            err = (col - q) / U1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy batch update
    out = W.to(w.dtype).masked_fill(~keep, 0.0)
    return SparseGPTResult(out.reshape(w.shape), keep.reshape(w.shape))


__all__ = ["SparseGPTResult", "sparsegpt_prune"]
