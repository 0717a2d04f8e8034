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

Structure: the file's header (zlib-compressed JSON in a uint8 tensor) holds ``config``:
``config["model"]`` builds the dense model and ``config["compression"]`` holds the structure
records of the compressed modules (shrunk blocks, low-rank ranks, masks, quantised layers with
their formats), the schema of :mod:`vitcompress.steps.registry`, from which :func:`load_packed`
rebuilds the tree before the weights load. Saving first rebuilds that tree on the meta device
and refuses a model it could not load back.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.fileio import atomic_write_bytes
from vitcompress.formats import bits_view, same_bits
from vitcompress.models import build_model
from vitcompress.sparsity import MASK
from vitcompress.steps.registry import describe_structure, rebuild_structure_

META_KEY = "vitcompress.pack"
# 3: the structure is the config's "compression" records (vitcompress.steps.registry);
# 2: a structure dict of its own beside the config; both: one compressed header + one data blob
VERSION = 3
READABLE = ("2", "3")
NM_CANDIDATES = (4, 8, 16)  # group sizes M tried for the N:M layout
_CHUNK = 1 << 20  # elements per bit-packing chunk (bounds temporary memory)
# Reading a file bounds what it may expand to before anything is expanded: the header may
# inflate to at most HEADER_RATIO times the file (at least MIN_HEADER_BYTES, at most
# MAX_HEADER_BYTES; a real header is a few hundred KB), and the decoded tensors (each counted at
# 4 bytes an element or more) to at most DECODE_RATIO times the file (at least
# MIN_DECODE_BYTES). Real files stay well inside: a bit-packed layout stores at least one bit of
# an fp32 element (32x); only layouts that store nothing (zeros, a constant) go further, and
# those are biases and zero points, small next to the weights that share their file.
HEADER_RATIO = 4
MIN_HEADER_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 20
DECODE_RATIO = 64
MIN_DECODE_BYTES = 64 << 20

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
    """Inverse of :func:`pack_bits`: ``length`` values of ``n`` bits.

    A value of at most 8 bits spans at most two bytes: each is read as the 16-bit big-endian
    window starting at its first byte, shifted and masked, a few vector operations per chunk
    (8x faster than expanding every bit to a byte and packing them again).
    """
    p = np.ascontiguousarray(p, dtype=np.uint8)
    if not 1 <= n <= 8 or length < 0:
        raise VitcompressError(f"cannot unpack {length} values of {n} bits (1 to 8 bits each)")
    if len(p) * 8 < length * n:
        raise VitcompressError(f"{len(p)} bytes hold fewer than {length} values of {n} bits")
    if n == 8:
        return p[:length].copy()
    padded = np.concatenate([p, np.zeros(1, np.uint8)])  # the window of the last value
    mask = (1 << n) - 1
    out = np.empty(length, np.uint8)
    for i in range(0, length, _CHUNK):
        start = np.arange(i, min(i + _CHUNK, length), dtype=np.int64) * n  # first bit
        byte = start >> 3
        window = (padded[byte].astype(np.uint16) << 8) | padded[byte + 1]
        shift = (16 - n - (start & 7)).astype(np.uint16)
        out[i : i + len(start)] = (window >> shift) & mask
    return out


