"""GPTQ (Frantar et al. 2022): weight quantisation with second-order error feedback, as a pure
function of a weight matrix and the Hessian of its layer's inputs.

Round-to-nearest (RTN) quantises every weight on its own. GPTQ quantises the input columns one
after another and, after each, moves the error it made onto the columns still in float, so
that the layer's *output* on the calibration inputs stays close (:mod:`vitcompress.obs` for the
maths). The algorithm is the reference implementation's (``IST-DASLab/gptq``, ``gptq.py``):

- dampening of ``H`` by ``damp`` times its mean diagonal; dead inputs (``H_jj = 0``);
- act order (optional): columns in order of descending ``H_jj``, so the inputs with the largest
  activations are quantised first, while many columns remain to absorb their error; the
  permutation is undone at the end;
- lazy batch updates: the error of a block of ``block_size`` columns reaches the columns after
  the block in one matrix product (same result, far fewer passes over ``W``);
- the Cholesky factor of ``H^-1`` gives every update row at once.

Scales (what the codes mean) follow :class:`~vitcompress.quantize.QuantLinear` exactly, so
that a GPTQ'd layer stores the same codes + scales as an RTN one:

- ``per_tensor`` / ``per_channel``: computed from the original weights, as RTN computes them
  (min/max, rounded to ``scale_dtype``); GPTQ's updates may push a weight past the range, where
  it saturates like any other value.
- ``per_group``: a group's scale is computed when its first column is about to be quantised,
  from the weights of the group as the error feedback has left them (the reference with
  ``static_groups=False``). Groups are runs of ``group_size`` *original* input columns, as
  :class:`QuantLinear` stores them; with act order their columns are visited out of order, so
  the group's current weights are gathered from wherever they are (within the current block or
  past it, the pending lazy update applied). The reference instead forms groups of consecutive
  *permuted* columns, which a contiguous group layout cannot store.
- Unscaled float formats (fp16, bf16, tf32) have no scale: a column is cast, and GPTQ feeds the
  cast's error forward all the same.

With ``H`` a multiple of the identity (uncorrelated inputs) no error moves and GPTQ gives RTN's
values exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vitcompress.errors import VitcompressError
from vitcompress.formats import GRANULARITIES, Format, IntFormat, compute_qparams, fake_quant
from vitcompress.obs import check_hessian, check_options, inverse_hessian_cholesky
from vitcompress.quantize import is_scaled, round_scale


class GPTQResult(NamedTuple):
    """GPTQ's quantised weight and the qparams it used.

    Attributes:
        weight: fp32 ``(out, in)``, every value on the format's grid under ``scale``.
        scale: fp32 in :class:`~vitcompress.quantize.QuantLinear`'s shape for the granularity
            (``()``, ``(out, 1)`` or ``(out, ceil(in / group_size))``); None for unscaled floats.
        zero_point: int32, same shape as ``scale``, for integer formats; else None.
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None


