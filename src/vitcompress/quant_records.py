"""The structure records of quantised layers: what rebuilds a ``QuantLinear``, a
``QuantMatMul`` or an ``Int8Linear`` (and its activation quantizers and their grids) on a
freshly built model before its weights load. The ``quantize`` step's ``describe`` / ``rebuild``
(:mod:`vitcompress.steps.quantize`) and the packed format use them."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.formats import FloatFormat, Format, IntFormat, get_format
from vitcompress.int8 import Int8Linear
from vitcompress.quantize import ActivationQuantizer, QuantLinear, QuantMatMul
from vitcompress.targets import replace_module


def format_spec(fmt: Format) -> str | dict:
    """A format by name when the name gives it back exactly, else all its fields."""
    try:
        if get_format(fmt.name) == fmt:
            return fmt.name
    except VitcompressError:
        pass
    kind = "int" if isinstance(fmt, IntFormat) else "float"
    return {"kind": kind, **asdict(fmt)}


def format_from_spec(d: str | dict) -> Format:
    if isinstance(d, str):
        return get_format(d)
    d = dict(d)
    kind = d.pop("kind")
    return IntFormat(**d) if kind == "int" else FloatFormat(**d)


def _aq_spec(aq: ActivationQuantizer | None) -> dict | None:
    if aq is None:
        return None
    spec = {"fmt": format_spec(aq.fmt), "dynamic": bool(aq.dynamic), "method": aq.method,
            "percentile": aq.percentile, "dim": aq.dim}  # fmt: skip
    if aq.grid != "uniform":  # uniform records stay as they were
        spec["grid"] = aq.grid
    return spec


def _aq_build(spec: dict | None) -> ActivationQuantizer | None:
    if spec is None:
        return None
    fmt = format_from_spec(spec["fmt"])
    if spec.get("grid", "uniform") != "uniform":
        from vitcompress.quant_grids import GRID_QUANTIZERS

        if spec["grid"] not in GRID_QUANTIZERS:
            raise VitcompressError(f"unknown activation grid {spec['grid']!r} in a record")
        return GRID_QUANTIZERS[spec["grid"]](fmt, spec["dim"])
    return ActivationQuantizer(
        fmt, spec["dynamic"], spec["method"], spec["percentile"], spec["dim"]
    )


def describe_quantized(model: nn.Module) -> dict:
    """Every quantised module of ``model`` with what rebuilds it (``quant_linear``,
    ``quant_matmul``, ``int8_linear``), and the attention blocks whose fused kernel is off
    (``fused_attn``: their dot products run through the quantised MatMul modules)."""
    rec: dict[str, dict] = {
        "quant_linear": {},
        "quant_matmul": {},
        "int8_linear": {},
        "fused_attn": {},
    }
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            rec["quant_linear"][name] = {
                "in": m.in_features, "out": m.out_features,
                "weight_format": format_spec(m.weight_format), "granularity": m.granularity,
                "group_size": m.group_size, "bias": m.bias is not None,
                "input_quant": _aq_spec(m.input_quant),
            }  # fmt: skip
        elif isinstance(m, QuantMatMul):
            rec["quant_matmul"][name] = {"a": _aq_spec(m.a_quant), "b": _aq_spec(m.b_quant)}
        elif isinstance(m, Int8Linear):
            rec["int8_linear"][name] = {
                "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                "input_format": format_spec(m.input_format), "static": not m.dynamic,
            }  # fmt: skip
        if getattr(m, "fused_attn", True) is False:
            rec["fused_attn"][name] = False
    return {k: v for k, v in rec.items() if v}


def rebuild_quantized_(model: nn.Module, rec: dict) -> None:
    """Give a freshly built model the quantised modules :func:`describe_quantized` recorded."""
    for name, q in rec.get("quant_linear", {}).items():
        new = QuantLinear(
            q["in"], q["out"], format_from_spec(q["weight_format"]), q["granularity"],
            q["group_size"], bias=q["bias"], input_quant=_aq_build(q["input_quant"]),
        )  # fmt: skip
        replace_module(model, name, new)
    for name, q in rec.get("quant_matmul", {}).items():
        replace_module(model, name, QuantMatMul(_aq_build(q["a"]), _aq_build(q["b"])))
    for name, q in rec.get("int8_linear", {}).items():
        static = q["static"]
        new = Int8Linear(
            torch.zeros(q["out"], q["in"], dtype=torch.int8),
            torch.ones(q["out"], 1),
            torch.zeros(q["out"]) if q["bias"] else None,
            format_from_spec(q["input_format"]),
            torch.ones(()) if static else None,
            torch.zeros((), dtype=torch.int32) if static else None,
        )
        replace_module(model, name, new)
    for name, fused in rec.get("fused_attn", {}).items():
        model.get_submodule(name).fused_attn = fused


__all__ = ["describe_quantized", "format_from_spec", "format_spec", "rebuild_quantized_"]
