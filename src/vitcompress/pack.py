"""Packed checkpoints: one safetensors file holding the weights as they are compressed.

``save_packed(model, path, config)`` writes, ``load_packed(path)`` gives back a model whose
state dict is bit-identical (so its logits are ``torch.equal`` to the saved model's), and
``bytes_stored(model, config)`` is the size of that file: the ``bytes_stored`` of a result.

Every tensor of the state dict is stored losslessly in the fewest bytes we know how to decode:

- element codecs: fp32 values that are exactly fp16 or bf16 take 2 bytes, tf32 values (low 13
  mantissa bits zero) 3 bytes; fp16 / bf16 / fp8 tensors their own width; integer tensors
  (quantised codes) ``ceil(log2(max - min + 1))`` bits each, bit-packed (int4 codes: 4 bits,
  int8: 8), integer constants nothing, a float repeated (an expanded per-tensor scale) once;
- layouts: dense, ``scaled`` (values that are small integer codes times one 2-byte scale per
  slice along dim 0 or per tensor, as ``quantize``'s ``rest: int8`` leaves them: the codes
  bit-packed plus the scales), ``bitmask`` (the kept values + one bit per element,
  ``np.packbits``), ``nm`` (N kept values per group of M + their positions, ``ceil(log2 M)``
  bits each: 2 bits for 2:4) or ``zeros``; per tensor the smallest wins;
- derived tensors are not stored at all: the fp32 ``weight`` of a :class:`QuantLinear` is
  recomputed from its integer or float codes and scales, and a pruning mask ``weight_mask`` is
  the support of its sparse weight. Each derivation is checked bit for bit while saving; a
  tensor that does not round-trip exactly is stored plainly instead.

Structure: the file's header (zlib-compressed JSON in a uint8 tensor) holds ``config``
(``config["model"]`` builds the dense model) and a description of the compressed modules
(low-rank ranks, quantised layers with their formats, int8 layers, masks, attention paths), from
which :func:`load_packed` rebuilds the tree before the weights load. Saving first rebuilds that
tree on the meta device and refuses a model it could not load back.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.lowrank import LOWRANK_TYPES, restore_lowrank_
from vitcompress.models import build_model
from vitcompress.models.checkpoints import atomic_write_bytes
from vitcompress.shrink import restore_shrink_, shrink_structure
from vitcompress.sparsity import MASK

META_KEY = "vitcompress.pack"
VERSION = 2  # 2: one compressed header + one data blob (1: a tensor per blob)
NM_CANDIDATES = (4, 8, 16)  # group sizes M tried for the N:M layout
_CHUNK = 1 << 20  # elements per bit-packing chunk (bounds temporary memory)

_INT_BY_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Bit packing and element codecs (1-D tensors in, blobs out)
# --------------------------------------------------------------------------------------------


def pack_bits(u: np.ndarray, n: int) -> np.ndarray:
    """Pack unsigned values ``u`` (< 2**n, n <= 8) into ``ceil(len(u) * n / 8)`` bytes."""
    u = np.ascontiguousarray(u, dtype=np.uint8)
    if n == 8:
        return u
    out = []
    for i in range(0, len(u), _CHUNK):  # _CHUNK is a multiple of 8: chunks end on byte bounds
        bits = np.unpackbits(u[i : i + _CHUNK, None], axis=1)[:, 8 - n :]  # (L, n) MSB first
        out.append(np.packbits(bits.reshape(-1)))
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def unpack_bits(p: np.ndarray, n: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``length`` values of ``n`` bits."""
    p = np.ascontiguousarray(p, dtype=np.uint8)
    if n == 8:
        return p[:length].copy()
    out = []
    per = _CHUNK * n // 8  # bytes per chunk
    for i in range(0, length, _CHUNK):
        L = min(_CHUNK, length - i)
        start = i * n // 8
        bits = np.unpackbits(p[start : start + per])[: L * n].reshape(L, n)
        full = np.zeros((L, 8), np.uint8)
        full[:, 8 - n :] = bits
        out.append(np.packbits(full, axis=1).reshape(L))
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as a signed integer tensor of the same width (bool as uint8)."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point():
        return t.view(_INT_BY_WIDTH[t.element_size()] if t.element_size() > 1 else torch.uint8)
    return t