def _scatter(flat: torch.Tensor, where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``flat[where] = values`` bit for bit (no float arithmetic, -0.0 and NaN kept)."""
    if flat.dtype == torch.bool:
        flat[where] = values
    else:
        bits_view(flat)[where] = bits_view(values)
    return flat


def _enc_float32(v: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """fp32 values in 2 bytes (exact fp16 / bf16), 3 bytes (exact tf32) or 4."""
    if v.numel() and same_bits(v.half().float(), v):
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
    if v.numel() > 1 and v.is_floating_point() and bool((bits_view(v) == bits_view(v[:1])).all()):
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


# codec -> (the blob's dtype, its number of elements for n values); None: no blob
_CODEC_BLOB = {
    "f16": ((torch.float16,), lambda n: n),
    "bf16": ((torch.bfloat16,), lambda n: n),
    "top3": ((torch.uint8,), lambda n: 3 * n),
    "bool": ((torch.uint8,), lambda n: -(-n // 8)),
    "u8view": ((torch.uint8,), lambda n: n),
    "narrow": ((torch.int16, torch.int32), lambda n: n),
    "raw": (None, lambda n: n),  # any dtype: the tensor's own
}


def _check_blob(codec: str, blob: torch.Tensor | None, n: int, bits: int = 0) -> None:
    """Refuse a blob that does not hold exactly what ``codec`` needs for ``n`` values, before
    anything of size ``n`` is allocated."""
    if codec == "bits":
        dtypes, want = (torch.uint8,), -(-n * bits // 8)
    else:
        dtypes, count = _CODEC_BLOB[codec]
        want = count(n)
    if blob is None:
        raise VitcompressError(f"codec {codec!r} has no data for its {n} values")
    if dtypes is not None and blob.dtype not in dtypes:
        raise VitcompressError(f"codec {codec!r} stores {dtypes[0]}, not {blob.dtype}")
    if blob.numel() != want:
        raise VitcompressError(
            f"codec {codec!r} needs {want} stored elements for {n} values, the file has "
            f"{blob.numel()}"
        )


def decode_values(
    meta: dict, blob: torch.Tensor | None, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`encode_values`: ``n`` values of ``dtype``.

    The blob must hold exactly what the codec stores for ``n`` values (checked before anything
    is expanded), so a corrupt file is refused instead of allocating what it claims.
    """
    codec = meta["codec"]
    if codec == "repeat":
        if not isinstance(meta["elem"], dict) or meta["elem"].get("codec") == "repeat":
            raise VitcompressError("codec 'repeat' must hold one value of another codec")
        return decode_values(meta["elem"], blob, 1, dtype).expand(n).clone()
    if codec == "const":
        return torch.full((n,), int(meta["value"]), dtype=dtype)
    if codec == "bits":
        bits = int(meta["bits"])
        if not 1 <= bits <= 8:
            raise VitcompressError(f"codec 'bits' stores 1 to 8 bits a value, not {bits}")
        _check_blob(codec, blob, n, bits)
        u = unpack_bits(blob.numpy(), bits, n)
        return (torch.from_numpy(u.astype(np.int64)) + int(meta["offset"])).to(dtype)
    if codec not in _CODEC_BLOB:
        raise VitcompressError(f"unknown element codec {codec!r}")
    _check_blob(codec, blob, n)
    if codec in ("raw", "narrow"):
        out = blob
    elif codec == "f16":
        out = blob.float()
    elif codec == "bf16":
        out = (blob.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    elif codec == "top3":
        full = torch.zeros(n, 4, dtype=torch.uint8)
        full[:, 1:] = blob.reshape(n, 3)
        out = full.reshape(-1).view(torch.float32)
    elif codec == "bool":
        out = torch.from_numpy(np.unpackbits(blob.numpy())[:n].astype(bool))
    else:  # u8view
        out = blob.view(dtype)
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
        two_bytes = same_bits(s.bfloat16().float(), s) or same_bits(s.half().float(), s)
        if not two_bytes or not torch.equal(s * qmax, amax):
            continue
        codes = torch.round(g / torch.where(s > 0, s, 1.0).unsqueeze(1))
        if bool((codes.abs() > qmax).any()):
            continue
        codes = codes.to(torch.int8)  # -0.0 becomes 0: a -0.0 value fails the check below
        if same_bits(codes.float() * s.unsqueeze(1), g):
            return codes.reshape(-1), s
    return None


def encode_tensor(t: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[dict, dict]:
    """The smallest exact encoding of ``t``; with ``mask`` (True = kept) the stored support is
    the mask itself, so that the mask can be rebuilt from it (module docstring).

    Returns ``(meta, blobs)`` with blob names as suffixes (``v`` values, ``m`` bitmask,
    ``i`` N:M positions).
    """
    flat = t.detach().cpu().contiguous().reshape(-1)
    nbits = bits_view(flat)
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


def _shape_numel(shape: object) -> int:
    """The number of elements of a shape read from a file: a list of integers >= 0."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise VitcompressError(f"shape must be a list of integers >= 0, not {str(shape)[:80]}")
    return math.prod(shape)


def decode_tensor(
    meta: dict, blobs: dict[str, torch.Tensor], shape: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tensor, support)`` from :func:`encode_tensor`'s output.

    Every layout's parameters and stored blobs are checked against ``shape`` before anything
    of its size is allocated; a mismatch is a :class:`VitcompressError`.
    """
    numel = _shape_numel(shape)
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
        m = blobs.get("m")
        if m is None or m.dtype != torch.uint8 or m.numel() != -(-numel // 8):
            raise VitcompressError(f"bitmask needs {-(-numel // 8)} bytes for {numel} values")
        support = torch.from_numpy(np.unpackbits(m.numpy())[:numel].astype(bool))
        k = int(support.sum())
        values = decode_values(meta["elem"], blobs.get("v"), k, dtype)
        flat = _scatter(torch.zeros(numel, dtype=dtype), support, values)
        return flat.reshape(shape), support.reshape(shape)
    if layout == "nm":
        n, m, idx_bits = int(meta["n"]), int(meta["m"]), int(meta["idx_bits"])
        if not 1 <= n < m or numel % m or idx_bits != max(1, (m - 1).bit_length()) or m > 256:
            raise VitcompressError(f"N:M layout {n}:{m} ({idx_bits} bits) does not fit {numel}")
        G = numel // m
        i = blobs.get("i")
        if i is None or i.dtype != torch.uint8 or i.numel() != -(-G * n * idx_bits // 8):
            raise VitcompressError(f"N:M positions need {-(-G * n * idx_bits // 8)} bytes")
        pos = unpack_bits(i.numpy(), idx_bits, G * n)
        pos = torch.from_numpy(pos.astype(np.int64)).reshape(G, n)
        if bool((pos >= m).any()) or bool((pos[:, 1:] <= pos[:, :-1]).any()):
            raise VitcompressError("N:M positions do not fit their tensor")
        gather = (pos + torch.arange(0, numel, m).unsqueeze(1)).reshape(-1)
        values = decode_values(meta["elem"], blobs.get("v"), G * n, dtype)
        flat = _scatter(torch.zeros(numel, dtype=dtype), gather, values)
        support = torch.zeros(numel, dtype=torch.bool)
        support[gather] = True
        return flat.reshape(shape), support.reshape(shape)
    raise VitcompressError(f"unknown layout {layout!r}")


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def with_model_config(model: nn.Module, config: dict | None) -> dict:
    """``config`` with a ``model`` section (from ``model.cfg`` for our ViTs when missing)."""
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


def _check_rebuildable(model: nn.Module, config: dict) -> None:
    with torch.device("meta"):
        shadow = build_model(config["model"])
        rebuild_structure_(shadow, config["compression"], "pack")
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
    return _container(*_encode(model, config))


def stored_bytes_by_tensor(model: nn.Module, config: dict | None = None) -> dict[str, int]:
    """The bytes each state-dict tensor takes in the packed file (its blobs: codes, scales,
    bitmask or N:M positions; a weight derived from its codes takes none, its codes do)."""
    _, blobs = _encode(model, config or {})
    out: dict[str, int] = {}
    for name, blob in blobs.items():
        key = name.rpartition("#")[0].partition("::")[0]
        out[key] = out.get(key, 0) + blob.numel() * blob.element_size()
    return out


def module_bytes(module: nn.Module) -> int:
    """The bytes ``module``'s tensors take packed (blobs only: no header), as in a whole file:
    what one layer adds to ``bytes_stored``, without packing the rest of the model."""
    _, blobs, _, _ = _encode_tensors(module)
    return sum(b.numel() * b.element_size() for b in blobs.values())


def _join(module: str, attr: str) -> str:
    """A state-dict key: ``module.attr``, or ``attr`` for the root module itself."""
    return f"{module}.{attr}" if module else attr


def _encode_tensors(model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """``(entries, blobs, derived, mask_of)`` of every state-dict tensor of ``model``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.layout != torch.strided or _dtype_name(v.dtype) not in _DTYPES:
            raise VitcompressError(f"pack: cannot store {k!r} ({v.dtype}, {v.layout})")
    entries: dict[str, dict] = {}
    blobs: dict[str, torch.Tensor] = {}
    derived: dict[str, dict] = {}

    # quantised layers: the fp32 weight follows from codes and scales
    for name, m in model.named_modules():
        derivation = getattr(m, "weight_derivation", None)
        if callable(derivation):
            d = derivation()
            if d is None:
                continue
            how, codes = d
            key = _join(name, "weight")
            spec = {"how": how, "module": name, "dtype": _dtype_name(m.weight.dtype)}
            if codes is not None:
                ck = f"{key}::codes"
                meta, bl = encode_tensor(codes)
                entries[ck] = {"shape": list(codes.shape), "dtype": "uint8", **meta}
                blobs.update({f"{ck}#{s}": b for s, b in bl.items()})
                spec["codes"] = ck
            derived[key] = spec

    # pruned layers: the mask is the support of the weight
    masked = [name for name, m in model.named_modules() if MASK in getattr(m, "_buffers", {})]
    mask_of: dict[str, str] = {}
    for name in masked:
        wk, mk = _join(name, "weight"), _join(name, MASK)
        if wk in state and wk not in derived and mk in state:
            meta, bl = encode_tensor(state[wk], state[mk])
            dec, support = decode_tensor(meta, bl, list(state[wk].shape), state[wk].dtype)
            if same_bits(dec, state[wk]) and torch.equal(support, state[mk].bool()):
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
    return entries, blobs, derived, mask_of


def _encode(model: nn.Module, config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The packed file's header and blobs for ``model``."""
    for name, m in model.named_modules():
        if getattr(m, "execution_only", False):
            raise VitcompressError(
                f"pack: {name} is a {type(m).__name__}, an execution format; pack the model "
                "before converting it for execution"
            )
    config = {**with_model_config(model, config), "compression": describe_structure(model)}
    _check_rebuildable(model, config)
    entries, blobs, derived, mask_of = _encode_tensors(model)
    header = {
        "version": VERSION,
        "config": config,
        "entries": entries,
        "derived": derived,
        "mask_of": mask_of,
    }
    return header, blobs


def _container(header: dict, blobs: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file of two uint8 tensors: ``header`` (zlib-compressed JSON) and ``data``
    (every blob back to back, located by the header). One safetensors entry per blob, with an
    uncompressed JSON header, would cost a small model a sizeable share of its INT8 bytes."""
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


def _one_line(msg: str) -> str:
    """An error message from anywhere (a file's text included) as one short line."""
    msg = " ".join(msg.split())
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _inflate(raw: bytes, limit: int) -> bytes:
    """``zlib.decompress(raw)``, refusing (before producing it) more than ``limit`` bytes."""
    d = zlib.decompressobj()
    out = d.decompress(raw, limit + 1)
    if len(out) > limit:
        raise ValueError(f"its header inflates to more than {limit} bytes (a zlib bomb?)")
    if not d.eof:
        raise ValueError("its header is truncated")
    return out


def _elsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _check_header(header: object, limit: int) -> int:
    """Check the types of the header's sections and what its entries would decode to; returns
    the bytes left in the decoding budget ``limit``."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a mapping")
    for section in ("config", "entries", "derived", "mask_of"):
        if not isinstance(header.get(section), dict):
            raise ValueError(f"its header's {section!r} is not a mapping")
    cost = 0
    for key, e in header["entries"].items():
        if not isinstance(e, dict):
            raise ValueError(f"entry {key!r} is not a mapping")
        try:
            numel = _shape_numel(e["shape"])
        except VitcompressError as err:
            raise ValueError(f"entry {key!r}: {err}") from None
        cost += numel * max(_elsize(_DTYPES[e["dtype"]]), 4)
    masked = list(header["mask_of"].values())
    for wk in masked:
        if not isinstance(wk, str) or wk not in header["entries"]:
            raise ValueError(f"a mask is the support of {str(wk)[:80]!r}, which is not stored")
        cost += _shape_numel(header["entries"][wk]["shape"])
    if len(set(masked)) != len(masked):
        raise ValueError("two masks are the support of the same tensor")
    if cost > limit:
        raise ValueError(
            f"its tensors would take {cost:,} bytes, more than a file of this size can hold "
            f"({limit:,})"
        )
    return limit - cost


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    """``(header, blobs, decoding budget left)`` of a packed file, checked before anything is
    expanded: the header inflates to a bounded size, every blob lies inside the data and no
    byte serves two blobs, and the entries decode to at most :data:`DECODE_RATIO` times the
    file's size (:data:`MIN_DECODE_BYTES` at least)."""
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
        if meta.get(META_KEY) not in READABLE:
            raise VitcompressError(f"{path}: not a vitcompress packed file (version {VERSION})")
        tensors = st_load(data)
        header_limit = min(max(HEADER_RATIO * len(data), MIN_HEADER_BYTES), MAX_HEADER_BYTES)
        header = json.loads(_inflate(tensors["header"].numpy().tobytes(), header_limit))
        left = _check_header(header, max(DECODE_RATIO * len(data), MIN_DECODE_BYTES))
        flat = tensors["data"]
        if flat.dtype != torch.uint8 or flat.dim() != 1:
            raise ValueError("its data is not a 1-D uint8 tensor")
        blobs, used = {}, 0
        for k, b in header.pop("blobs").items():
            dt = _DTYPES[b["dtype"]]
            numel, start = b["numel"], b["offset"]
            if type(numel) is not int or type(start) is not int or numel < 0 or start < 0:
                raise ValueError(f"blob {k!r} has no valid place in the data")
            nbytes = numel * _elsize(dt)
            used += nbytes
            if start + nbytes > flat.numel() or used > flat.numel():
                raise ValueError(f"blob {k!r} lies outside the data")
            blobs[k] = flat[start : start + nbytes].clone().view(dt)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError,
            OverflowError, RecursionError, zlib.error) as e:  # fmt: skip
        raise VitcompressError(
            f"corrupt packed file {path}: {_one_line(str(e)) or type(e).__name__}"
        ) from None
    if str(header.get("version")) not in READABLE:
        raise VitcompressError(f"{path}: not a vitcompress packed file (version {VERSION})")
    return header, blobs, left


def _check_against_model(header: dict, model: nn.Module, budget: int) -> None:
    """Every stored tensor has the shape of the model's own (codes: of the weight they derive),
    and the derived weights fit in what is left of the decoding budget: checked on the meta
    model, before anything is decoded."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for key, spec in header["derived"].items():
        if not isinstance(spec, dict) or key not in want:
            raise VitcompressError(f"derived tensor {key!r} is not a tensor of the model")
        m = modules.get(spec.get("module"))
        if m is None or not callable(getattr(m, "derived_weight", None)):
            raise VitcompressError(f"{key!r} is derived by a module that cannot derive it")
        if "codes" in spec:
            want.setdefault(spec["codes"], want[key])
        budget -= math.prod(want[key]) * max(_elsize(_DTYPES[spec["dtype"]]), 4)
    if budget < 0:
        raise VitcompressError("its derived weights take more than a file of this size can hold")
    for key, e in header["entries"].items():
        if key not in want:
            raise VitcompressError(f"{key!r} is not a tensor of the model")
        if tuple(e["shape"]) != want[key]:
            raise VitcompressError(
                f"{key!r} has shape {tuple(e['shape'])}, the model's {want[key]}"
            )


def legacy_records(s: dict) -> list[dict]:
    """The structure records of a version-2 file's structure dict (one entry per kind of
    module), in the order they are rebuilt."""
    quant = {k: s[k] for k in ("quant_linear", "quant_matmul", "int8_linear", "fused_attn")
             if s.get(k)}  # fmt: skip
    records = [
        {"kind": "shrink", "structure": s.get("shrink")},
        {"kind": "lowrank", "ranks": s.get("lowrank")},
        {"kind": "prune", "layers": s.get("masks")},
        {"kind": "quantize", **quant} if quant else {},
    ]
    return [r for r in records if r and all(v for v in r.values())]


def _group_blobs(blobs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{tensor key: {suffix: blob}}`` from the flat ``"<key>#<suffix>"`` blob names."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, blob in blobs.items():
        key, _, suffix = name.rpartition("#")
        grouped.setdefault(key, {})[suffix] = blob
    return grouped


def load_packed(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_packed`; ``(model in eval mode, config)``.

    Raises:
        VitcompressError: a missing, truncated or corrupt file (one line).
    """
    path = Path(path)
    header, blobs, budget = _read(path)
    try:
        config = header["config"]
        records = config["compression"] if header["version"] >= 3 else None
        if records is None:  # version 2 kept the structure beside the config, in one dict
            records = legacy_records(header["structure"])
        with torch.device("meta"):  # no memory and no random init for weights about to load
            model = build_model(config["model"])
            rebuild_structure_(model, records, str(path))
        _check_against_model(header, model, budget)
        state: dict[str, torch.Tensor] = {}
        supports: dict[str, torch.Tensor] = {}
        grouped = _group_blobs(blobs)
        for key, e in header["entries"].items():
            t, support = decode_tensor(e, grouped.get(key, {}), e["shape"], _DTYPES[e["dtype"]])
            state[key] = t
            supports[key] = support
        for mk, wk in header["mask_of"].items():
            state[mk] = supports[wk].clone()
        modules = dict(model.named_modules())
        for key, spec in header["derived"].items():
            m = modules[spec["module"]]
            prefix = spec["module"] + "."
            for k, t in state.items():  # the derivation reads the layer's buffers: load them first
                if k.startswith(prefix) and k[len(prefix) :] in m._buffers:
                    setattr(m, k[len(prefix) :], t)
            codes = state.pop(spec["codes"]) if "codes" in spec else None
            state[key] = m.derived_weight(spec["how"], codes).to(_DTYPES[spec["dtype"]])
        model.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise VitcompressError(f"{left[0]} is not in the file")
    except VitcompressError as e:
        raise VitcompressError(f"corrupt packed file {path}: {_one_line(str(e))}") from None
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError,
            OverflowError, ZeroDivisionError, RecursionError) as e:  # fmt: skip
        msg = _one_line(str(e)) or type(e).__name__
        raise VitcompressError(f"corrupt packed file {path}: {type(e).__name__}: {msg}") from None
    model.eval()
    return model, config


__all__ = [
    "bytes_fp32",
    "bytes_stored",
    "decode_tensor",
    "encode_tensor",
    "legacy_records",
    "load_packed",
    "module_bytes",
    "pack_bits",
    "save_packed",
    "stored_bytes_by_tensor",
    "unpack_bits",
    "with_model_config",
]
