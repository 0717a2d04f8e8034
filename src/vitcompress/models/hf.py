"""Import Hugging Face transformers ViT / DeiT image classifiers into our ViT, exactly.

A folder written by ``save_pretrained`` of ``ViTForImageClassification``,
``DeiTForImageClassification`` or ``DeiTForImageClassificationWithTeacher`` holds
``config.json``, the weights (``model.safetensors``, ``pytorch_model.bin``, or shards with an
``*.index.json``) and often ``preprocessor_config.json``. The weights are renamed to our timm
layout, as timm's ``checkpoint_filter_fn`` does: q, k and v are concatenated into the fused
``qkv`` (weights, and biases when ``qkv_bias``), the rest is a one-to-one rename.

transformers has used two key layouts, and both load:

- the hub layout, which every published checkpoint has and which transformers 5 still writes
  (``save_original_format=True``): ``vit.encoder.layer.N.attention.attention.query``,
  ``...attention.output.dense``, ``intermediate.dense``, ``output.dense``;
- transformers 5's in-memory layout (saved with ``save_original_format=False``, or a raw
  ``state_dict()``): ``vit.layers.N.attention.q_proj`` / ``k_proj`` / ``v_proj`` /
  ``o_proj``, ``mlp.fc1`` / ``mlp.fc2``.

Every config field that changes the maths is honoured (``layer_norm_eps``: HF uses 1e-12 where
timm uses 1e-6, ``hidden_act``, ``qkv_bias``, ``intermediate_size``, ...) or refused in one line.
Dropout probabilities do not matter in eval mode; ``encoder_stride`` and the pooler serve the
masked-image-modelling decoder and ``ViTModel``, not the classifiers, so their fields and the
``pooler`` / ``mask_token`` weights are dropped (and listed in ``source["dropped"]``). A DeiT
without teacher (``DeiTForImageClassification``) keeps its distillation token but classifies
from the class token alone: our ``distilled=True, dist_head=False``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitcompress.errors import VitcompressError
from vitcompress.models.imported import (
    ImportedModel,
    dtypes_of,
    find_weights,
    load_strict,
    matching_preset,
    read_json,
    read_weights,
)
from vitcompress.models.vit import VisionTransformer, ViTConfig

# architecture -> (base model prefix, distilled, dist_head, head names)
ARCHITECTURES: dict[str, tuple[str, bool, bool, tuple[str, ...]]] = {
    "ViTForImageClassification": ("vit", False, False, ("classifier",)),
    "DeiTForImageClassification": ("deit", True, False, ("classifier",)),
    "DeiTForImageClassificationWithTeacher": (
        "deit",
        True,
        True,
        ("cls_classifier", "distillation_classifier"),
    ),
}
# hidden_act -> our act. gelu_new / gelu_fast / gelu_pytorch_tanh are one function, the tanh
# approximation, written three ways that differ by float rounding only.
HF_ACTS: dict[str, str] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# transformers' ViTConfig defaults, for fields a hand-written config.json leaves out
HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
    qkv_bias=True,
)  # fmt: skip
# our name inside a block -> the HF name inside a layer, per layout (see the module docstring)
_BLOCK_KEYS = {
    "hub": ("encoder.layer", {
        "norm1": "layernorm_before", "norm2": "layernorm_after",
        "attn.q": "attention.attention.query", "attn.k": "attention.attention.key",
        "attn.v": "attention.attention.value", "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
    }),
    "transformers5": ("layers", {
        "norm1": "layernorm_before", "norm2": "layernorm_after",
        "attn.q": "attention.q_proj", "attn.k": "attention.k_proj",
        "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }),
}  # fmt: skip
# PIL's resampling filter numbers, as image processors store them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _square(cfg: dict, key: str, where: str) -> int:
    v = cfg.get(key, HF_DEFAULTS[key])
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise VitcompressError(f"{where}: {key} {v} is not square; only square is modelled")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise VitcompressError(f"{where}: {key} must be an integer, got {v!r}")
    return v


def _classes(cfg: dict, where: str) -> list[str]:
    id2label = cfg.get("id2label")
    if id2label is None:
        n = cfg.get("num_labels", 2)  # transformers' default
        if isinstance(n, bool) or not isinstance(n, int):
            raise VitcompressError(f"{where}: num_labels must be an integer, got {n!r}")
        return [f"LABEL_{i}" for i in range(n)]
    try:
        ids = sorted(int(k) for k in id2label)
    except (TypeError, ValueError):
        raise VitcompressError(f"{where}: id2label keys must be class ids") from None
    if ids != list(range(len(ids))):
        raise VitcompressError(f"{where}: id2label must number the classes 0..{len(ids) - 1}")
    return [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids]


def hf_config(cfg: dict, where: str) -> tuple[ViTConfig, str, list[str]]:
    """Our config, the architecture and the class names for a transformers ``config.json``."""
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise VitcompressError(
            f"{where}: architectures {archs!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    arch = archs[0]
    model_type = cfg.get("model_type")
    if model_type not in ("vit", "deit"):
        raise VitcompressError(f"{where}: model_type {model_type!r} is not 'vit' or 'deit'")
    _, distilled, dist_head, _ = ARCHITECTURES[arch]
    get = {k: cfg.get(k, v) for k, v in HF_DEFAULTS.items()}
    hidden, heads, inter = get["hidden_size"], get["num_attention_heads"], get["intermediate_size"]
    ints = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
            "num_channels")  # fmt: skip
    for key in ints:
        if isinstance(get[key], bool) or not isinstance(get[key], int) or get[key] < 1:
            raise VitcompressError(f"{where}: {key} must be an integer >= 1, got {get[key]!r}")
    if hidden % heads:
        raise VitcompressError(
            f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )
    if cfg.get("head_dim", hidden // heads) != hidden // heads:
        raise VitcompressError(
            f"{where}: head_dim {cfg['head_dim']} x num_attention_heads {heads} must equal "
            f"hidden_size {hidden}"
        )
    act = get["hidden_act"]
    if act not in HF_ACTS:
        raise VitcompressError(
            f"{where}: hidden_act {act!r} is not supported; one of {', '.join(HF_ACTS)}"
        )
    classes = _classes(cfg, where)
    ratio = inter / hidden
    try:
        vit = ViTConfig(
            img_size=_square(cfg, "image_size", where),
            patch_size=_square(cfg, "patch_size", where),
            in_chans=get["num_channels"],
            num_classes=len(classes),
            embed_dim=hidden,
            depth=get["num_hidden_layers"],
            num_heads=heads,
            mlp_ratio=ratio,
            mlp_hidden=None if int(hidden * ratio) == inter else inter,
            distilled=distilled,
            dist_head=dist_head if distilled else True,
            qkv_bias=get["qkv_bias"],
            layer_norm_eps=get["layer_norm_eps"],
            act=HF_ACTS[act],
        )
    except VitcompressError as e:
        raise VitcompressError(f"{where}: {e}") from None
    return vit, arch, classes


def _layout(state: dict[str, Tensor], p: str, where: str) -> str:
    found = [name for name, (layers, _) in _BLOCK_KEYS.items()
             if any(k.startswith(f"{p}.{layers}.") for k in state)]  # fmt: skip
    if len(found) != 1:
        what = "both" if found else "neither"
        raise VitcompressError(
            f"{where}: the weights have {what} of {p}.encoder.layer.N / {p}.layers.N "
            f"(the two transformers layouts of {p!r} models)"
        )
    return found[0]


def hf_key_plan(cfg: ViTConfig, arch: str, layout: str) -> dict[str, list[str]]:
    """Our tensor name -> the HF tensor names it is made of (q, k, v for the fused qkv)."""
    p, _, _, heads = ARCHITECTURES[arch]
    layers, table = _BLOCK_KEYS[layout]
    wb = ("weight", "bias")
    emb = f"{p}.embeddings"
    plan = {"cls_token": [f"{emb}.cls_token"], "pos_embed": [f"{emb}.position_embeddings"]}
    if cfg.distilled:
        plan["dist_token"] = [f"{emb}.distillation_token"]
    plan |= {f"patch_embed.proj.{t}": [f"{emb}.patch_embeddings.projection.{t}"] for t in wb}
    for i in range(cfg.depth):
        pre = f"{p}.{layers}.{i}."
        for ours in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            plan |= {f"blocks.{i}.{ours}.{t}": [f"{pre}{table[ours]}.{t}"] for t in wb}
        for t in wb if cfg.qkv_bias else ("weight",):
            plan[f"blocks.{i}.attn.qkv.{t}"] = [f"{pre}{table['attn.' + c]}.{t}" for c in "qkv"]
    plan |= {f"norm.{t}": [f"{p}.layernorm.{t}"] for t in wb}
    for ours, theirs in zip(("head", "head_dist"), heads, strict=False):
        plan |= {f"{ours}.{t}": [f"{theirs}.{t}"] for t in wb}
    return plan


def convert_hf_state_dict(
    state: dict[str, Tensor], cfg: ViTConfig, arch: str, where: str
) -> tuple[dict[str, Tensor], dict]:
    """HF tensors -> ours, strictly: every tensor our model needs, with its shape, and no HF
    tensor left over but the pooler's and the mask token. Returns our state dict and
    ``{"layout": ..., "dropped": [...]}``."""
    p = ARCHITECTURES[arch][0]
    if not any(k.startswith(p + ".") for k in state):
        raise VitcompressError(f"{where}: no '{p}.' weights: not a {arch} checkpoint")
    layout = _layout(state, p, where)
    with torch.device("meta"):
        expected = VisionTransformer(cfg).state_dict()
    out: dict[str, Tensor] = {}
    for ours, theirs in hf_key_plan(cfg, arch, layout).items():
        shape = list(expected[ours].shape)
        shape[0] //= len(theirs)  # q, k and v each give a third of qkv's rows
        for name in theirs:
            if name not in state:
                raise VitcompressError(f"{where}: weight {name} is missing")
            if list(state[name].shape) != shape:
                raise VitcompressError(
                    f"{where}: {name} has shape {list(state[name].shape)}, config.json "
                    f"implies {shape}"
                )
        parts = [state[name] for name in theirs]
        out[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    used = {n for names in hf_key_plan(cfg, arch, layout).values() for n in names}
    ignorable = re.compile(rf"^{p}\.(pooler\.dense\.(weight|bias)|embeddings\.mask_token)$")
    left = sorted(k for k in state if k not in used)
    unknown = [k for k in left if not ignorable.match(k)]
    if unknown:
        raise VitcompressError(
            f"{where}: unexpected weight {unknown[0]} (not used by {arch}); refusing rather than "
            "dropping it"
        )
    return out, {"layout": layout, "dropped": left}


def hf_preprocess(folder: Path, in_chans: int, img_size: int) -> dict:
    """The preprocessing dict of :class:`ImportedModel` from ``preprocessor_config.json``.

    Mean and std are restated for images on the 0..1 scale: the processor computes
    ``(x255 * rescale_factor - mean) / std``, which equals ``(x01 - mean') / std'`` with
    ``mean' = mean / (255 rescale_factor)`` (likewise std'), so any rescale_factor, or none, is
    kept exactly. Without the file: transformers' ViT defaults (mean = std = 0.5, bilinear
    resize to the model's size), with ``"source": "default"``.
    """
    path = folder / "preprocessor_config.json"
    c = in_chans
    if not path.is_file():
        return {"source": "default", "mean": [0.5] * c, "std": [0.5] * c,
                "img_size": img_size, "interpolation": "bilinear", "crop_pct": 1.0}  # fmt: skip
    p = read_json(path)

    def per_channel(key: str, default: float) -> list[float]:
        v = p.get(key, default)
        v = [v] * c if isinstance(v, (int, float)) else v
        if not isinstance(v, list) or len(v) != c:
            raise VitcompressError(f"{path}: {key} must give {c} channel values, got {v!r}")
        return [float(x) for x in v]

    k = 255.0 * float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0
    if p.get("do_normalize", True):
        mean, std = per_channel("image_mean", 0.5), per_channel("image_std", 0.5)
    else:
        mean, std = [0.0] * c, [1.0] * c
    size = p.get("size", {"height": img_size, "width": img_size})
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", img_size))
    resize = int(size) if p.get("do_resize", True) else img_size
    crop = p.get("crop_size") if p.get("do_center_crop", False) else None
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("width"))
    resample = p.get("resample", 2)
    return {
        "source": "preprocessor_config.json",
        "mean": [m / k for m in mean],
        "std": [s / k for s in std],
        "img_size": int(crop) if crop else resize,
        "interpolation": _RESAMPLE.get(resample, str(resample)),
        "crop_pct": int(crop) / resize if crop else 1.0,
    }


def load_hf(path: str | Path) -> ImportedModel:
    """Import a folder written by transformers' ``save_pretrained`` (module docstring).

    Raises:
        VitcompressError: a missing folder or file, a corrupt ``config.json``, an architecture
            other than the three image classifiers, a config field we cannot honour, a missing,
            extra or misshapen weight, or a pickle that would run code.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise VitcompressError(f"{folder} is not a folder (a transformers save_pretrained output)")
    cfg_path = folder / "config.json"
    raw_cfg = read_json(cfg_path)
    cfg, arch, classes = hf_config(raw_cfg, str(cfg_path))
    weights = find_weights(folder)
    state, files = read_weights(weights)
    ours, info = convert_hf_state_dict(state, cfg, arch, str(weights))
    model = load_strict(cfg, ours, str(weights))
    kept = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "layer_norm_eps", "image_size", "patch_size",
            "num_channels", "qkv_bias", "transformers_version", "dtype", "torch_dtype")  # fmt: skip
    source = {
        "kind": "hf",
        "path": str(folder.resolve()),
        "architecture": arch,
        "files": files,
        "dtypes": dtypes_of(state),
        **info,
        "config": {k: raw_cfg[k] for k in kept if k in raw_cfg},
    }
    return ImportedModel(
        model=model,
        model_config={"arch": "vit", "preset": matching_preset(cfg), **cfg.to_dict()},
        classes=classes,
        preprocess=hf_preprocess(folder, cfg.in_chans, cfg.img_size),
        source=source,
    )


__all__ = [
    "ARCHITECTURES",
    "HF_ACTS",
    "convert_hf_state_dict",
    "hf_config",
    "hf_key_plan",
    "hf_preprocess",
    "load_hf",
]
