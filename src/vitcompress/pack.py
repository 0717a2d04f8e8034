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

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from vitcompress.codecs import DTYPES, decode_tensor, dtype_name, encode_tensor, shape_numel
from vitcompress.errors import VitcompressError
from vitcompress.fileio import atomic_write_bytes
from vitcompress.formats import same_bits
from vitcompress.models import build_model
from vitcompress.sparsity import MASK
from vitcompress.steps.registry import describe_structure, rebuild_structure_

META_KEY = "vitcompress.pack"
# 3: the structure is the config's "compression" records (vitcompress.steps.registry);
# 2: a structure dict of its own beside the config; both: one compressed header + one data blob
VERSION = 3
READABLE = ("2", "3")
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
        if v.layout != torch.strided or dtype_name(v.dtype) not in DTYPES:
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
            spec = {"how": how, "module": name, "dtype": dtype_name(m.weight.dtype)}
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
                entries[wk] = {"shape": list(state[wk].shape), "dtype": dtype_name(dec.dtype)}
                entries[wk].update(meta)
                blobs.update({f"{wk}#{s}": b for s, b in bl.items()})
                mask_of[mk] = wk

    for k, v in state.items():
        if k in entries or k in derived or k in mask_of:
            continue
        meta, bl = encode_tensor(v)
        entries[k] = {"shape": list(v.shape), "dtype": dtype_name(v.dtype), **meta}
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
        index[k] = {"dtype": dtype_name(v.dtype), "numel": v.numel(), "offset": offset}
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
            numel = shape_numel(e["shape"])
        except VitcompressError as err:
            raise ValueError(f"entry {key!r}: {err}") from None
        cost += numel * max(_elsize(DTYPES[e["dtype"]]), 4)
    masked = list(header["mask_of"].values())
    for wk in masked:
        if not isinstance(wk, str) or wk not in header["entries"]:
            raise ValueError(f"a mask is the support of {str(wk)[:80]!r}, which is not stored")
        cost += shape_numel(header["entries"][wk]["shape"])
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
            dt = DTYPES[b["dtype"]]
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
        budget -= math.prod(want[key]) * max(_elsize(DTYPES[spec["dtype"]]), 4)
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
            t, support = decode_tensor(e, grouped.get(key, {}), e["shape"], DTYPES[e["dtype"]])
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
            state[key] = m.derived_weight(spec["how"], codes).to(DTYPES[spec["dtype"]])
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
    "legacy_records",
    "load_packed",
    "module_bytes",
    "save_packed",
    "stored_bytes_by_tensor",
    "with_model_config",
]