def _scatter(flat: torch.Tensor, where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``flat[where] = values`` bit for bit (no float arithmetic, -0.0 and NaN kept)."""
    if flat.dtype == torch.bool:
        flat[where] = values
    else:
        _bits_view(flat)[where] = _bits_view(values)
    return flat


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits_view(a), _bits_view(b))


def _enc_float32(v: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """fp32 values in 2 bytes (exact fp16 / bf16), 3 bytes (exact tf32) or 4."""
    if v.numel() and _same_bits(v.half().float(), v):
        return {"codec": "f16"}, v.half()
    bits = v.view(torch.int32)
    if not bool((bits & 0xFFFF).any()):  # the low half is zero: bf16 is exact (bit shift, so
        return {"codec": "bf16"}, (bits >> 16).to(torch.int16).view(torch.bfloat16)  # NaNs too)
    if not bool((bits & 0xFF).any()):  # tf32 (10 mantissa bits) has its low 13 bits zero
        return {"codec": "top3"}, v.view(torch.uint8).reshape(-1, 4)[:, 1:].reshape(-1).clone()
    return {"codec": "raw"}, v


def _enc_int(v: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """Integers as ``min + u`` with ``u`` bit-packed in ``ceil(log2(span + 1))`` bits."""
    if v.numel() == 0:
        return {"codec": "const", "value": 0}, None
    lo, hi = int(v.min()), int(v.max())
    n = (hi - lo).bit_length()
    if n == 0:
        return {"codec": "const", "value": lo}, None
    if n <= 8:
        u = (v.to(torch.int64) - lo).to(torch.uint8).numpy()
        return {"codec": "bits", "bits": n, "offset": lo}, torch.from_numpy(pack_bits(u, n))
    for dt in (torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return {"codec": "narrow", "as": _dtype_name(dt)}, v.to(dt)
    return {"codec": "raw"}, v


def encode_values(v: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """The smallest exact encoding of a 1-D tensor; returns (meta, blob or None)."""
    v = v.contiguous().reshape(-1)
    if v.numel() > 1 and v.is_floating_point() and bool((_bits_view(v) == _bits_view(v[:1])).all()):
        meta, blob = encode_values(v[:1])  # one value repeated (a per-tensor scale, expanded)
        return {"codec": "repeat", "elem": meta}, blob
    if v.dtype == torch.float32:
        return _enc_float32(v)
    if v.dtype == torch.bool:
        return {"codec": "bool"}, torch.from_numpy(np.packbits(v.numpy()))
    if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return {"codec": "u8view"}, v.view(torch.uint8)
    if not v.is_floating_point():
        return _enc_int(v)
    return {"codec": "raw"}, v  # float16, bfloat16, float64


def decode_values(
    meta: dict, blob: torch.Tensor | None, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`encode_values`: ``n`` values of ``dtype``."""
    codec = meta["codec"]
    if codec == "repeat":
        return decode_values(meta["elem"], blob, 1, dtype).expand(n).clone()
    if codec == "const":
        return torch.full((n,), int(meta["value"]), dtype=dtype)
    if codec == "raw":
        out = blob
    elif codec == "f16":
        out = blob.float()
    elif codec == "bf16":
        out = (blob.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    elif codec == "top3":
        full = torch.zeros(n, 4, dtype=torch.uint8)
        full[:, 1:] = blob.reshape(n, 3)
        out = full.reshape(-1).view(torch.float32)
    elif codec == "bits":
        u = unpack_bits(blob.numpy(), int(meta["bits"]), n)
        out = torch.from_numpy(u.astype(np.int64)) + int(meta["offset"])
    elif codec == "narrow":
        out = blob
    elif codec == "bool":
        out = torch.from_numpy(np.unpackbits(blob.numpy())[:n].astype(bool))
    elif codec == "u8view":
        out = blob.view(dtype)
    else:
        raise VitcompressError(f"unknown element codec {codec!r}")
    if out.numel() != n:
        raise VitcompressError(f"decoded {out.numel()} values, expected {n}")
    return out.to(dtype)


# --------------------------------------------------------------------------------------------
# Layouts: which elements are stored
# --------------------------------------------------------------------------------------------


def _blob_bytes(blobs: dict[str, torch.Tensor]) -> int:
    return sum(b.numel() * b.element_size() for b in blobs.values())


def _nm_positions(support: torch.Tensor, m: int, n: int | None) -> torch.Tensor | None:
    """Per group of ``m``, the sorted positions of its ``n`` kept elements, padded with pruned
    positions where a group keeps fewer (None when ``n`` is given and a group differs)."""
    groups = support.reshape(-1, m)  # (G, m)
    counts = groups.sum(1)
    if n is not None and not bool((counts == n).all()):
        return None
    k = int(counts.max()) if n is None else n
    if k >= m:
        return None  # some group is full: nothing to gain
    # kept positions first (in order), then pruned ones: a stable sort on "not kept"
    order = torch.argsort((~groups).to(torch.int8), dim=1, stable=True)[:, :k]
    return order.sort(dim=1).values  # (G, k)


SCALED_QMAX = (127, 63, 31, 15, 7, 3, 1)  # symmetric grids the "scaled" layout looks for


def scaled_codes(flat: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(codes, scales)`` with ``flat == (codes * scales[:, None]).reshape(-1)`` bit for bit,
    ``groups`` scales of 2 bytes (fp16 or bf16 exact) and ``|codes| <= qmax`` for one of
    :data:`SCALED_QMAX`; None when ``flat`` (fp32) is not of that form.

    The largest magnitude of each group must be ``qmax * scale`` exactly, which is what
    ``quantize.fake_quant_slices`` guarantees; the cheap test on the scales rejects ordinary
    float tensors before any division of the whole tensor.
    """
    if flat.dtype != torch.float32 or flat.numel() == 0 or flat.numel() % groups:
        return None
    g = flat.reshape(groups, -1)
    amax = g.abs().amax(dim=1)
    if not bool(torch.isfinite(amax).all()):
        return None
    for qmax in SCALED_QMAX:
        s = amax / qmax
        two_bytes = _same_bits(s.bfloat16().float(), s) or _same_bits(s.half().float(), s)
        if not two_bytes or not torch.equal(s * qmax, amax):
            continue
        codes = torch.round(g / torch.where(s > 0, s, 1.0).unsqueeze(1))
        if bool((codes.abs() > qmax).any()):
            continue
        codes = codes.to(torch.int8)  # -0.0 becomes 0: a -0.0 value fails the check below
        if _same_bits(codes.float() * s.unsqueeze(1), g):
            return codes.reshape(-1), s
    return None


def encode_tensor(t: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[dict, dict]:
    """The smallest exact encoding of ``t``; with ``mask`` (True = kept) the stored support is
    the mask itself, so that the mask can be rebuilt from it (module docstring).

    Returns ``(meta, blobs)`` with blob names as suffixes (``v`` values, ``m`` bitmask,
    ``i`` N:M positions).
    """
    flat = t.detach().cpu().contiguous().reshape(-1)
    nbits = _bits_view(flat)
    support = (nbits != 0) if mask is None else mask.detach().cpu().reshape(-1).bool()
    cands: list[tuple[dict, dict]] = []

    def add(meta: dict, values: torch.Tensor, extra: dict) -> None:
        vmeta, blob = encode_values(values)
        blobs = dict(extra)
        if blob is not None:
            blobs["v"] = blob
        cands.append(({**meta, "elem": vmeta}, blobs))

    numel = flat.numel()
    if not bool(support.any()) and (mask is None or numel == 0):
        return {"layout": "zeros"}, {}
    if mask is None or bool(support.all()):
        add({"layout": "dense"}, flat, {})
        slices = {1} | ({t.shape[0]} if t.dim() >= 2 else set())
        for groups in sorted(slices):
            sc = scaled_codes(flat, groups)
            if sc is not None:
                smeta, sblob = encode_values(sc[1])
                add({"layout": "scaled", "groups": groups, "scale": smeta}, sc[0], {"s": sblob})
    all_kept = bool(support.all())
    if numel and not all_kept:  # with every element kept, dense is smaller
        bitmask = torch.from_numpy(np.packbits(support.numpy()))
        add({"layout": "bitmask"}, flat[support], {"m": bitmask})
    for m in NM_CANDIDATES:
        if numel % m or numel < m:
            continue
        if all_kept:
            break
        pos = _nm_positions(support, m, None if mask is None else int(support[:m].sum()))
        if pos is None:
            continue
        k = pos.shape[1]
        if k == 0:
            continue
        idx_bits = max(1, (m - 1).bit_length())
        gather = (pos + torch.arange(0, numel, m).unsqueeze(1)).reshape(-1)  # (G*k,)
        packed = torch.from_numpy(pack_bits(pos.reshape(-1).to(torch.uint8).numpy(), idx_bits))
        add({"layout": "nm", "n": k, "m": m, "idx_bits": idx_bits}, flat[gather], {"i": packed})
    # ties (2:4: 2 bits per kept position = 1 bit per weight) go to N:M, the format kernels use
    return min(cands, key=lambda c: (_blob_bytes(c[1]), c[0]["layout"] != "nm"))


def decode_tensor(
    meta: dict, blobs: dict[str, torch.Tensor], shape: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tensor, support)`` from :func:`encode_tensor`'s output."""
    numel = math.prod(shape)
    layout = meta["layout"]
    if layout == "zeros":
        support = torch.zeros(numel, dtype=torch.bool)
        return torch.zeros(numel, dtype=dtype).reshape(shape), support.reshape(shape)
    if layout == "dense":
        flat = decode_values(meta["elem"], blobs.get("v"), numel, dtype)
        return flat.reshape(shape), torch.ones(shape, dtype=torch.bool)
    if layout == "scaled":
        groups = int(meta["groups"])
        if groups < 1 or numel % groups:
            raise VitcompressError(f"{groups} scale groups do not divide {numel} values")
        codes = decode_values(meta["elem"], blobs.get("v"), numel, torch.float32)
        scales = decode_values(meta["scale"], blobs.get("s"), groups, torch.float32)
        flat = (codes.reshape(groups, -1) * scales.unsqueeze(1)).to(dtype)
        return flat.reshape(shape), torch.ones(shape, dtype=torch.bool)
    if layout == "bitmask":
        support = torch.from_numpy(np.unpackbits(blobs["m"].numpy())[:numel].astype(bool))
        if support.numel() != numel:
            raise VitcompressError("bitmask is shorter than its tensor")
        k = int(support.sum())
        values = decode_values(meta["elem"], blobs.get("v"), k, dtype)
        flat = _scatter(torch.zeros(numel, dtype=dtype), support, values)
        return flat.reshape(shape), support.reshape(shape)
    if layout == "nm":
        n, m = int(meta["n"]), int(meta["m"])
        G = numel // m
        pos = unpack_bits(blobs["i"].numpy(), int(meta["idx_bits"]), G * n)
        pos = torch.from_numpy(pos.astype(np.int64)).reshape(G, n)
        if G * m != numel or bool((pos >= m).any()):
            raise VitcompressError("N:M positions do not fit their tensor")
        gather = (pos + torch.arange(0, numel, m).unsqueeze(1)).reshape(-1)
        values = decode_values(meta["elem"], blobs.get("v"), G * n, dtype)
        flat = _scatter(torch.zeros(numel, dtype=dtype), gather, values)
        support = torch.zeros(numel, dtype=torch.bool)
        support[gather] = True
        return flat.reshape(shape), support.reshape(shape)
    raise VitcompressError(f"unknown layout {layout!r}")


# --------------------------------------------------------------------------------------------
# Structure of the compressed model
# --------------------------------------------------------------------------------------------


def _fmt_to_dict(fmt: Any) -> str | dict:
    """A format by name when the name gives it back exactly, else all its fields."""
    from vitcompress.formats import IntFormat, get_format

    try:
        if get_format(fmt.name) == fmt:
            return fmt.name
    except VitcompressError:
        pass
    kind = "int" if isinstance(fmt, IntFormat) else "float"
    return {"kind": kind, **asdict(fmt)}


def _fmt_from_dict(d: str | dict) -> Any:
    from vitcompress.formats import FloatFormat, IntFormat, get_format

    if isinstance(d, str):
        return get_format(d)
    d = dict(d)
    kind = d.pop("kind")
    return IntFormat(**d) if kind == "int" else FloatFormat(**d)


def _aq_spec(aq: Any) -> dict | None:
    if aq is None:
        return None
    return {
        "fmt": _fmt_to_dict(aq.fmt),
        "dynamic": bool(aq.dynamic),
        "method": aq.method,
        "percentile": aq.percentile,
        "dim": aq.dim,
    }


def _aq_build(spec: dict | None) -> Any:
    from vitcompress.quantize import ActivationQuantizer

    if spec is None:
        return None
    fmt = _fmt_from_dict(spec["fmt"])
    return ActivationQuantizer(
        fmt, spec["dynamic"], spec["method"], spec["percentile"], spec["dim"]
    )


def _quant_classes() -> tuple[type, type, type]:
    from vitcompress.quantize import Int8Linear, QuantLinear, QuantMatMul

    return QuantLinear, QuantMatMul, Int8Linear


def describe_structure(model: nn.Module) -> dict:
    """What distinguishes ``model``'s module tree from the dense model its config builds."""
    from vitcompress.sparse_exec import SparseLinear

    QuantLinear, QuantMatMul, Int8Linear = _quant_classes()
    s: dict[str, Any] = {
        "lowrank": {},
        "quant_linear": {},
        "quant_matmul": {},
        "int8_linear": {},
        "masks": [],
        "fused_attn": {},
        "shrink": shrink_structure(model),
    }
    for name, m in model.named_modules():
        if isinstance(m, LOWRANK_TYPES):
            s["lowrank"][name] = int(m.rank)
        elif isinstance(m, QuantLinear):
            s["quant_linear"][name] = {
                "in": m.in_features,
                "out": m.out_features,
                "weight_format": _fmt_to_dict(m.weight_format),
                "granularity": m.granularity,
                "group_size": m.group_size,
                "bias": m.bias is not None,
                "input_quant": _aq_spec(m.input_quant),
            }
        elif isinstance(m, QuantMatMul):
            s["quant_matmul"][name] = {"a": _aq_spec(m.a_quant), "b": _aq_spec(m.b_quant)}
        elif isinstance(m, Int8Linear):
            s["int8_linear"][name] = {
                "in": m.in_features,
                "out": m.out_features,
                "bias": m.bias is not None,
                "input_format": _fmt_to_dict(m.input_format),
                "static": not m.dynamic,
            }
        elif isinstance(m, SparseLinear):
            raise VitcompressError(
                f"pack: {name} is a SparseLinear (an execution format); pack the pruned model "
                "and call sparsify_for_inference_ after loading"
            )
        if hasattr(m, "fused_attn"):
            s["fused_attn"][name] = bool(m.fused_attn)
        if MASK in getattr(m, "_buffers", {}):
            s["masks"].append(name)
    return s


def rebuild_structure_(model: nn.Module, s: dict) -> None:
    """Give a freshly built dense model the structure :func:`describe_structure` recorded."""
    from vitcompress.targets import replace_module

    QuantLinear, QuantMatMul, Int8Linear = _quant_classes()
    restore_shrink_(model, s.get("shrink", {}))  # first: the layers below take its shapes
    restore_lowrank_(model, s.get("lowrank", {}))
    for name, q in s.get("quant_linear", {}).items():
        new = QuantLinear(
            q["in"],
            q["out"],
            _fmt_from_dict(q["weight_format"]),
            q["granularity"],
            q["group_size"],
            bias=q["bias"],
            input_quant=_aq_build(q["input_quant"]),
        )
        replace_module(model, name, new)
    for name, q in s.get("quant_matmul", {}).items():
        replace_module(model, name, QuantMatMul(_aq_build(q["a"]), _aq_build(q["b"])))
    for name, q in s.get("int8_linear", {}).items():
        static = q["static"]
        new = Int8Linear(
            torch.zeros(q["out"], q["in"], dtype=torch.int8),
            torch.ones(q["out"], 1),
            torch.zeros(q["out"]) if q["bias"] else None,
            _fmt_from_dict(q["input_format"]),
            torch.ones(()) if static else None,
            torch.zeros((), dtype=torch.int32) if static else None,
        )
        replace_module(model, name, new)
    for name in s.get("masks", []):
        m = model.get_submodule(name)
        m.register_buffer(MASK, torch.ones_like(m.weight, dtype=torch.bool))
    for name, fused in s.get("fused_attn", {}).items():
        model.get_submodule(name).fused_attn = fused


# --------------------------------------------------------------------------------------------
# Derived tensors of quantised layers
# --------------------------------------------------------------------------------------------


def _float_table(fmt: Any) -> torch.Tensor:
    """Value of every code of a float format of <= 8 bits (NaN for the special codes)."""
    E, M = fmt.exp_bits, fmt.man_bits
    codes = torch.arange(2 ** (1 + E + M), dtype=torch.int64)
    sign = (codes >> (E + M)) & 1
    e = (codes >> M) & (2**E - 1)
    m = (codes & (2**M - 1)).double()
    val = torch.where(
        e == 0,
        m * 2.0 ** (fmt.emin - M),
        (1 + m / 2**M) * torch.pow(2.0, (e - fmt.bias).double()),
    )
    val = torch.where(sign == 1, -val, val)
    top = e == 2**E - 1
    if fmt.has_inf:
        val = torch.where(top, torch.full_like(val, math.nan), val)
    elif fmt.has_nan:
        val = torch.where(top & (m == 2**M - 1), torch.full_like(val, math.nan), val)
    return val.float()


def _float_codes(q: torch.Tensor, fmt: Any) -> torch.Tensor | None:
    """Codes of values ``q`` that lie on ``fmt``'s grid, or None if one does not."""
    table = _float_table(fmt)
    pos = table[: len(table) // 2]  # sign bit clear
    ok = ~torch.isnan(pos)
    vals, codes = pos[ok], torch.arange(len(pos))[ok]
    order = torch.argsort(vals, stable=True)
    vals, codes = vals[order], codes[order]
    mag = q.abs().reshape(-1)
    i = torch.searchsorted(vals, mag).clamp(max=len(vals) - 1)
    if not torch.equal(vals[i], mag):
        return None
    out = codes[i] + torch.signbit(q.reshape(-1)).long() * (len(table) // 2)
    return out.reshape(q.shape)


def _dequant_int(m: Any) -> torch.Tensor:
    from vitcompress.formats import dequantize_int, expand_qparams

    shape = m.qweight.shape
    s = expand_qparams(m.weight_scale, shape, m.granularity, m.group_size)
    z = expand_qparams(m.weight_zero_point, shape, m.granularity, m.group_size)
    return dequantize_int(m.qweight, s, z)


def _derive_quant_weight(m: Any) -> tuple[str, torch.Tensor | None] | None:
    """How a QuantLinear's fp32 weight follows from what else is stored; None if it does not.

    Returns ``(how, extra)`` where ``extra`` is a code tensor to store (float formats that torch
    has no dtype for), or None.
    """
    from vitcompress.formats import IntFormat, expand_qparams

    w = m.weight.detach()
    fmt = m.weight_format
    if isinstance(fmt, IntFormat):
        if m.qweight is None or m.weight_scale is None or m.weight_zero_point is None:
            return None
        return ("dequant_int", None) if _same_bits(_dequant_int(m), w) else None
    if m.weight_scale is None:  # unscaled float: a cast
        if m.qweight is not None and _same_bits(m.qweight.float(), w):
            return ("cast", None)
        return None
    s = expand_qparams(m.weight_scale, w.shape, m.granularity, m.group_size)
    if m.qweight is not None:
        return ("scaled_qweight", None) if _same_bits(m.qweight.float() * s, w) else None
    if fmt.bits > 8:
        return None
    codes = _float_codes(fmt.saturating().quantize(w / s), fmt)
    if codes is None:
        return None
    ref = _float_table(fmt)[codes] * s
    return ("scaled_codes", codes.to(torch.uint8)) if _same_bits(ref, w) else None


def _rebuild_quant_weight(how: str, m: Any, codes: torch.Tensor | None) -> torch.Tensor:
    from vitcompress.formats import expand_qparams

    if how == "dequant_int":
        return _dequant_int(m)
    if how == "cast":
        return m.qweight.float()
    shape = (m.out_features, m.in_features)
    s = expand_qparams(m.weight_scale, shape, m.granularity, m.group_size)
    if how == "scaled_qweight":
        return m.qweight.float() * s
    if how == "scaled_codes":
        return _float_table(m.weight_format)[codes.long()] * s
    raise VitcompressError(f"unknown weight derivation {how!r}")


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def _model_config(model: nn.Module, config: dict) -> dict:
    config = dict(config or {})
    if "model" not in config:
        cfg = getattr(model, "cfg", None)
        if type(model).__name__ == "VisionTransformer" and hasattr(cfg, "to_dict"):
            config["model"] = {"arch": "vit", **cfg.to_dict()}
        else:
            raise VitcompressError(
                "pack: config has no 'model' section (the dict build_model takes); pass the run "
                "directory's config"
            )
    return config


def _check_rebuildable(model: nn.Module, config: dict, structure: dict) -> None:
    with torch.device("meta"):
        shadow = build_model(config["model"])
        rebuild_structure_(shadow, structure)
    want = model.state_dict()
    got = shadow.state_dict()
    for k, v in want.items():
        if k not in got:
            raise VitcompressError(
                f"pack: tensor {k!r} has no place in the model rebuilt from config['model'] and "
                "the recorded structure (a module pack does not know?)"
            )
        if tuple(got[k].shape) != tuple(v.shape):
            raise VitcompressError(
                f"pack: {k!r} has shape {tuple(v.shape)}, the rebuilt model {tuple(got[k].shape)}"
            )
    extra = [k for k in got if k not in want]
    if extra:
        raise VitcompressError(f"pack: the rebuilt model has an extra tensor {extra[0]!r}")


def _serialize(model: nn.Module, config: dict) -> bytes:
    QuantLinear, _, _ = _quant_classes()
    config = _model_config(model, config)
    structure = describe_structure(model)
    _check_rebuildable(model, config, structure)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.layout != torch.strided or _dtype_name(v.dtype) not in _DTYPES:
            raise VitcompressError(f"pack: cannot store {k!r} ({v.dtype}, {v.layout})")
    entries: dict[str, dict] = {}
    blobs: dict[str, torch.Tensor] = {}
    derived: dict[str, dict] = {}

    # quantised layers: the fp32 weight follows from codes and scales
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            d = _derive_quant_weight(m)
            if d is None:
                continue
            how, codes = d
            key = f"{name}.weight"
            spec = {"how": how, "module": name, "dtype": _dtype_name(m.weight.dtype)}
            if codes is not None:
                ck = f"{key}::codes"
                meta, bl = encode_tensor(codes)
                entries[ck] = {"shape": list(codes.shape), "dtype": "uint8", **meta}
                blobs.update({f"{ck}#{s}": b for s, b in bl.items()})
                spec["codes"] = ck
            derived[key] = spec

    # pruned layers: the mask is the support of the weight
    masked = {name for name, m in model.named_modules() if MASK in getattr(m, "_buffers", {})}
    mask_of: dict[str, str] = {}
    for name in masked:
        wk, mk = f"{name}.weight", f"{name}.{MASK}"
        if wk in state and wk not in derived and mk in state:
            meta, bl = encode_tensor(state[wk], state[mk])
            dec, support = decode_tensor(meta, bl, list(state[wk].shape), state[wk].dtype)
            if _same_bits(dec, state[wk]) and torch.equal(support, state[mk].bool()):
                entries[wk] = {"shape": list(state[wk].shape), "dtype": _dtype_name(dec.dtype)}
                entries[wk].update(meta)
                blobs.update({f"{wk}#{s}": b for s, b in bl.items()})
                mask_of[mk] = wk

    for k, v in state.items():
        if k in entries or k in derived or k in mask_of:
            continue
        meta, bl = encode_tensor(v)
        entries[k] = {"shape": list(v.shape), "dtype": _dtype_name(v.dtype), **meta}
        blobs.update({f"{k}#{s}": b for s, b in bl.items()})
    header = {
        "version": VERSION,
        "config": config,
        "structure": structure,
        "entries": entries,
        "derived": derived,
        "mask_of": mask_of,
    }
    return _container(header, blobs)


def _container(header: dict, blobs: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file of two uint8 tensors: ``header`` (zlib-compressed JSON) and ``data``
    (every blob back to back, located by the header). One tensor table entry per blob and an
    uncompressed JSON header cost ~60 KB on a small ViT: 7 % of its INT8 size."""
    index, chunks, offset = {}, [], 0
    for k, v in blobs.items():
        raw = v.contiguous().reshape(-1).view(torch.uint8)
        index[k] = {"dtype": _dtype_name(v.dtype), "numel": v.numel(), "offset": offset}
        chunks.append(raw)
        offset += raw.numel()
    text = json.dumps({**header, "blobs": index}, separators=(",", ":")).encode()
    packed_header = torch.frombuffer(bytearray(zlib.compress(text, 9)), dtype=torch.uint8)
    data = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)
    return st_save({"header": packed_header, "data": data}, metadata={META_KEY: str(VERSION)})


def save_packed(model: nn.Module, path: str | Path, config: dict) -> int:
    """Write ``model`` as one packed file; returns the bytes written (module docstring).

    Args:
        model: the (compressed) model, in any mix of dense, pruned, low-rank and quantised
            layers this package makes.
        path: the file to write (atomically).
        config: the run's config; ``config["model"]`` must build the dense model (filled in from
            ``model.cfg`` for our ViTs when missing). Stored whole and returned by
            :func:`load_packed`.
    """
    data = _serialize(model, config)
    atomic_write_bytes(Path(path), data)
    return len(data)


def bytes_stored(model: nn.Module, config: dict | None = None) -> int:
    """The size in bytes of the file :func:`save_packed` writes for ``model`` (same bytes)."""
    return len(_serialize(model, config or {}))


def bytes_fp32(model: nn.Module) -> int:
    """4 bytes per parameter: the model's dense fp32 size (buffers such as masks excluded)."""
    return 4 * sum(p.numel() for p in model.parameters())


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise VitcompressError(f"packed file not found: {path}")
    try:
        data = path.read_bytes()
        if len(data) < 8:
            raise ValueError("file too short")
        n = int.from_bytes(data[:8], "little")
        if n <= 0 or 8 + n > len(data):
            raise ValueError("header length out of range")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        if meta.get(META_KEY) != str(VERSION):
            raise VitcompressError(f"{path}: not a vitcompress packed file of version {VERSION}")
        tensors = st_load(data)
        header = json.loads(zlib.decompress(tensors["header"].numpy().tobytes()))
        flat = tensors["data"]
        blobs = {}
        for k, b in header.pop("blobs").items():
            dt = _DTYPES[b["dtype"]]
            nbytes = int(b["numel"]) * torch.empty(0, dtype=dt).element_size()
            start = int(b["offset"])
            if start < 0 or start + nbytes > flat.numel():
                raise ValueError(f"blob {k!r} lies outside the data")
            blobs[k] = flat[start : start + nbytes].clone().view(dt)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError,
            zlib.error) as e:  # fmt: skip
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VitcompressError(f"corrupt packed file {path}: {msg}") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise VitcompressError(f"{path}: not a vitcompress packed file of version {VERSION}")
    return header, blobs


def _blobs_of(key: str, blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = f"{key}#"
    return {k[len(p) :]: v for k, v in blobs.items() if k.startswith(p)}


def load_packed(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_packed`; ``(model in eval mode, config)``.

    Raises:
        VitcompressError: a missing, truncated or corrupt file (one line).
    """
    path = Path(path)
    header, blobs = _read(path)
    try:
        config = header["config"]
        model = build_model(config["model"])
        rebuild_structure_(model, header["structure"])
        state: dict[str, torch.Tensor] = {}
        supports: dict[str, torch.Tensor] = {}
        for key, e in header["entries"].items():
            t, support = decode_tensor(e, _blobs_of(key, blobs), e["shape"], _DTYPES[e["dtype"]])
            state[key] = t
            supports[key] = support
        for mk, wk in header["mask_of"].items():
            state[mk] = supports[wk].clone()
        modules = dict(model.named_modules())
        for key, spec in header["derived"].items():
            m = modules[spec["module"]]
            # the derivation reads the layer's other tensors: load them into it first
            for attr in ("qweight", "weight_scale", "weight_zero_point"):
                t = state.get(f"{spec['module']}.{attr}")
                if t is not None:
                    setattr(m, attr, t)
            codes = state.pop(spec["codes"]) if "codes" in spec else None
            state[key] = _rebuild_quant_weight(spec["how"], m, codes).to(_DTYPES[spec["dtype"]])
        model.load_state_dict(state, strict=True, assign=True)
    except VitcompressError as e:
        raise VitcompressError(f"corrupt packed file {path}: {e}") from None
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VitcompressError(f"corrupt packed file {path}: {type(e).__name__}: {msg}") from None
    model.eval()
    return model, config


__all__ = [
    "bytes_fp32",
    "bytes_stored",
    "decode_tensor",
    "describe_structure",
    "encode_tensor",
    "load_packed",
    "pack_bits",
    "rebuild_structure_",
    "save_packed",
    "unpack_bits",
]
