"""The ``smooth`` step: SmoothQuant (Xiao et al. 2023), activation outliers moved into weights.

A ViT's LayerNorm outputs have a few channels whose values are tens of times larger than the
rest, in every token. A per-tensor activation scale must cover them, so every other channel gets
a handful of codes: this, not the weights, is what breaks W8A8 and lower. Weights, quantised per
output channel, do not mind a few large columns. SmoothQuant divides input channel ``j`` of a
Linear by ``s_j`` and multiplies the weight's column ``j`` by it, with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over calibration tokens, ``max|W_j|`` over the column; ``alpha`` trades how much
of the difficulty moves into the weights). When the input is a LayerNorm output, the division is
folded into the LayerNorm's weight and bias, so nothing is added at run time and the float
model computes the same function (to rounding).

In our ViT blocks (timm layout) that is ``attn.qkv`` after ``norm1`` and ``mlp.fc1`` after
``norm2`` (their ``.first`` factor after a ``lowrank`` step). Other Linears (``attn.proj``,
``mlp.fc2``, the head) take inputs that no per-channel affine precedes: folding there would need
a runtime scale, so matched layers of that kind are skipped and listed in the step's report.
The step only changes values (no structure record): run it after shrink and lowrank (it needs
the final layers) and before quantize.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vitcompress.config import as_patterns, check_int, check_number
from vitcompress.errors import VitcompressError
from vitcompress.lowrank import LowRankLinear
from vitcompress.models.vit import Block
from vitcompress.steps.calib import observe_inputs
from vitcompress.steps.registry import Step, StepContext
from vitcompress.targets import Patterns, select_modules

# steps that replace or resize the Linears smooth rescales: they must run first
COMES_AFTER = ("shrink", "lowrank")
# the smallest smoothing factor (SmoothQuant's clamp): a dead channel is not blown up by 1/s
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothConfig:
    """``alpha`` in [0, 1] (0: nothing moves, 1: all of the activation range moves into the
    weights; 0.5 is the paper's default for most models); ``batches``: calibration batches read
    (at most); ``targets`` / ``ignore``: Linear (or low-rank) layer names; only those fed by a
    LayerNorm are smoothed (module docstring)."""

    alpha: float = 0.5
    batches: int = 8
    targets: Patterns = ("blocks.*.attn.qkv", "blocks.*.mlp.fc1")
    ignore: Patterns = None

    def __post_init__(self) -> None:
        check_number(self.alpha, "smooth.alpha", 0)
        if self.alpha > 1:
            raise VitcompressError(f"smooth.alpha must be a number in [0, 1], got {self.alpha!r}")
        check_int(self.batches, "smooth.batches", 1)
        for key in ("targets", "ignore"):
            object.__setattr__(self, key, as_patterns(getattr(self, key), f"smooth.{key}"))


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def smoothing_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``s_j = act_j^alpha / weight_j^(1 - alpha)`` per input channel (float64), at least
    :data:`MIN_SCALE`; 1 for a channel whose activations or weights are all zero (nothing to
    balance)."""
    a = act_absmax.detach().double()  # (C,)
    w = weight_absmax.detach().double()  # (C,)
    s = a.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(min=MIN_SCALE)


def range_ratio(absmax: torch.Tensor) -> float:
    """How far the largest channel range stands out: ``max_j r_j / median_j r_j``."""
    r = absmax.detach().double()
    med = float(r.median())
    return float(r.max()) / med if med > 0 else float("inf")


def fold_smoothing_(norm: nn.LayerNorm, linear: nn.Linear, s: torch.Tensor) -> None:
    """Divide ``norm``'s output channels by ``s`` (its weight and bias) and multiply
    ``linear``'s input columns by it: ``linear(norm(x))`` is unchanged."""
    with torch.no_grad():
        norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
        linear.weight.copy_((linear.weight.double() * s).to(linear.weight.dtype))  # (out, in)


# --------------------------------------------------------------------------------------------
# The walker
# --------------------------------------------------------------------------------------------


def _fed_by_norm(model: nn.Module) -> dict[str, tuple[str, nn.LayerNorm, nn.Linear]]:
    """``{layer name: (norm name, norm, the Linear whose columns scale)}`` for every layer of a
    ViT block that takes a LayerNorm output (a low-rank layer by its name and its ``.first``)."""
    out: dict[str, tuple[str, nn.LayerNorm, nn.Linear]] = {}
    for b, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        for norm_attr, path in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            norm = getattr(block, norm_attr)
            layer = block.get_submodule(path)
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
                continue
            name = f"{b}.{path}" if b else path
            if isinstance(layer, LowRankLinear):
                out[name] = out[f"{name}.first"] = (f"{b}.{norm_attr}", norm, layer.first)
            elif type(layer) is nn.Linear:
                out[name] = (f"{b}.{norm_attr}", norm, layer)
    return out


def smooth_(model: nn.Module, config: SmoothConfig, calib_data: Iterable) -> None:
    """Smooth the selected LayerNorm-fed layers of ``model`` in place (module docstring), with
    activation ranges from ``calib_data`` (input batches).

    Raises:
        VitcompressError: no calibration data, or no matched layer takes a LayerNorm output.
    """
    _smooth(model, config, calib_data)


def _smooth(model: nn.Module, config: SmoothConfig, calib_data: Iterable) -> dict:
    """:func:`smooth_`, returning what it did: ``layers`` smoothed, ``skipped`` (matched but
    not fed by a LayerNorm), and the mean :func:`range_ratio` of their inputs before and after.
    """
    if calib_data is None:
        raise VitcompressError("smooth needs calibration data (a few input batches)")
    chosen = select_modules(
        model, config.targets, config.ignore, (nn.Linear, LowRankLinear), "smooth.targets"
    )
    fed = _fed_by_norm(model)
    skipped = [n for n, _ in chosen if n not in fed]
    by_norm: dict[str, tuple[str, nn.Module, nn.LayerNorm, nn.Linear]] = {}
    for n, m in chosen:
        if n in fed and fed[n][0] not in by_norm:  # fc1 and fc1.first share one LayerNorm
            norm_name, norm, linear = fed[n]
            by_norm[norm_name] = (n, m, norm, linear)
    if not by_norm:
        raise VitcompressError(
            "smooth: no matched layer takes a LayerNorm output (in a ViT block: attn.qkv, "
            f"mlp.fc1); matched {', '.join(skipped[:3]) or 'none'}"
        )
    absmax: dict[str, torch.Tensor] = {}

    def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
        a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()  # (C,)
        absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)

    layers = {n: m for n, m, _, _ in by_norm.values()}
    observe_inputs(model, layers, calib_data, observe, config.batches)
    before, after = [], []
    for n, _, norm, linear in by_norm.values():
        w_absmax = linear.weight.detach().abs().amax(dim=0).cpu()  # (C,)
        s = smoothing_scales(absmax[n], w_absmax, config.alpha)  # (C,)
        before.append(range_ratio(absmax[n]))
        after.append(range_ratio(absmax[n].double() / s))
        fold_smoothing_(norm, linear, s.to(linear.weight.device))
    return {
        "alpha": config.alpha,
        "layers": [n for n, *_ in by_norm.values()],
        "skipped": skipped,
        "range_ratio": {"before": sum(before) / len(before), "after": sum(after) / len(after)},
    }


class SmoothStep(Step):
    kind = "smooth"
    config_cls = SmoothConfig

    def check_order(self, config: SmoothConfig, index: int, kinds: list[str]) -> str | None:
        later = [k for k in kinds[index + 1 :] if k in COMES_AFTER]
        if later:
            return (
                f"smooth rescales the layers {later[0]} replaces or resizes, so it must come "
                f"after {later[0]} (and before quantize)"
            )
        return None

    def needs_calibration(self, config: SmoothConfig) -> bool:
        return True

    def check_layers(self, shadow: nn.Module, config: SmoothConfig, what: str) -> None:
        select_modules(shadow, config.targets, config.ignore, (nn.Linear, LowRankLinear), what)

    def apply(self, model: nn.Module, config: SmoothConfig, ctx: StepContext, index: int) -> dict:
        return _smooth(model, config, ctx.calib_loader)


STEP = SmoothStep()

__all__ = [
    "STEP",
    "SmoothConfig",
    "fold_smoothing_",
    "range_ratio",
    "smooth_",
    "smoothing_scales",
]
