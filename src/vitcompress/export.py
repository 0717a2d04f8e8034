"""ONNX export: fp32, fp16, low-rank (factorised) and INT8 QDQ models that onnxruntime runs.

``export_onnx(model, path, input_shape, metadata)`` writes one ``.onnx`` file with a dynamic
batch dimension (input ``input``, output ``logits``) and the metadata (classes, mean/std, image
size, recipe) in ``metadata_props``; it then loads the file in onnxruntime and records how far
its outputs are from the torch model's (``vitcompress.check`` in the metadata).

INT8 is exported as QDQ: each int8 :class:`~vitcompress.quantize.QuantLinear` (or
:class:`~vitcompress.quantize.Int8Linear`) becomes ``QuantizeLinear -> DequantizeLinear`` on its
input with the calibrated per-tensor scale and zero point, ``DequantizeLinear`` on its int8
weight (per output channel, the codes the torch model computes with) and a ``MatMul``.
onnxruntime fuses each such group into ``MatMulIntegerToFloat`` (an integer GEMM with int32
accumulation); :func:`onnx_ops` lists what it really ran. Two details keep the ONNX model equal
to the torch one:

- our symmetric int8 uses codes [-127, 127] while ONNX int8 saturates at -128, so a ``Max``
  (clip) at ``-127 * scale`` goes before each QuantizeLinear (``clip_restricted=True``; without
  it inputs below the calibrated range quantise one step further than in torch);
- ``act_dtype="uint8"`` stores the same activation codes shifted by 128 (zero point 128), the
  u8 x s8 form that x86 integer kernels (VNNI ``vpdpbusd``) take natively.

Everything else (LayerNorm, softmax, GELU, the attention products unless quantised) stays fp32.
``fused_attention=True`` writes each ViT attention block as onnxruntime's
``com.microsoft.MultiHeadAttention`` kernel (:class:`FusedAttention`): the same maths with about
20 fewer nodes per block, for onnxruntime only (other ONNX consumers do not know the operator).
What cannot be expressed or run is refused with one line: fp8/fp6/fp4 or sub-8-bit
activations, dynamic per-token activation scales (no QDQ form), log2 / twin activation grids
(:mod:`vitcompress.quant_grids`, emulated), per-group weight scales, fp16 export of a quantised
model.

Running, checking and reading the files is :mod:`vitcompress.ort`'s part; there the "peer" path
``quantize_dynamic_onnx`` runs onnxruntime's own ``quantize_dynamic`` on an fp32 export: what a
user would do without us.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.fileio import atomic_path
from vitcompress.optional import need
from vitcompress.ort import (
    INPUT,
    ORT_DOMAIN,
    OUTPUT,
    check_onnx,
    one_line,
    quantize_dynamic_onnx,
    set_metadata,
)
from vitcompress.targets import replace_module

PRECISIONS = ("fp32", "fp16")
ACT_DTYPES = ("int8", "uint8")
EXPORT_FORMATS = ("onnx", "onnx-fp16", "onnx-dynamic", "packed")

# --------------------------------------------------------------------------------------------
# QDQ building blocks: torch maths for tracing, ONNX nodes through ``symbolic``
# --------------------------------------------------------------------------------------------


def _qrange(zp: torch.Tensor) -> tuple[int, int]:
    info = torch.iinfo(zp.dtype)
    return info.min, info.max


class _QuantDequantFn(torch.autograd.Function):
    """Per-tensor ``DequantizeLinear(QuantizeLinear(x))`` with ONNX semantics."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):  # noqa: D102
        lo, hi = _qrange(zero_point)
        z = zero_point.float()
        q = torch.clamp(torch.round(x / scale) + z, lo, hi)
        return (q - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point):  # noqa: D102
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _DequantFn(torch.autograd.Function):
    """``DequantizeLinear(codes, scale, zero_point, axis)`` of an integer weight."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):  # noqa: D102
        shape = [1] * codes.ndim
        shape[axis] = -1
        s = scale.reshape(shape) if scale.ndim else scale
        z = zero_point.reshape(shape).float() if zero_point.ndim else zero_point.float()
        return (codes.float() - z) * s

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):  # noqa: D102
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class _ActQDQ(nn.Module):
    """Static per-tensor activation QDQ (int8 or uint8 codes), with the restricted-range clip."""

    def __init__(self, fmt: Any, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 act_dtype: str, clip_restricted: bool):  # fmt: skip
        super().__init__()
        zp = 0 if zero_point is None else int(zero_point)
        signed_codes = fmt.qmin < 0
        # the code of real 0 in the ONNX dtype; unsigned formats keep their own zero point
        if act_dtype == "uint8":
            shift = 128 if signed_codes else 0
            onnx_zp, dtype, onnx_min = zp + shift, torch.uint8, 0
        else:
            if not signed_codes:
                raise VitcompressError(
                    f"act_dtype 'int8' cannot hold {fmt.name} activations; use act_dtype 'uint8'"
                )
            shift, onnx_zp, dtype, onnx_min = 0, zp, torch.int8, -128
        s = scale.detach().float().reshape(())
        self.register_buffer("scale", s.clone())
        self.register_buffer("zero_point", torch.tensor(onnx_zp, dtype=dtype))
        clip = clip_restricted and fmt.qmin + shift > onnx_min
        self.register_buffer("clip_min", ((fmt.qmin - zp) * s).reshape(()) if clip else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip_min is not None:
            x = torch.maximum(x, self.clip_min)
        return _QuantDequantFn.apply(x, self.scale, self.zero_point)


class QDQLinear(nn.Module):
    """What an int8 Linear becomes in ONNX: QDQ(x) @ DQ(int8 codes, per-channel) + bias.

    ``input_qdq`` None means weight-only (fp32 activations).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bias: torch.Tensor | None, input_qdq: _ActQDQ | None):  # fmt: skip
        super().__init__()
        out_f, in_f = codes.shape
        dt = torch.uint8 if codes.dtype == torch.uint8 else torch.int8  # int4 codes fit int8
        self.register_buffer("codes_t", codes.t().contiguous().to(dt))  # (in, out)
        per_channel = scale.numel() > 1
        s = scale.detach().float().reshape(-1) if per_channel else scale.float().reshape(())
        self.register_buffer("scale", s.clone())
        zp = torch.zeros_like(s, dtype=dt) if zero_point is None else zero_point.reshape(s.shape)
        self.register_buffer("zero_point", zp.to(dt).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.input_qdq = input_qdq
        self.axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        w = _DequantFn.apply(self.codes_t, self.scale, self.zero_point, self.axis)  # (in, out)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


class QDQMatMul(nn.Module):
    """Both inputs of an attention product through static per-tensor QDQ."""

    def __init__(self, a: _ActQDQ, b: _ActQDQ):
        super().__init__()
        self.a_qdq = a
        self.b_qdq = b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.a_qdq(a), self.b_qdq(b))