def _group_qparams(
    cur: torch.Tensor, fmt: Format, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row qparams of ``cur`` (out, k) as RTN computes one group's: ``(out, 1)`` each."""
    scale, zp = compute_qparams(cur.float(), fmt, "per_channel", axis=0)
    return round_scale(scale, scale_dtype), zp


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: Format,
    granularity: str = "per_channel",
    group_size: int | None = None,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantise ``w`` to ``fmt`` by GPTQ with the Hessian ``h`` of the layer's inputs.

    Args:
        w: the weight, ``(out, in)``.
        h: ``2 X^T X / n`` of the layer's inputs, ``(in, in)``.
        fmt: the weight format (integer or float); integer formats as configured (symmetric,
            narrow), exactly as :class:`~vitcompress.quantize.QuantLinear` takes them.
        granularity: of the scales, one of ``per_tensor``, ``per_channel``, ``per_group``.
        group_size: inputs per group, for ``per_group``.
        damp: dampening relative to the mean diagonal of ``h``.
        act_order: quantise the columns by descending ``H_jj``.
        block_size: columns per lazy batch update.
        scale_dtype: the precision scales are rounded to (as ``QuantizeConfig.scales``).
        mask: bool ``(out, in)``, ``True`` = kept: the weights it prunes are set to exactly 0
            (their error fed forward like any other), so a pruned layer stays pruned.

    Returns:
        A :class:`GPTQResult`; ``weight`` re-quantised with its ``scale`` gives itself back.
    """
    if w.ndim != 2:
        raise VitcompressError(f"gptq: the weight must be (out, in), got {tuple(w.shape)}")
    if granularity not in GRANULARITIES:
        raise VitcompressError(f"gptq: granularity must be one of {GRANULARITIES}")
    check_options(damp, block_size, "gptq")
    rows, cols = w.shape
    check_hessian(h, cols)
    scaled = is_scaled(fmt)
    grouped = scaled and granularity == "per_group"
    if grouped and not (isinstance(group_size, int) and group_size >= 1):
        raise VitcompressError(f"gptq: per_group needs group_size >= 1, got {group_size!r}")
    keep = None if mask is None else mask.to(device=w.device, dtype=torch.bool)
    if keep is not None and keep.shape != w.shape:
        raise VitcompressError(f"gptq: mask {tuple(keep.shape)} != weight {tuple(w.shape)}")

    w32 = w.detach().float()
    scale = zp = None
    if grouped:
        n_groups = -(-cols // group_size)
        scale = torch.ones(rows, n_groups, device=w.device)
        if isinstance(fmt, IntFormat):
            zp = torch.zeros(rows, n_groups, dtype=torch.int32, device=w.device)
    elif scaled:
        scale, zp = compute_qparams(w32, fmt, granularity, axis=0)  # as RTN: before any update
        scale = round_scale(scale, scale_dtype)

    diag = torch.diagonal(h).to(torch.float64)
    if act_order:  # descending H_jj, dead inputs (H_jj = 0 -> 1 below) by their new value
        d = torch.where(diag == 0, torch.ones_like(diag), diag)
        perm = torch.argsort(d, descending=True, stable=True)
    else:
        perm = torch.arange(cols, device=w.device)
    invperm = torch.argsort(perm)
    U = inverse_hessian_cholesky(h, damp, perm if act_order else None).to(w.device)  # (in, in)

    W = w32.double()[:, perm]  # (out, in), permuted columns, float64 for the updates
    keepP = None if keep is None else keep[:, perm]
    Q = torch.zeros(rows, cols, device=w.device)  # fp32 results, permuted
    started = torch.zeros(scale.shape[1] if grouped else 0, dtype=torch.bool)

    def column_qparams(j: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Qparams that broadcast against one column ``(out, 1)`` of original index ``j``."""
        if not scaled:
            return None, None
        if grouped:
            g = j // group_size
            return scale[:, g : g + 1], None if zp is None else zp[:, g : g + 1]
        return scale, zp  # (out, 1) per channel, scalars per tensor

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (out, b), kept up to date within the block
        Q1 = torch.zeros(rows, i2 - i1, device=w.device)
        Err1 = torch.zeros(rows, i2 - i1, dtype=torch.float64, device=w.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = int(perm[i1 + i])  # original column
            if grouped and not started[j // group_size]:
                g = j // group_size
                started[g] = True
                pos = invperm[g * group_size : min((g + 1) * group_size, cols)]  # permuted
                # none of the group is quantised yet; its weights as the updates left them:
                cur = W[:, pos].clone()  # (out, k): current for columns before this block
                inside = pos < i2
                cur[:, inside] = W1[:, pos[inside] - i1]
                after = ~inside
                if i > 0 and bool(after.any()):  # the lazy update still owed to them
                    cur[:, after] -= Err1[:, :i] @ U[i1 : i1 + i][:, pos[after]]
                if keepP is not None:
                    cur = cur * keepP[:, pos]  # pruned weights end at 0: not in the range
                s, z = _group_qparams(cur, fmt, scale_dtype)
                scale[:, g : g + 1] = s
                if zp is not None:
                    zp[:, g : g + 1] = z
            col = W1[:, i]  # (out,)
            s, z = column_qparams(j)
            if s is None:
                q = fmt.quantize(col.float())
            else:
                q = fake_quant(col.float()[:, None], fmt, s, z)[:, 0]
            if keepP is not None:
                q = q.masked_fill(~keepP[:, i1 + i], 0.0)
            Q1[:, i] = q
            err = (col - q.double()) / U1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy batch update
    weight = Q[:, invperm].contiguous()
    if keep is not None:
        weight = weight.masked_fill(~keep, 0.0)  # +0.0 everywhere a weight is pruned
    return GPTQResult(weight, scale, zp)


__all__ = ["GPTQResult", "gptq_quantize"]
