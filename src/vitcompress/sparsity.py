"""Pruning masks: unstructured (per layer or global), N:M semi-structured; one-shot or cubic.

The maths lives in pure tensor functions (``magnitude_mask``, ``nm_mask``,
``global_magnitude_masks``, ``wanda_mask``, ``cubic_sparsity``); the glue that hooks them into a
model is thin. We do not use ``torch.nn.utils.prune``: a mask is a plain boolean buffer
``weight_mask`` on the pruned module (``True`` = weight kept, ``False`` = pruned, same shape as
``weight``), the weight itself holds exact zeros, and nothing is reparametrised, so the masks
are visible in ``state_dict`` (``<layer>.weight_mask``) and what is stored is what runs.

Conventions shared by every mask function:

- a mask keeps the weights of highest score (``|w|`` for magnitude pruning); among equal scores
  the one with the lower flat index is kept, so masks are deterministic;
- an optional prior ``mask`` makes pruning monotone: weights it marks pruned stay pruned, and
  the new mask is chosen among the weights it keeps;
- the number of zeros of a layer is exactly ``round(sparsity * numel)`` (Python ``round``, half
  to even), or more when a prior mask already pruned more.

Keeping masks during fine-tuning: call :func:`enforce_masks_` after every ``optimizer.step()``.
:func:`register_mask_hooks` also zeroes the gradients of pruned weights, but momentum from before
pruning or a custom optimizer can still move them; enforcing after the step is the guarantee.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vitcompress.errors import VitcompressError
from vitcompress.targets import select_modules

if TYPE_CHECKING:
    from vitcompress.steps.prune import PruneConfig

MASK = "weight_mask"
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def check_sparsity(sparsity: float, what: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise VitcompressError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise VitcompressError(
            f"{what} must be in [0, 1) (0.5 = half the weights zero), got {sparsity}"
        )


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` prunes: ``round(sparsity * numel)``."""
    return int(round(sparsity * numel))


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask of the ``n_keep`` highest entries of a 1-D tensor, lower index first on ties."""
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:n_keep]] = True
    return keep


def _masked_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = scores.detach()
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()  # half formats upcast exactly; float64 keeps its resolution
    if mask is None:
        return scores
    if mask.shape != scores.shape:
        raise VitcompressError(
            f"mask shape {tuple(mask.shape)} != weight shape {tuple(scores.shape)}"
        )
    # Already-pruned weights rank below every kept one, so they are never chosen back.
    return scores.masked_fill(~mask.bool(), -math.inf)


def score_mask(
    scores: torch.Tensor,
    sparsity: float,
    mask: torch.Tensor | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    """Keep the highest ``scores``, pruning ``round(sparsity * n)`` entries.

    Args:
        scores: importance of each weight (same shape as the weight).
        sparsity: fraction of entries to prune, in [0, 1).
        mask: prior mask (``True`` = kept); entries it prunes stay pruned.
        per_row: compare within each output row (dim 0) instead of across the whole tensor:
            every row then loses ``round(sparsity * row_size)`` entries (Wanda's comparison group).

    Returns:
        A bool tensor of the shape of ``scores``, ``True`` where the weight is kept.
    """
    check_sparsity(sparsity)
    s = _masked_scores(scores, mask)
    if not per_row:
        keep = _keep_top(s.flatten(), s.numel() - n_pruned(s.numel(), sparsity))
    else:
        rows = s.reshape(s.shape[0], -1)  # (out, in)
        n_keep = rows.shape[1] - n_pruned(rows.shape[1], sparsity)
        order = torch.argsort(rows, dim=1, descending=True, stable=True)  # (out, in)
        keep = torch.zeros_like(rows, dtype=torch.bool)
        keep.scatter_(1, order[:, :n_keep], True)
    keep = keep.reshape(scores.shape)
    return keep if mask is None else keep & mask.bool()


def magnitude_mask(
    w: torch.Tensor, sparsity: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Prune the ``round(sparsity * w.numel())`` smallest ``|w|`` of one tensor.

    Ties are broken by flat index (the lower index is kept). With a prior ``mask`` the new mask
    is a subset of it (monotone pruning).
    """
    return score_mask(w.abs(), sparsity, mask)


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One magnitude threshold across all tensors: exactly ``round(sparsity * total)`` zeros.

    Layers may end up with very different sparsities (a layer can even be pruned entirely); ties
    are broken by the order of ``weights`` then by flat index.
    """
    check_sparsity(sparsity)
    if not weights:
        raise VitcompressError("global pruning needs at least one layer")
    masks = masks or {}
    flat = [_masked_scores(w.abs(), masks.get(k)).flatten() for k, w in weights.items()]
    scores = torch.cat([f.to(flat[0].device) for f in flat])  # (total,)
    keep = _keep_top(scores, scores.numel() - n_pruned(scores.numel(), sparsity))
    out: dict[str, torch.Tensor] = {}
    start = 0
    for (name, w), f in zip(weights.items(), flat, strict=True):
        m = keep[start : start + f.numel()].reshape(w.shape).to(w.device)
        start += f.numel()
        out[name] = m if name not in masks else m & masks[name].bool()
    return out


def nm_mask(
    w: torch.Tensor,
    n: int = 2,
    m: int = 4,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """N:M mask (NVIDIA ASP semantics): keep the ``n`` largest of every ``m`` consecutive weights.

    Groups run along the input dimension: the last dim of a Linear weight ``(out, in)``; a conv
    weight ``(out, in, kh, kw)`` is flattened to ``(out, in*kh*kw)`` in memory order. Ties keep
    the lower index. With a prior ``mask`` a group keeps at most ``n`` of its surviving weights.

    Args:
        w: the weight.
        n: weights kept per group.
        m: group size.
        mask: prior mask (``True`` = kept).
        scores: importance per weight (default ``|w|``), e.g. Wanda scores.
        name: the layer name, used in error messages.

    Raises:
        VitcompressError: when the input dimension is not a multiple of ``m``.
    """
    if not 1 <= n < m:
        raise VitcompressError(f"{name}: N:M needs 1 <= N < M, got {n}:{m}")
    if w.ndim < 2:
        raise VitcompressError(
            f"{name}: N:M needs a weight of 2 or more dims, got {tuple(w.shape)}"
        )
    s = _masked_scores(w.abs() if scores is None else scores, mask)
    rows = s.reshape(w.shape[0], -1)  # (out, in)
    if rows.shape[1] % m:
        raise VitcompressError(
            f"{name}: input dimension {rows.shape[1]} is not a multiple of {m}, so {n}:{m} "
            f"sparsity does not apply; leave this layer out with ignore"
        )
    groups = rows.reshape(rows.shape[0], -1, m)  # (out, in/m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    keep = keep.reshape(w.shape)
    return keep if mask is None else keep & mask.bool()


def wanda_scores(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), in float32.

    ``act_norm`` holds the L2 norm of each input feature over all calibration tokens (length
    ``in`` for a Linear, ``in*kh*kw`` for a conv).
    """
    rows = w.detach().reshape(w.shape[0], -1).abs().float()  # (out, in)
    if act_norm.numel() != rows.shape[1]:
        raise VitcompressError(
            f"activation norms have {act_norm.numel()} entries, the weight has "
            f"{rows.shape[1]} inputs"
        )
    return (rows * act_norm.to(rows).reshape(1, -1)).reshape(w.shape)


def wanda_mask(
    w: torch.Tensor,
    act_norm: torch.Tensor,
    sparsity: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wanda mask: per output row, prune the ``round(sparsity * in)`` lowest ``|W| * ||X||``."""
    return score_mask(wanda_scores(w, act_norm), sparsity, mask, per_row=True)


def cubic_sparsity(
    step: int,
    initial: float,
    final: float,
    start_step: int,
    n_steps: int,
    frequency: int = 1,
) -> float:
    """Sparsity at training ``step`` under the cubic schedule of Zhu & Gupta (2017).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` where ``t0 = start_step``,
    ``n = n_steps`` (the number of pruning intervals) and ``dt = frequency``. Pruning happens only
    at ``t = t0 + k * dt`` for ``k = 0 .. n``; between two pruning steps the sparsity holds the
    value of the last one, i.e. ``t`` is rounded down to ``t0 + floor((t - t0) / dt) * dt``.
    Before ``t0`` it is ``s_i``; from ``t0 + n * dt`` on it is exactly ``s_f``.
    """
    if n_steps < 1 or frequency < 1:
        raise VitcompressError(
            f"cubic schedule needs n_steps >= 1 and frequency >= 1, got {n_steps} and {frequency}"
        )
    k = min((step - start_step) // frequency, n_steps) if step >= start_step else 0
    if k == 0:  # exact ends, free of rounding
        return float(initial)
    if k == n_steps:
        return float(final)
    return float(final + (initial - final) * (1.0 - k / n_steps) ** 3)


_NM = re.compile(r"(\d+):(\d+)")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"2:4"`` -> (2, 4); anything else is an error."""
    if pattern == "unstructured":
        return None
    match = _NM.fullmatch(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise VitcompressError(
            f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not (1 <= n < m):
        raise VitcompressError(
            f"pattern {pattern!r}: N:M keeps N of every M weights, so it needs 1 <= N < M "
            f"(e.g. '2:4')"
        )
    return n, m


# --------------------------------------------------------------------------------------------
# Module glue
# --------------------------------------------------------------------------------------------


def select_prunable(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The Linear / Conv2d modules ``config`` selects, by name."""
    return dict(
        select_modules(model, config.targets, config.ignore, PRUNABLE_TYPES, "prune.targets")
    )


def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Store each mask as the bool buffer ``weight_mask`` of its module and zero pruned weights.

    ``masks`` maps a module name to a bool tensor of the module's weight shape (``True`` = kept).
    An existing ``weight_mask`` is replaced.
    """
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise VitcompressError(f"no module named {name!r} to put a mask on") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != mask.shape:
            raise VitcompressError(
                f"{name}: mask shape {tuple(mask.shape)} does not fit its weight "
                f"{None if weight is None else tuple(weight.shape)}"
            )
        mask = mask.to(device=weight.device, dtype=torch.bool)
        if MASK in module._buffers:
            setattr(module, MASK, mask)
        else:
            module.register_buffer(MASK, mask)
    enforce_masks_(model)


def enforce_masks_(model: nn.Module) -> None:
    """Re-zero every masked weight; call after each ``optimizer.step()`` while fine-tuning."""
    with torch.no_grad():
        for module in model.modules():
            mask = module._buffers.get(MASK)
            if mask is not None:
                module.weight.masked_fill_(~mask, 0)


def masks_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module name: mask}`` from the ``<name>.weight_mask`` entries of a state dict.

    Lets a loader restore masks on a fresh model: ``apply_masks_(model, masks_from_state_dict(sd))``
    before ``load_state_dict``.
    """
    suffix = "." + MASK
    return {k[: -len(suffix)]: v for k, v in state_dict.items() if k.endswith(suffix)}


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``weight_mask`` buffer of every masked module, by name."""
    return {n: m._buffers[MASK] for n, m in model.named_modules() if MASK in m._buffers}


def register_mask_hooks(model: nn.Module) -> list[RemovableHandle]:
    """Zero the gradient of pruned weights during backward, for every module with a mask.

    The hook reads the module's current mask, so masks updated later (gradual pruning) are
    honoured. Not a guarantee on its own (momentum, custom optimizers): keep calling
    :func:`enforce_masks_` after each step. Call ``.remove()`` on the handles to undo.
    """
    handles = []
    for module in model.modules():
        if MASK not in module._buffers:
            continue

        def hook(grad: torch.Tensor, module: nn.Module = module) -> torch.Tensor:
            mask = module._buffers.get(MASK)
            return grad if mask is None else grad.masked_fill(~mask, 0)

        handles.append(module.weight.register_hook(hook))
    return handles


def compute_masks(
    layers: Mapping[str, nn.Module],
    config: PruneConfig,
    sparsity: float,
    act_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks for ``layers`` at ``sparsity`` (ignored for N:M), monotone w.r.t. existing masks."""
    prior = {n: m._buffers[MASK] for n, m in layers.items() if MASK in m._buffers}
    weights = {n: m.weight.detach() for n, m in layers.items()}
    nm = config.nm
    if config.scope == "global":
        return global_magnitude_masks(weights, sparsity, prior)
    out = {}
    for name, w in weights.items():
        scores = None
        if config.method == "wanda":
            if act_norms is None:
                raise VitcompressError("prune.method 'wanda' needs calibration data (calib_data)")
            scores = wanda_scores(w, act_norms[name])
        if nm is not None:
            out[name] = nm_mask(w, nm[0], nm[1], prior.get(name), scores, name)
        elif scores is not None:
            out[name] = score_mask(scores, sparsity, prior.get(name), per_row=True)
        else:
            out[name] = magnitude_mask(w, sparsity, prior.get(name))
    return out


def achieved_sparsity(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{layer: fraction of its weights a mask prunes}``."""
    return {n: 1.0 - int(m.sum()) / m.numel() for n, m in masks.items()}


class GradualPruner:
    """Prunes during fine-tuning along ``config``'s schedule (magnitude method).

    Usage::

        pruner = GradualPruner(model, config)
        for step in range(n):
            pruner.step(step)          # prunes when the schedule says so
            loss.backward(); opt.step()
            pruner.apply()             # re-zero pruned weights

    On creation every selected layer gets a mask (all ``True`` unless it already had one), so
    :func:`register_mask_hooks` can be called right after. Masks are monotone: each pruning
    chooses among the weights still kept.
    """

    def __init__(self, model: nn.Module, config: PruneConfig):
        if config.method != "magnitude":
            raise VitcompressError(
                f"GradualPruner prunes by magnitude; method {config.method!r} is one shot: "
                f"use prune_(model, config, calib_data)"
            )
        self.model = model
        self.config = config
        self.layers = select_prunable(model, config)
        self.level = 0.0  # the sparsity last pruned to
        fresh = {
            n: torch.ones_like(m.weight, dtype=torch.bool)
            for n, m in self.layers.items()
            if MASK not in m._buffers
        }
        apply_masks_(model, fresh)

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at optimizer ``step``."""
        return self.config.sparsity_at(step)

    def step(self, global_step: int) -> float:
        """Bring the masks to the scheduled sparsity at ``global_step``; returns that sparsity.

        Masks are recomputed only when the schedule has risen since the last pruning, so calling
        this every step is cheap, and a loop that calls it less often (per epoch) still catches
        up at its next call.
        """
        target = self.sparsity_at(global_step)
        if target > self.level:
            masks = compute_masks(self.layers, self.config, target)
            for name, mask in masks.items():
                setattr(self.layers[name], MASK, mask)
            self.level = target
        self.apply()
        return target

    def apply(self) -> None:
        """Re-zero the pruned weights of this pruner's layers."""
        with torch.no_grad():
            for module in self.layers.values():
                module.weight.masked_fill_(~module._buffers[MASK], 0)

    def report(self) -> dict[str, float]:
        """``{layer: fraction of weights pruned by its mask}``."""
        return achieved_sparsity({n: m._buffers[MASK] for n, m in self.layers.items()})


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in the stored weight of every Linear / Conv / masked module."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or MASK in getattr(
            module, "_buffers", {}
        ):
            out[name] = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    return out


def count_nonzero(model: nn.Module) -> int:
    """Non-zero entries over all parameters (each shared parameter counted once)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


__all__ = [
    "GradualPruner",
    "achieved_sparsity",
    "apply_masks_",
    "compute_masks",
    "count_nonzero",
    "check_sparsity",
    "cubic_sparsity",
    "enforce_masks_",
    "get_masks",
    "global_magnitude_masks",
    "magnitude_mask",
    "masks_from_state_dict",
    "n_pruned",
    "nm_mask",
    "parse_pattern",
    "register_mask_hooks",
    "score_mask",
    "select_prunable",
    "sparsity_report",
    "wanda_mask",
    "wanda_scores",
]
