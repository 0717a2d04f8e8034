"""Element codecs and tensor layouts of the packed format: how one tensor is stored exactly in
the fewest bytes (1-D values in, blobs out; :mod:`vitcompress.pack` puts them in a file).

- element codecs: fp32 values that are exactly fp16 or bf16 take 2 bytes, tf32 values 3 bytes;
  integer tensors ``ceil(log2(max - min + 1))`` bits each, bit-packed; constants nothing; a
  float repeated (an expanded per-tensor scale) once;
- layouts: dense, ``scaled`` (small integer codes times one 2-byte scale per slice), ``bitmask``
  (kept values + one bit per element), ``nm`` (N kept values per group of M + their positions)
  or ``zeros``; per tensor the smallest wins.

Every decoder checks that its blobs hold exactly what its codec stores, so a corrupt file is a
one-line error, never a large allocation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vitcompress.errors import VitcompressError
from vitcompress.formats import bits_view, same_bits

_CHUNK = 1 << 20  # elements per bit-packing chunk (bounds temporary memory)
NM_CANDIDATES = (4, 8, 16)  # group sizes M tried for the N:M layout
DTYPES = {
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


def dtype_name(dt: torch.dtype) -> str:
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
            return {"codec": "narrow", "as": dtype_name(dt)}, v.to(dt)
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


def shape_numel(shape: object) -> int:
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
    numel = shape_numel(shape)
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


__all__ = [
    "DTYPES",
    "NM_CANDIDATES",
    "SCALED_QMAX",
    "decode_tensor",
    "decode_values",
    "dtype_name",
    "encode_tensor",
    "encode_values",
    "pack_bits",
    "scaled_codes",
    "shape_numel",
    "unpack_bits",
]