class _MultiHeadAttentionFn(torch.autograd.Function):
    """Softmax attention over ``(B, N, H*D)`` queries, keys and values (heads side by side in
    the last dimension), exported as one ``com.microsoft::MultiHeadAttention`` node."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads, scale):  # noqa: D102
        B, N, C = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, -1, num_heads, C // num_heads).transpose(1, 2)

        o = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                                             scale=scale)  # fmt: skip
        return o.transpose(1, 2).reshape(B, N, C)

    @staticmethod
    def symbolic(g, q, k, v, num_heads, scale):  # noqa: D102
        out = g.op(f"{ORT_DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=num_heads,
                   scale_f=scale)  # fmt: skip
        out.setType(q.type())
        return out


class FusedAttention(nn.Module):
    """A ViT attention block as onnxruntime's fused ``MultiHeadAttention`` contrib operator.

    The qkv projection (float, low-rank or int8 QDQ) stays as it is; its output is split into
    q, k, v with constant sizes, so the graph has no shape arithmetic, and the head split,
    ``Q.K^T``, softmax, ``A.V`` and head merge (about 20 nodes per block, most of them layout
    ops) become one kernel. The maths is unchanged (fp32), so logits match the unfused export.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim = int(attn.num_heads), int(attn.head_dim)
        self.scale = float(attn.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.num_heads * self.head_dim  # a constant, not x.shape[-1]: no Shape node
        q, k, v = self.qkv(x).split([c, c, c], dim=-1)
        return self.proj(_MultiHeadAttentionFn.apply(q, k, v, self.num_heads, self.scale))


def fuse_attention_(model: nn.Module) -> int:
    """Replace every ViT attention block of an exportable model (:func:`prepare_for_onnx`)
    by :class:`FusedAttention`, in place; returns how many were replaced.

    Raises:
        VitcompressError: an attention block whose dot products are quantised (their QDQ
            cannot sit inside the fused kernel), or a model with no ViT attention block.
    """
    from vitcompress.models.vit import Attention

    blocks = [(n, a) for n, a in model.named_modules() if isinstance(a, Attention)]
    for name, attn in blocks:
        if isinstance(attn.qk_matmul, QDQMatMul) or isinstance(attn.av_matmul, QDQMatMul):
            raise VitcompressError(
                f"export: {name} quantises its attention products (attention_matmul int8), "
                "which the fused MultiHeadAttention kernel computes in fp32; export without "
                "fused attention"
            )
    if not blocks:
        raise VitcompressError(
            "export: fused attention needs ViT attention blocks (vitcompress.models.vit."
            "Attention); this model has none"
        )
    for name, attn in blocks:
        replace_module(model, name, FusedAttention(attn))
    return len(blocks)


class _CastWrapper(nn.Module):
    """fp32 in and out around a model run in another dtype (the graph holds the casts)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


# --------------------------------------------------------------------------------------------
# Turning our modules into exportable ones
# --------------------------------------------------------------------------------------------


def _act_qdq(aq: Any, where: str, act_dtype: str, clip: bool) -> _ActQDQ:
    from vitcompress.formats import IntFormat

    fmt = aq.fmt
    if aq.grid != "uniform":
        raise VitcompressError(
            f"export: {where} quantises activations on a {aq.grid} grid, which has no ONNX QDQ "
            "form (it is emulated); quantise with softmax_quant/gelu_quant: uniform to export"
        )
    if not isinstance(fmt, IntFormat):
        raise VitcompressError(
            f"export: {where} quantises activations to {fmt.name}; ONNX/onnxruntime QDQ runs "
            "integer activations only (use activations: int8, or export without quantization)"
        )
    if fmt.bits != 8:
        raise VitcompressError(
            f"export: {where} has {fmt.name} activations; ONNX QDQ saturates at 8 bits, so only "
            "int8/uint8 activations export exactly"
        )
    if aq.dynamic:
        raise VitcompressError(
            f"export: {where} uses dynamic per-token activation scales, which have no QDQ form; "
            "quantise with calibrated static activations, or use format onnx-dynamic"
        )
    if not bool(aq.calibrated):
        raise VitcompressError(f"export: {where} is not calibrated")
    return _ActQDQ(fmt, aq.scale, aq.zero_point, act_dtype, clip)


def _from_quant_linear(name: str, m: Any, act_dtype: str, clip: bool) -> nn.Module:
    from vitcompress.formats import IntFormat

    fmt = m.weight_format
    if isinstance(fmt, IntFormat):
        if m.granularity not in ("per_channel", "per_tensor"):
            raise VitcompressError(
                f"export: {name} has {m.granularity} weight scales; ONNX DequantizeLinear (opset "
                "< 21) takes per-tensor or per-channel scales: quantise with per_channel"
            )
        aq = None if m.input_quant is None else _act_qdq(m.input_quant, name, act_dtype, clip)
        return QDQLinear(m.qweight, m.weight_scale, m.weight_zero_point, m.bias, aq)
    if m.weight_scale is None and m.input_quant is None:
        # fp16 / bf16 / tf32 weights, fp32 activations: an fp32 Linear with those exact values
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.weight)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        return lin
    what = fmt.name + (" activations" if m.weight_scale is None else " weights")
    raise VitcompressError(
        f"export: {name} has {what}; onnxruntime's CPU provider has no kernels for them. "
        "Export int8 (QDQ), fp16 (format onnx-fp16) or fp32"
    )


def prepare_for_onnx(model: nn.Module, act_dtype: str = "uint8", clip_restricted: bool = True
                     ) -> tuple[nn.Module, str]:  # fmt: skip
    """A copy of ``model`` with our layers replaced by exportable ones; ``(copy, kind)``.

    ``kind`` is ``"fp32"``, ``"int8-qdq"`` (quantised activations) or ``"int8-weight-only"``.
    """
    from vitcompress.int8 import Int8Linear
    from vitcompress.quantize import QuantLinear, QuantMatMul
    from vitcompress.sparse_exec import SparseLinear

    if act_dtype not in ACT_DTYPES:
        raise VitcompressError(f"act_dtype must be one of {ACT_DTYPES}, got {act_dtype!r}")
    m = copy.deepcopy(model).cpu().eval()
    kinds = set()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantLinear):
            new = _from_quant_linear(name, mod, act_dtype, clip_restricted)
            if isinstance(new, QDQLinear):
                kinds.add("qdq" if new.input_qdq is not None else "weight-only")
        elif isinstance(mod, Int8Linear):
            if mod.dynamic:
                raise VitcompressError(
                    f"export: {name} quantises activations per token at run time, which has no "
                    "QDQ form; use calibrated static activations, or format onnx-dynamic"
                )
            aq = _ActQDQ(mod.input_format, mod.input_scale, mod.input_zero_point, act_dtype,
                         clip_restricted)  # fmt: skip
            new = QDQLinear(mod.qweight, mod.weight_scale, None, mod.bias, aq)
            kinds.add("qdq")
        elif isinstance(mod, QuantMatMul):
            new = QDQMatMul(
                _act_qdq(mod.a_quant, name + ".a", act_dtype, clip_restricted),
                _act_qdq(mod.b_quant, name + ".b", act_dtype, clip_restricted),
            )
            kinds.add("qdq")
        elif isinstance(mod, SparseLinear):
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                new.weight.copy_(mod.dense_weight())
                if mod.bias is not None:
                    new.bias.copy_(mod.bias)
        else:
            continue
        replace_module(m, name, new)
    kind = "int8-qdq" if "qdq" in kinds else ("int8-weight-only" if kinds else "fp32")
    return m, kind


# --------------------------------------------------------------------------------------------
# Export, check, metadata
# --------------------------------------------------------------------------------------------


def _torch_export(m: nn.Module, x: torch.Tensor, opset: int, ort_ops: bool = False) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        try:
            torch.onnx.export(
                m,
                (x,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                do_constant_folding=True,
                custom_opsets={ORT_DOMAIN: 1} if ort_ops else None,
            )
        except Exception as e:  # the exporter raises many types
            raise VitcompressError(f"export: torch.onnx.export failed ({one_line(e)})") from None
    return buf.getvalue()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    metadata: dict | None = None,
    opset: int = 17,
    precision: str = "fp32",
    act_dtype: str = "uint8",
    clip_restricted: bool = True,
    check: bool = True,
    fused_attention: bool = False,
) -> Path:
    """Export ``model`` to ONNX at ``path`` (module docstring); returns the path.

    Args:
        model: a float model (dense, pruned, low-rank) or one quantised by
            :func:`~vitcompress.quantize.quantize_` (int8, static activations) or made real int8
            by :func:`~vitcompress.quantize.to_int8_`.
        input_shape: one image, ``(C, H, W)``; the batch dimension is dynamic.
        metadata: stored in ``metadata_props`` (values that are not strings as JSON).
        opset: ONNX opset, 13 or later (per-channel DequantizeLinear needs 13).
        precision: ``fp32``, or ``fp16`` (a float model run in half precision; fp32 in and out).
        act_dtype: ONNX type of the activation codes of int8 models, ``uint8`` or ``int8``.
        clip_restricted: keep symmetric int8 activations at [-127, 127] as in torch.
        check: load the file in onnxruntime, compare with ``model`` on a random batch of 2,
            and store the result under ``vitcompress.check``.
        fused_attention: each ViT attention block as onnxruntime's ``MultiHeadAttention``
            contrib operator (:class:`FusedAttention`): faster in onnxruntime, but a
            ``com.microsoft`` operator that other ONNX consumers (FPGA tool flows) do not know.

    Raises:
        VitcompressError: an unsupported combination, an exporter failure, or a model that
            onnxruntime cannot load or run (one line).
    """
    onnx = need("onnx", "ONNX export")
    need("onnxruntime", "ONNX export (every export is checked in onnxruntime)")

    if precision not in PRECISIONS:
        raise VitcompressError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(opset, int) or opset < 13:
        raise VitcompressError(f"opset must be an integer >= 13 (per-channel QDQ), got {opset!r}")
    input_shape = tuple(int(s) for s in input_shape)
    m, fmt = prepare_for_onnx(model, act_dtype, clip_restricted)
    if fused_attention:
        fuse_attention_(m)
    if precision == "fp16":
        if fmt != "fp32":
            raise VitcompressError(
                "export: precision fp16 is for float models; this one is quantised "
                f"({fmt}): export it with precision fp32"
            )
        m, fmt = _CastWrapper(m, torch.float16), "fp16"
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    proto = onnx.load_from_string(_torch_export(m, x, opset, ort_ops=fused_attention))
    meta = {"vitcompress.format": fmt, "vitcompress.input_shape": list(input_shape)}
    if fused_attention:
        meta["vitcompress.attention"] = f"{ORT_DOMAIN}.MultiHeadAttention"
    if fmt == "int8-qdq":
        meta["vitcompress.act_dtype"] = act_dtype
    if check:
        meta["vitcompress.check"] = check_onnx(proto.SerializeToString(), model, input_shape)
    set_metadata(proto, {**(metadata or {}), **meta})
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


# --------------------------------------------------------------------------------------------
# Entry point for the CLI
# --------------------------------------------------------------------------------------------


def run_metadata(config: dict) -> dict:
    """What a deployment needs to feed the model: classes, preprocessing, size, recipe."""
    data = config.get("data") or {}
    model = config.get("model") or {}
    meta = {
        "classes": data.get("classes"),
        "mean": data.get("mean"),
        "std": data.get("std"),
        "img_size": model.get("img_size"),
        "in_chans": model.get("in_chans"),
        "model": model.get("preset") or model.get("arch"),
        "recipe": config.get("recipe"),
    }
    return {k: v for k, v in meta.items() if v is not None}


def input_shape_of(config: dict) -> tuple[int, int, int]:
    model = config.get("model") or {}
    try:
        return int(model["in_chans"]), int(model["img_size"]), int(model["img_size"])
    except (KeyError, TypeError, ValueError):
        raise VitcompressError("config['model'] needs in_chans and img_size") from None


def export_cli(checkpoint: Path, fmt: str, out: Path, fused_attention: bool = False) -> Path:
    """``vitcompress export``: the run directory ``checkpoint`` as ``fmt`` at ``out``.

    Formats: ``onnx`` (fp32 for float models, INT8 QDQ for int8-quantised ones), ``onnx-fp16``,
    ``onnx-dynamic`` (onnxruntime's quantize_dynamic of the fp32 export), ``packed``.
    ``fused_attention``: ONNX formats only (:func:`export_onnx`).
    """
    from vitcompress.outputs import check_output_file, output_lock
    from vitcompress.runs import load_run

    if fmt not in EXPORT_FORMATS:
        raise VitcompressError(f"unknown export format {fmt!r}; choose from {EXPORT_FORMATS}")
    if fused_attention and not fmt.startswith("onnx"):
        raise VitcompressError(f"fused attention is an ONNX option; format {fmt!r} has no graph")
    out = Path(out)
    check_output_file(
        out, inputs=list(Path(checkpoint).glob("*")) if Path(checkpoint).is_dir() else []
    )
    model, config = load_run(Path(checkpoint))
    with output_lock(out):
        return _export(model, config, fmt, out, fused_attention)


def _export(model: nn.Module, config: dict, fmt: str, out: Path, fused_attention: bool) -> Path:
    if fmt == "packed":
        from vitcompress.pack import save_packed

        save_packed(model, out, config)
        return out
    shape = input_shape_of(config)
    meta = run_metadata(config)
    fused = {"fused_attention": fused_attention}
    if fmt == "onnx-fp16":
        return export_onnx(model, out, shape, meta, precision="fp16", **fused)
    if fmt == "onnx-dynamic":
        import tempfile

        _, kind = prepare_for_onnx(model)
        if kind != "fp32":
            raise VitcompressError(
                "export: onnx-dynamic quantises an fp32 model itself; this one is already "
                f"quantised ({kind}): use format onnx"
            )
        with tempfile.TemporaryDirectory() as d:
            fp32 = export_onnx(model, Path(d) / "fp32.onnx", shape, meta, **fused)
            return quantize_dynamic_onnx(fp32, out)
    return export_onnx(model, out, shape, meta, **fused)


__all__ = [
    "EXPORT_FORMATS",
    "FusedAttention",
    "QDQLinear",
    "QDQMatMul",
    "export_cli",
    "export_onnx",
    "fuse_attention_",
    "prepare_for_onnx",
]
