"""What an importer gives back, and what the Hugging Face and timm importers share: reading
weight files (safetensors, weights-only pickles, sharded indexes) and loading them strictly."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitcompress.errors import VitcompressError
from vitcompress.models.vit import VIT_PRESETS, VisionTransformer, ViTConfig, vit_config


@dataclass(frozen=True)
class ImportedModel:
    """A foreign model converted to ours.

    Attributes:
        model: our ViT with the imported weights (float32, eval mode).
        model_config: what :func:`vitcompress.models.build_model` takes (``arch`` "vit",
            ``preset`` the matching preset name or None, then the :class:`ViTConfig` fields).
        classes: class names in logit order.
        preprocess: how images were prepared for the model: ``mean`` and ``std`` per channel on
            the 0..1 pixel scale, ``img_size``, ``interpolation`` (a resize mode name),
            ``crop_pct`` (image size / resize size before a centre crop; 1.0 without a crop) and
            ``source`` (the file they come from, or ``"default"`` for the library's defaults).
        source: where it came from: ``kind`` ("hf" or "timm"), ``path``, ``architecture``, the
            files read, their dtypes, the tensors dropped and the source fields that matter.
    """

    model: VisionTransformer
    model_config: dict
    classes: list[str]
    preprocess: dict
    source: dict


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a missing, unreadable or non-object file is a one-line error."""
    if not path.is_file():
        raise VitcompressError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitcompressError(f"{path} is not valid JSON: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise VitcompressError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_file(path: Path) -> Any:
    """What a weight file holds: ``.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True)``, which refuses a pickle that would import or call
    anything but tensors and containers (a checkpoint that would run code when loaded)."""
    if not path.is_file():
        raise VitcompressError(f"{path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            msg = f"{path} is not a readable safetensors file: {one_line(e)}"
            raise VitcompressError(msg) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors: all say "refused"
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise VitcompressError(
                f"{path}: refused to unpickle {found.group(1)}; only tensors are loaded "
                "(weights_only=True), as a pickle can run code. Convert it to safetensors"
            ) from None
        if "Weights only load failed" in str(e):
            raise VitcompressError(
                f"{path} is not a readable weight file: not one torch.save wrote, or a pickle of "
                "more than tensors, which is refused (a pickle can run code)"
            ) from None
        raise VitcompressError(f"{path} is not a readable weight file: {one_line(e)}") from None


def tensor_dict(obj: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise VitcompressError(f"{where} holds no state dict (a dict of name -> tensor)")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise VitcompressError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj


def read_weights(path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict in ``path`` (one file, or a ``*.index.json`` of shards) and the files read.

    A shard index is ``{"weight_map": {tensor name: file name}}`` as transformers writes it;
    every file must sit next to the index, and every tensor it names must be in its shard.
    """
    if not path.name.endswith(".index.json"):
        return tensor_dict(read_file(path), str(path)), [path.name]
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise VitcompressError(f"{path} has no weight_map (tensor name -> shard file)")
    state: dict[str, Tensor] = {}
    files = sorted(set(map(str, weight_map.values())))
    for name in files:
        if Path(name).name != name:
            raise VitcompressError(f"{path}: shard {name!r} must be a file next to the index")
        shard = tensor_dict(read_file(path.parent / name), name)
        missing = sorted(k for k, f in weight_map.items() if f == name and k not in shard)
        if missing:
            raise VitcompressError(f"{path}: {missing[0]!r} is not in its shard {name}")
        state.update(shard)
    return state, [path.name, *files]


def find_weights(folder: Path) -> Path:
    """The weight file of a saved model folder, in the order transformers looks for them."""
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        if (folder / name).is_file():
            return folder / name
    raise VitcompressError(
        f"{folder} has no weights (model.safetensors, pytorch_model.bin or a shard index)"
    )


def load_strict(
    cfg: ViTConfig, state: dict[str, Tensor], where: str, origin: Callable[[str], str] = str
) -> VisionTransformer:
    """Our model for ``cfg`` with every tensor taken from ``state`` (our names), in eval mode.

    Every tensor of the model must be in ``state`` with its shape, and ``state`` must hold
    nothing else; a mismatch is an error naming the tensor as the source calls it
    (``origin(our_name)``). Floating-point tensors of any dtype are copied as float32.
    """
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    expected = model.state_dict()
    for k, ref in expected.items():
        if k not in state:
            raise VitcompressError(f"{where}: weight {origin(k)} is missing")
        v = state[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise VitcompressError(
                f"{where}: {origin(k)} has shape {list(v.shape)}, the model described by its "
                f"config needs {list(ref.shape)}"
            )
        if not v.is_floating_point():
            raise VitcompressError(f"{where}: {origin(k)} is {v.dtype}, not floating point")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise VitcompressError(f"{where}: unexpected weight {origin(extra[0])}")
    # fresh float32 storage for every tensor: nothing shares memory with the file's buffers
    fresh = {k: torch.empty(v.shape, dtype=torch.float32).copy_(v) for k, v in state.items()}
    model.load_state_dict(fresh, strict=True, assign=True)
    return model.eval()


def matching_preset(cfg: ViTConfig) -> str | None:
    """The preset whose config, with ``cfg``'s image size, patch, channels and classes, is
    ``cfg`` exactly (every field, eps and activation included); None if there is none."""
    sizes = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        drop_path_rate=cfg.drop_path_rate,
    )
    for family in ("vit", "deit"):
        for size in VIT_PRESETS:
            if vit_config(f"{family}-{size}", **sizes) == cfg:
                return f"{family}-{size}"
    return None


def dtypes_of(state: dict[str, Tensor]) -> list[str]:
    """The dtypes a state dict holds (``source["dtypes"]``: what was upcast to float32)."""
    return sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})


__all__ = [
    "ImportedModel",
    "dtypes_of",
    "find_weights",
    "load_strict",
    "matching_preset",
    "one_line",
    "read_file",
    "read_json",
    "read_weights",
    "tensor_dict",
]
