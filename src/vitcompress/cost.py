"""What a model costs in hardware terms, per layer and in total: MACs, BOPs, weight bits
stored, activation memory, and the formats each layer really runs in.

For one image (batch 1), every layer that multiplies: Linear-like layers (``nn.Linear``,
quantised and int8 layers, the factors of a low-rank layer), the patch-embedding convolution and
the attention dot products (``MatMul``: Q.K^T and A.V).

- ``macs``: multiply-accumulates as a dense kernel runs them (tokens x in x out for a Linear,
  heads x N x N x head_dim for a dot product); ``macs_nonzero``: those with a non-zero weight,
  what a kernel that skips zeros (an FPGA, a sparse core) would run. Structured pruning and low
  rank really shrink the layers, so both count them.
- ``bops``: bit operations, ``macs x weight bits x activation bits`` (for a dot product,
  ``macs x a bits x b bits``), the cost model of Baskin et al. and QONNX; ``bops_nonzero`` the
  same over the non-zero MACs. An fp32 layer counts 32 x 32.
- ``weight_bits``: the bits the layer's tensors take in the packed file (``pack.py``): codes,
  scales, bitmasks or N:M positions, biases; the totals' ``weight_bits`` is over every tensor of
  the model (norms and embeddings too), i.e. 8 x the packed payload.
- ``act_bytes``: the layer's input plus output at their precision; the model's
  ``peak_act_bytes`` estimates the peak activation memory of a layer-by-layer executor: the
  largest ``act_bytes`` of one layer plus the residual stream (tokens x width in fp32) it must
  keep alive meanwhile.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.int8 import Int8Linear
from vitcompress.models.vit import MatMul
from vitcompress.pack import stored_bytes_by_tensor
from vitcompress.quantize import ActivationQuantizer, QuantLinear, QuantMatMul

FLOAT_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # linear | conv | matmul
    weight_format: str | None  # None for a dot product of two activations
    act_format: str
    macs: int
    macs_nonzero: int
    bops: int
    bops_nonzero: int
    weight_bits: int
    act_bytes: int


def _fmt_of_quantizer(q: ActivationQuantizer | None, default: str = "fp32") -> tuple[str, int]:
    if q is None:
        return default, 32
    return q.fmt.name, int(q.fmt.bits)


def _weight_format(m: nn.Module) -> tuple[str, int]:
    if isinstance(m, QuantLinear):
        return m.weight_format.name, int(m.weight_format.bits)
    if isinstance(m, Int8Linear):
        return "int8", 8
    dt = m.weight.dtype
    return str(dt).removeprefix("torch."), FLOAT_BITS.get(dt, 32)


def _act_format(m: nn.Module) -> tuple[str, int]:
    if isinstance(m, QuantLinear):
        return _fmt_of_quantizer(m.input_quant)
    if isinstance(m, Int8Linear):
        return m.input_format.name, 8
    dt = getattr(getattr(m, "weight", None), "dtype", torch.float32)
    return str(dt).removeprefix("torch."), FLOAT_BITS.get(dt, 32)


def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d, QuantLinear, Int8Linear))


def _nonzero_fraction(m: nn.Module) -> float:
    w = m.qweight if isinstance(m, Int8Linear) else m.weight
    w = w.detach()
    return float(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0


def tensor_bytes(model: nn.Module, config: dict | None = None) -> dict[str, int]:
    """Bytes of each state-dict tensor as packed; a model the packer cannot rebuild (no
    config, or an execution format) counts its tensors as they are in memory."""
    if _packable(model):
        try:
            return stored_bytes_by_tensor(model, config)
        except VitcompressError:
            pass
    return {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}


def layer_costs(
    model: nn.Module, input_shape: tuple[int, ...], config: dict | None = None
) -> list[LayerCost]:
    """The cost of every multiplying layer of ``model`` for one image of ``input_shape``."""
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    outs: dict[str, tuple[int, ...]] = {}
    probe = copy.deepcopy(model).eval()
    for m in probe.modules():  # the dot products run through their MatMul modules
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    hooks = []
    for name, m in probe.named_modules():
        if _is_weight_layer(m) or isinstance(m, (MatMul, QuantMatMul)):

            def hook(mod, inputs, output, name=name):
                shapes[name] = tuple(tuple(t.shape) for t in inputs if torch.is_tensor(t))
                out = output[0] if isinstance(output, tuple) else output
                outs[name] = tuple(out.shape)

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            dtype = next((p.dtype for p in probe.parameters() if p.is_floating_point()), None)
            probe(torch.zeros((1, *input_shape), dtype=dtype or torch.float32))
    finally:
        for h in hooks:
            h.remove()
    stored = tensor_bytes(model, config)
    modules = dict(model.named_modules())
    rows = []
    for name, m in modules.items():
        if name not in shapes:
            continue
        ins, out = shapes[name], outs[name]
        if isinstance(m, (MatMul, QuantMatMul)):
            a, b = ins  # (..., N, K) @ (..., K, M)
            macs = math.prod(a[:-1]) * a[-1] * b[-1]
            fa, ba = _fmt_of_quantizer(getattr(m, "a_quant", None))
            fb, bb = _fmt_of_quantizer(getattr(m, "b_quant", None))
            rows.append(LayerCost(name, "matmul", None, f"{fa} x {fb}", macs, macs, macs * ba * bb,
                                  macs * ba * bb, 0,
                                  _bytes(a, ba) + _bytes(b, bb) + _bytes(out, 32)))  # fmt: skip
            continue
        wname, wbits = _weight_format(m)
        aname, abits = _act_format(m)
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            macs = math.prod(out) * (m.in_channels // m.groups) * kh * kw  # out: (1, C, H, W)
            kind = "conv"
        else:
            tokens = math.prod(ins[0][:-1])
            macs = tokens * m.in_features * m.out_features
            kind = "linear"
        nz = round(macs * _nonzero_fraction(m))
        bits = 8 * sum(v for k, v in stored.items() if k.rpartition(".")[0] == name)
        rows.append(LayerCost(name, kind, wname, aname, macs, nz, macs * wbits * abits,
                              nz * wbits * abits, bits,
                              _bytes(ins[0], abits) + _bytes(out, 32)))  # fmt: skip
    return rows


def _bytes(shape: tuple[int, ...], bits: int) -> int:
    return math.ceil(math.prod(shape) * bits / 8)


def _packable(model: nn.Module) -> bool:
    return not any(getattr(m, "execution_only", False) for m in model.modules())


def model_cost(model: nn.Module, input_shape: tuple[int, ...], config: dict | None = None) -> dict:
    """Totals over :func:`layer_costs`, plus every tensor's stored bits and the peak activation
    estimate: the result fields ``macs``, ``macs_nonzero``, ``bops``, ``bops_nonzero``,
    ``weight_bits`` and ``peak_act_bytes``."""
    rows = layer_costs(model, input_shape, config)
    stored = tensor_bytes(model, config)
    width = getattr(getattr(model, "cfg", None), "embed_dim", None)
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", 0) + getattr(
        model, "num_prefix_tokens", 0
    )
    stream = tokens * width * 4 if width else 0
    return {
        "macs": sum(r.macs for r in rows),
        "macs_nonzero": sum(r.macs_nonzero for r in rows),
        "bops": sum(r.bops for r in rows),
        "bops_nonzero": sum(r.bops_nonzero for r in rows),
        "weight_bits": 8 * sum(stored.values()),
        "peak_act_bytes": max((r.act_bytes for r in rows), default=0) + stream,
    }


COST_FIELDS = ("macs", "macs_nonzero", "bops", "bops_nonzero", "weight_bits", "peak_act_bytes")


def cost_report(model: nn.Module, input_shape: tuple[int, ...], config: dict | None = None) -> dict:
    """Per layer and in total, as ``vitcompress cost --json`` prints it."""
    return {
        "layers": [asdict(r) for r in layer_costs(model, input_shape, config)],
        "total": model_cost(model, input_shape, config),
    }


def format_cost(report: dict) -> str:
    """A plain-text table of :func:`cost_report`."""
    head = ("layer", "weights", "activations", "MMACs", "MMACs nz", "GBOPs", "KB stored")
    lines = [
        (r["name"], r["weight_format"] or "-", r["act_format"], f"{r['macs'] / 1e6:.3f}",
         f"{r['macs_nonzero'] / 1e6:.3f}", f"{r['bops'] / 1e9:.3f}",
         f"{r['weight_bits'] / 8192:.1f}")
        for r in report["layers"]
    ]  # fmt: skip
    t = report["total"]
    lines.append(("total", "", "", f"{t['macs'] / 1e6:.3f}", f"{t['macs_nonzero'] / 1e6:.3f}",
                  f"{t['bops'] / 1e9:.3f}", f"{t['weight_bits'] / 8192:.1f}"))  # fmt: skip
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]

    def line(cells: tuple[Any, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip

    out = [line(head), line(tuple("-" * w for w in widths)), *map(line, lines)]
    out.append(f"peak activation memory (estimate): {t['peak_act_bytes'] / 1024:.1f} KB")
    return "\n".join(out)


__all__ = ["COST_FIELDS", "LayerCost", "cost_report", "format_cost", "layer_costs", "model_cost"]
