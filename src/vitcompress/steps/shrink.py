"""Structured pruning: remove whole attention heads and MLP neurons, so the layers get smaller.

Unstructured and N:M zeros only pay off where a kernel skips them; on a dense runtime (onnxruntime,
torch on a CPU, an FPGA GEMM array) a 50 % sparse model is exactly as slow as a dense one.
Removing a head takes its rows out of ``qkv`` and its columns out of ``proj``; removing an MLP
neuron takes a row out of ``fc1`` and a column out of ``fc2``. The result is an ordinary dense
ViT with narrower blocks: faster on every runtime, and it still quantises, factorises, exports
and packs like any other.

``shrink_(model, ShrinkConfig(mlp=0.5, heads=0.25), calib)`` scores the units of every selected
block and keeps the best in each (the same fraction in every block):

- ``method="magnitude"``: a neuron scores ``||fc1 row|| * ||fc2 column||``; a head
  ``||its value rows||_F * ||its proj columns||_F`` (its queries and keys only shape its attention
  pattern, not the size of what it adds to the residual stream).
- ``method="activation"`` (calibration data), for MLP neurons: a neuron scores how much what it
  adds to the residual stream *varies* over the calibration tokens, ``var(a_j) * ||fc2[:, j]||^2``
  (the fluctuation metric of FLAP, An et al. 2024); its *mean* contribution
  ``fc2[:, removed] @ mean(a_removed)`` is folded into the ``fc2`` bias, so what a removed neuron
  did on average is kept without any retraining. Heads are always scored by magnitude, which
  kept far more accuracy one-shot than the fluctuation score (README, benchmarks): a ViT
  classifies from the class token, one token in 50, so token-averaged statistics misjudge the
  heads that feed it.

A fine-tuning step afterwards (a recipe's ``finetune``) recovers most of the rest.
Works on ViT blocks in the timm layout (:class:`~vitcompress.models.vit.Attention` with
``qkv``/``proj``, :class:`~vitcompress.models.vit.Mlp` with ``fc1``/``fc2``), which is what
every model vitcompress builds or loads has; it must run before the steps that replace those
Linears (prune masks, low rank, quantisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vitcompress.config import as_patterns, check_int
from vitcompress.errors import VitcompressError
from vitcompress.models.vit import Attention, Mlp, VisionTransformer
from vitcompress.sparsity import MASK
from vitcompress.steps.calib import observe_inputs
from vitcompress.steps.registry import Step, StepContext
from vitcompress.targets import Patterns, select_modules

METHODS = ("magnitude", "activation")


@dataclass(frozen=True)
class ShrinkConfig:
    """How much of each selected block to remove.

    Attributes:
        mlp: fraction of the MLP hidden neurons removed in each block, in [0, 1).
        heads: fraction of the attention heads removed in each block, in [0, 1); at least one
            head always stays.
        method: ``"magnitude"`` or ``"activation"`` (MLP neurons scored on calibration data;
            heads always by magnitude; module docstring).
        batches: calibration batches the ``activation`` method reads (at most).
        multiple_of: the kept MLP width is rounded up to a multiple of this (SIMD lanes, FPGA
            GEMM tiles): 16 keeps AVX-512 and most DSP arrays fully busy.
        targets: module name patterns of the blocks (their ``attn`` / ``mlp`` submodules), e.g.
            ``"blocks.*"`` (default) or ``"re:blocks\\.([6-9]|1[01])\\..*"`` for the last six.
        ignore: name patterns to leave out.
    """

    mlp: float = 0.0
    heads: float = 0.0
    method: str = "magnitude"
    batches: int = 16
    multiple_of: int = 1
    targets: Patterns = "blocks.*"
    ignore: Patterns = None

    def __post_init__(self) -> None:
        for key in ("mlp", "heads"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise VitcompressError(f"shrink.{key} must be a fraction in [0, 1), got {v!r}")
        if self.mlp == 0 and self.heads == 0:
            raise VitcompressError("shrink: give mlp and/or heads > 0 (fractions to remove)")
        if self.method not in METHODS:
            raise VitcompressError(f"shrink.method must be one of {METHODS}, got {self.method!r}")
        for key in ("multiple_of", "batches"):
            check_int(getattr(self, key), f"shrink.{key}", 1)
        for key in ("targets", "ignore"):
            object.__setattr__(self, key, as_patterns(getattr(self, key), f"shrink.{key}"))


def kept_count(n: int, fraction: float, multiple_of: int = 1, at_least: int = 1) -> int:
    """How many of ``n`` units stay when ``fraction`` of them go (rounded to the nearest unit,
    then up to ``multiple_of``, never below ``at_least`` nor above ``n``)."""
    keep = n - int(round(fraction * n))
    keep = multiple_of * math.ceil(keep / multiple_of)
    return min(n, max(at_least, keep))


def _plain(name: str, lin: nn.Module) -> nn.Linear:
    if type(lin) is not nn.Linear:
        raise VitcompressError(
            f"shrink: {name} is a {type(lin).__name__}, not a plain Linear; shrink before "
            "prune, lowrank and quantize steps"
        )
    if MASK in lin._buffers:
        raise VitcompressError(f"shrink: {name} carries a pruning mask; shrink before pruning")
    return lin


def _linear(old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A new Linear with the kept output ``rows`` and input ``cols`` of ``old``."""
    w = old.weight.detach()
    b = None if old.bias is None else old.bias.detach()
    if rows is not None:
        w = w[rows]
        b = None if b is None else b[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(old.training)
    return new


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _input_moments(
    model: nn.Module, layers: dict[str, nn.Linear], calib: Iterable, max_batches: int
) -> dict:
    """Per input channel of each layer: mean and variance over the tokens of at most
    ``max_batches`` calibration batches (float64)."""
    acc: dict[str, list] = {}

    def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # (tokens, channels)
        n, s, sq = acc.get(name, [0, 0.0, 0.0])
        acc[name] = [n + x.shape[0], s + x.sum(0), sq + (x * x).sum(0)]

    observe_inputs(model, layers, calib, observe, max_batches)
    out = {}
    for name, (n, s, sq) in acc.items():
        mean = s / n
        out[name] = (mean, (sq / n - mean * mean).clamp_min(0))
    return out


def _head_scores(attn: Attention) -> torch.Tensor:
    """``||value rows||_F * ||proj columns||_F`` of each head."""
    h, d = attn.num_heads, attn.head_dim
    w_proj = attn.proj.weight.detach().double()  # (dim, h*d)
    w_v = attn.qkv.weight.detach().double()[2 * h * d :]  # value rows (h*d, dim)
    v = w_v.reshape(h, d, -1).pow(2).sum((1, 2)).sqrt()
    p = w_proj.reshape(w_proj.shape[0], h, d).pow(2).sum((0, 2)).sqrt()
    return v * p


def _neuron_scores(mlp: Mlp, moments: tuple | None) -> torch.Tensor:
    w2 = mlp.fc2.weight.detach().double()  # (dim, hidden)
    if moments is None:
        return mlp.fc1.weight.detach().double().norm(dim=1) * w2.norm(dim=0)
    _, var = moments
    return var * w2.pow(2).sum(0)


def _keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best units, in their original order (ties: the lower index)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def _fold_mean(out: nn.Linear, removed_cols: torch.Tensor, mean: torch.Tensor) -> None:
    """Add what the removed input channels contributed on average to ``out``'s bias."""
    if removed_cols.numel() == 0:
        return
    w = out.weight.detach().double()[:, removed_cols]
    shift = (w @ mean[removed_cols]).to(out.weight.dtype)
    with torch.no_grad():
        if out.bias is None:
            out.bias = nn.Parameter(shift.clone())
        else:
            out.bias.add_(shift)


# --------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------


def _blocks(model: nn.Module, config: ShrinkConfig) -> tuple[list, list]:
    kinds = []
    if config.heads > 0:
        kinds.append(Attention)
    if config.mlp > 0:
        kinds.append(Mlp)
    chosen = select_modules(model, config.targets, config.ignore, tuple(kinds), "shrink")
    attns = [(n, m) for n, m in chosen if isinstance(m, Attention)]
    mlps = [(n, m) for n, m in chosen if isinstance(m, Mlp)]
    for n, block in attns + mlps:
        for attr in ("qkv", "proj") if isinstance(block, Attention) else ("fc1", "fc2"):
            _plain(f"{n}.{attr}", getattr(block, attr))
    return attns, mlps


def shrink_(model: nn.Module, config: ShrinkConfig, calib_data: Iterable | None = None) -> None:
    """Remove heads and MLP neurons of the selected blocks in place (module docstring).

    Raises:
        VitcompressError: a pattern that selects no block, a block whose Linears are not plain
            (already pruned, factorised or quantised), or ``method="activation"`` without
            calibration data.
    """
    _shrink(model, config, calib_data)


def kept_units(
    model: nn.Module, config: ShrinkConfig, calib_data: Iterable | None = None
) -> dict[str, list[int]]:
    """Which heads / MLP neurons of each selected block :func:`shrink_` keeps (their indices,
    in order), found by shrinking a copy: ``model`` is left as it is."""
    import copy

    return {n: r["kept"] for n, r in _shrink(copy.deepcopy(model), config, calib_data).items()}


def _shrink(model: nn.Module, config: ShrinkConfig, calib_data: Iterable | None) -> dict:
    """:func:`shrink_`, returning per block ``{"kind": "heads" | "mlp", "before": n,
    "after": k, "kept": [indices]}``."""
    attns, mlps = _blocks(model, config)
    moments: dict = {}
    if config.method == "activation" and mlps:
        if calib_data is None:
            raise VitcompressError("shrink.method 'activation' needs calibration data")
        layers = {f"{n}.fc2": m.fc2 for n, m in mlps}
        moments = _input_moments(model, layers, calib_data, config.batches)
    report: dict[str, dict] = {}
    for name, attn in attns:
        h, d = attn.num_heads, attn.head_dim
        k = kept_count(h, config.heads)
        heads = _keep(_head_scores(attn), k)
        cols = (heads[:, None] * d + torch.arange(d)).reshape(-1)  # channels of the kept heads
        rows = torch.cat([cols + i * h * d for i in range(3)])  # q, k and v rows of those heads
        attn.qkv = _linear(attn.qkv, rows, None)
        attn.proj = _linear(attn.proj, None, cols)
        attn.num_heads = k
        report[name] = {"kind": "heads", "before": h, "after": k, "kept": heads.tolist()}
    for name, mlp in mlps:
        n = mlp.fc1.out_features
        k = kept_count(n, config.mlp, config.multiple_of)
        mom = moments.get(f"{name}.fc2")
        keep = _keep(_neuron_scores(mlp, mom), k)
        if mom is not None:
            gone = torch.ones(n, dtype=torch.bool)
            gone[keep] = False
            _fold_mean(mlp.fc2, gone.nonzero().reshape(-1), mom[0])
        mlp.fc1 = _linear(mlp.fc1, keep, None)
        mlp.fc2 = _linear(mlp.fc2, None, keep)
        report[name] = {"kind": "mlp", "before": n, "after": k, "kept": keep.tolist()}
    return report


def _widths(model: nn.Module) -> dict[str, dict[str, int]]:
    heads = {n: int(m.num_heads) for n, m in model.named_modules() if isinstance(m, Attention)}
    mlp = {n: int(m.fc1.out_features) for n, m in model.named_modules() if isinstance(m, Mlp)}
    return {"heads": heads, "mlp": mlp}


def shrink_structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{"heads": {attention block: heads}, "mlp": {mlp block: hidden width}}`` of the ViT
    blocks narrower than the model's config builds them (of every block when the model has no
    config): what :func:`restore_shrink_` needs to give a fresh model the same shapes."""
    now = _widths(model)
    if not isinstance(model, VisionTransformer):
        return now
    with torch.device("meta"):
        full = _widths(VisionTransformer(model.cfg))
    return {
        part: {n: k for n, k in widths.items() if full[part].get(n) != k}
        for part, widths in now.items()
    }


def restore_shrink_(model: nn.Module, structure: dict) -> None:
    """Resize the blocks of a freshly built model to ``structure`` (:func:`shrink_structure`);
    the weights are then loaded by name. Blocks already of that size are left alone."""
    for name, k in structure.get("heads", {}).items():
        attn = _get(model, name, Attention)
        if attn.num_heads != k:
            hd = k * attn.head_dim
            attn.qkv = _resized(attn.qkv, attn.qkv.in_features, 3 * hd)
            attn.proj = _resized(attn.proj, hd, attn.proj.out_features)
            attn.num_heads = int(k)
    for name, k in structure.get("mlp", {}).items():
        mlp = _get(model, name, Mlp)
        if mlp.fc1.out_features != k:
            mlp.fc1 = _resized(mlp.fc1, mlp.fc1.in_features, k)
            mlp.fc2 = _resized(mlp.fc2, k, mlp.fc2.out_features)


def _get(model: nn.Module, name: str, kind: type) -> nn.Module:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        m = None
    if not isinstance(m, kind):
        raise VitcompressError(f"shrink: the model has no {kind.__name__} block {name!r}")
    return m


def _resized(old: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)  # fmt: skip


class ShrinkStep(Step):
    kind = "shrink"
    config_cls = ShrinkConfig
    must_precede = ("prune", "lowrank", "quantize")  # they replace the Linears shrink resizes

    def needs_calibration(self, config: ShrinkConfig) -> bool:
        return config.method == "activation" and config.mlp > 0

    def check_layers(self, shadow: nn.Module, config: ShrinkConfig, what: str) -> None:
        kinds = ((Attention,) if config.heads > 0 else ()) + ((Mlp,) if config.mlp > 0 else ())
        select_modules(shadow, config.targets, config.ignore, kinds, what)

    def apply(self, model: nn.Module, config: ShrinkConfig, ctx: StepContext, index: int) -> dict:
        info = _shrink(model, config, ctx.calib_loader)
        return {
            "blocks": {n: {"before": r["before"], "after": r["after"]} for n, r in info.items()}
        }

    def describe(self, model: nn.Module) -> dict | None:
        s = shrink_structure(model)
        return {"structure": s} if s["heads"] or s["mlp"] else None

    def rebuild(self, model: nn.Module, record: dict) -> None:
        restore_shrink_(model, record["structure"])

    def result_fields(
        self, model: nn.Module, config: ShrinkConfig, report: dict | None, so_far: dict
    ) -> dict:
        return {"pattern": "structured"}  # heads and neurons removed: fewer parameters, no zeros


STEP = ShrinkStep()

__all__ = [
    "METHODS",
    "STEP",
    "ShrinkConfig",
    "kept_count",
    "kept_units",
    "restore_shrink_",
    "shrink_",
    "shrink_structure",
]
