"""Import timm ViT and DeiT checkpoints into our :class:`VisionTransformer`, exactly.

Our model has timm's layout and names, so a timm state dict loads by name: importing is
reading the file, working out the numbers the weights do not carry, and refusing every timm
feature we do not model, rather than dropping or approximating it.

Our presets use timm's sizes: ``vit-tiny`` / ``vit-small`` / ``vit-base`` are the widths of
timm's ``vit_tiny_patch16_224`` / ``vit_small_patch16_224`` / ``vit_base_patch16_224``
(embed 192 / 384 / 768, depth 12, heads 3 / 6 / 12, MLP ratio 4), and ``deit-<size>`` those
of ``deit_<size>_distilled_patch16_224`` (the same plus a distillation token and head).
timm's non-distilled ``deit_<size>_patch16_224`` is a plain ViT (``vit-<size>``).

What the weights tell (embed_dim, depth, MLP width, patch size, channels, image size, classes,
distillation token and head, qkv bias) is read from their shapes. The number of heads is not
in any shape: it comes from a preset, a timm architecture name (tiny 3, small 6, base 12,
large / huge / giant 16), or ``num_heads=``. timm's LayerNorm eps (1e-6) and exact GELU are
our defaults. What both importers share (:class:`ImportedModel`, reading weight files, strict
loading) lives in :mod:`vitcompress.models.imported`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from vitcompress.config import check_known_fields
from vitcompress.errors import VitcompressError
from vitcompress.models.imported import (
    ImportedModel,
    dtypes_of,
    find_weights,
    load_strict,
    matching_preset,
    read_file,
    read_json,
    read_weights,
    tensor_dict,
)
from vitcompress.models.vit import ViTConfig, vit_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)

# timm's size names: (embed_dim, num_heads)
TIMM_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (192, 3),
    "small": (384, 6),
    "base": (768, 12),
    "large": (1024, 16),
    "huge": (1280, 16),
    "giant": (1408, 16),
    "gigantic": (1664, 16),
}
# The plain timm ViT / DeiT architectures, the only names whose maths we know are ours: other
# vit_* names (clip, siglip, gap, reg4, rpn, xp, ...) reuse the key names with different maths.
_ARCH = re.compile(
    r"^(?P<family>vit|deit)_(?P<size>[a-z]+)_(?P<distilled>distilled_)?"
    r"patch(?P<patch>\d+)_(?P<img>\d+)(\.[\w-]+)?$"
)
# Weights of timm features that change the maths and that our model does not have.
_UNMODELLED = [
    (r"^fc_norm\.", "global average pooling with fc_norm (global_pool='avg')"),
    (r"^reg_token$", "register tokens (reg_tokens)"),
    (r"^blocks\.\d+\.ls[12]\.gamma$|^blocks\.\d+\.gamma_[12]$", "layer scale (init_values)"),
    (r"^norm_pre\.", "a pre-norm before the blocks (pre_norm, CLIP style)"),
    (r"^blocks\.\d+\.attn\.[qk]_norm\.", "query/key normalisation (qk_norm)"),
    (r"^blocks\.\d+\.(attn|mlp)\.norm\.", "a norm inside attention or MLP (scale_attn/mlp_norm)"),
    (r"^attn_pool\.", "attention pooling (global_pool='map')"),
    (r"^mask_token$", "a mask token (DINOv2 / masked image modelling)"),
]
# Weights timm itself drops when it loads a checkpoint into a plain ViT.
_DROPPED = re.compile(r"^pre_logits\.")
# model_args in a timm hub config.json: those that must keep a value that means "as our model"
# (timm's default), and those that do not change the maths of a model in eval mode at its own
# image size.
_MODEL_ARGS_FIXED: dict[str, tuple] = {
    "class_token": (True,),
    "global_pool": ("token",),
    "no_embed_class": (False,),
    "reg_tokens": (0,),
    "init_values": (None,),
    "fc_norm": (None, False),
    "pre_norm": (False,),
    "qk_norm": (False,),
    "act_layer": (None, "gelu"),
}
_MODEL_ARGS_IGNORED = set(
    "drop_rate pos_drop_rate patch_drop_rate proj_drop_rate attn_drop_rate drop_path_rate "
    "dynamic_img_size weight_init".split()
)
_MODEL_ARGS_FIELDS = set(
    "img_size patch_size in_chans num_classes embed_dim depth num_heads mlp_ratio qkv_bias".split()
)
_MODEL_ARGS_KNOWN = set(_MODEL_ARGS_FIXED) | _MODEL_ARGS_IGNORED | _MODEL_ARGS_FIELDS


def unwrap_state_dict(obj: Any, where: str) -> tuple[dict[str, Tensor], dict]:
    """A timm state dict out of a training checkpoint, as timm's own loader finds it: under
    ``"model"`` (DeiT's checkpoints) and/or ``"state_dict"`` (timm's train script), with DDP's
    ``module.`` prefix removed. Returns the dict and ``{"wrapper": [...], "prefix": ...}``."""
    wrapper = []
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            wrapper.append(key)
    state = tensor_dict(obj, where)
    prefix = None
    if all(k.startswith("module.") for k in state):
        prefix = "module."
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, {"wrapper": wrapper, "prefix": prefix}


def parse_architecture(name: str) -> dict:
    """The numbers in a plain timm ViT / DeiT architecture name (a ``.tag`` is allowed):
    ``{"num_heads", "embed_dim", "patch_size", "img_size", "distilled"}``."""
    m = _ARCH.match(name)
    if not m or m["size"] not in TIMM_SIZES:
        raise VitcompressError(
            f"timm architecture {name!r} is not a plain ViT/DeiT that vitcompress models "
            "exactly (vit_<size>_patch<P>_<S> or deit_<size>[_distilled]_patch<P>_<S>, size one "
            f"of {', '.join(TIMM_SIZES)})"
        )
    if m["family"] == "vit" and m["distilled"]:
        raise VitcompressError(f"timm architecture {name!r}: only deit_* names are distilled")
    embed_dim, heads = TIMM_SIZES[m["size"]]
    return dict(
        num_heads=heads,
        embed_dim=embed_dim,
        patch_size=int(m["patch"]),
        img_size=int(m["img"]),
        distilled=bool(m["distilled"]),
    )


def _preset_fields(preset: str) -> tuple[dict, str]:
    """The fields a preset or a timm architecture name fixes, and how to name it in errors."""
    if "_" in preset:
        fields = parse_architecture(preset)
        fields.pop("img_size")  # the weights say which size they were trained at
        return fields, f"architecture {preset}"
    cfg = vit_config(preset)
    fields = dict(
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        distilled=cfg.distilled,
    )
    return fields, f"preset {preset}"


def check_timm_keys(state: dict[str, Tensor], where: str) -> list[str]:
    """Refuse timm features we do not model; returns the keys timm itself would drop."""
    for k in state:
        for pattern, what in _UNMODELLED:
            if re.search(pattern, k):
                raise VitcompressError(
                    f"{where}: {k} belongs to {what}, which vitcompress's ViT does not have; "
                    "it cannot be imported exactly"
                )
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if k not in state:
            what = " (a ViT without class token, class_token=False)" if k == "cls_token" else ""
            raise VitcompressError(f"{where}: weight {k} is missing{what}")
    if "head.weight" not in state:
        raise VitcompressError(
            f"{where}: no classification head (head.weight): a feature extractor "
            "(num_classes=0) cannot be imported; reset the head of a model that has one"
        )
    return sorted(k for k in state if _DROPPED.match(k))


def infer_timm_config(state: dict[str, Tensor], where: str) -> dict[str, tuple[Any, str]]:
    """Every :class:`ViTConfig` field the shapes of a timm state dict fix, with the tensor
    that fixes it: ``{field: (value, tensor name)}``."""
    w = state["patch_embed.proj.weight"]  # (C, in, p, p)
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise VitcompressError(
            f"{where}: patch_embed.proj.weight {list(w.shape)} is no square Conv2d kernel"
        )
    dim = state["cls_token"].shape[-1]
    depth = len({int(k.split(".")[1]) for k in state if re.match(r"blocks\.\d+\.", k)})
    if any(f"blocks.{i}.norm1.weight" not in state for i in range(depth)):
        raise VitcompressError(f"{where}: blocks are not numbered 0..{depth - 1}")
    hidden = {
        state[f"blocks.{i}.mlp.fc1.weight"].shape[0]
        for i in range(depth)
        if f"blocks.{i}.mlp.fc1.weight" in state
    }
    if len(hidden) > 1:
        raise VitcompressError(f"{where}: the blocks' MLP widths differ {sorted(hidden)}")
    distilled = "dist_token" in state
    prefix = 2 if distilled else 1
    n_pos = state["pos_embed"].shape[1]
    grid = math.isqrt(max(n_pos - prefix, 0))
    if grid * grid != n_pos - prefix or grid == 0:
        no_embed_class = math.isqrt(n_pos) ** 2 == n_pos
        why = (
            " (no class-token slot: no_embed_class, DeiT III / big_vision, not modelled)"
            if no_embed_class
            else ""
        )
        raise VitcompressError(
            f"{where}: pos_embed has {n_pos} positions, not {prefix} + a square patch grid{why}"
        )
    patch = int(w.shape[-1])
    out = {
        "embed_dim": (dim, "cls_token"),
        "depth": (depth, "blocks.N"),
        "patch_size": (patch, "patch_embed.proj.weight"),
        "in_chans": (int(w.shape[1]), "patch_embed.proj.weight"),
        "img_size": (grid * patch, "pos_embed"),
        "num_classes": (int(state["head.weight"].shape[0]), "head.weight"),
        "distilled": (distilled, "dist_token"),
        "qkv_bias": ("blocks.0.attn.qkv.bias" in state, "blocks.0.attn.qkv.bias"),
    }
    if hidden:
        out["mlp_hidden"] = (hidden.pop(), "blocks.0.mlp.fc1.weight")
    if distilled:
        out["dist_head"] = ("head_dist.weight" in state, "head_dist.weight")
    return out


def timm_config(
    state: dict[str, Tensor], where: str, given: dict[str, Any], given_by: dict[str, str]
) -> ViTConfig:
    """Our config for a timm state dict: shapes first, then ``given`` values (from a preset, an
    architecture name, model_args or the caller, ``given_by`` naming which) for the rest; a
    given value the weights contradict is an error naming both."""
    shapes = infer_timm_config(state, where)
    fields = {k: v for k, (v, _) in shapes.items()}
    mlp_hidden = fields.pop("mlp_hidden", None)
    for k, v in given.items():
        if k == "mlp_ratio" and mlp_hidden is not None and "mlp_hidden" not in given:
            width = int(fields["embed_dim"] * v)
            if width != mlp_hidden:
                raise VitcompressError(
                    f"{where}: {given_by[k]} has mlp_ratio {v} (MLP width {width}), the weights "
                    f"{mlp_hidden} (blocks.0.mlp.fc1.weight)"
                )
        elif k in shapes and v != shapes[k][0]:
            raise VitcompressError(
                f"{where}: {given_by[k]} has {k} {v!r}, the weights {shapes[k][0]!r} "
                f"({shapes[k][1]})"
            )
        fields[k] = v
    if "num_heads" not in fields:
        raise VitcompressError(
            f"{where}: num_heads cannot be read from the weights (embed_dim "
            f"{fields['embed_dim']} splits into any number of heads); give a preset, a timm "
            "architecture name or num_heads="
        )
    if mlp_hidden is not None and "mlp_hidden" not in fields:
        ratio = fields.get("mlp_ratio", mlp_hidden / fields["embed_dim"])
        fields["mlp_ratio"] = ratio
        if int(fields["embed_dim"] * ratio) != mlp_hidden:
            fields["mlp_hidden"] = mlp_hidden
    try:
        return ViTConfig(**fields)
    except VitcompressError as e:
        raise VitcompressError(f"{where}: {e}") from None


def timm_preprocess(
    pretrained_cfg: dict | None, in_chans: int, img_size: int, family: str = "vit"
) -> dict:
    """The preprocessing dict of :class:`ImportedModel` from timm's ``pretrained_cfg``.

    Where it says nothing, timm's defaults for the family: bicubic, crop_pct 0.9, and mean/std
    0.5 for ``vit_*`` (timm's ViT default, that of the Google weights) but ImageNet's for
    ``deit_*``. Other channel counts than 3 get the channel average, repeated.
    """
    p = pretrained_cfg or {}
    mean, std = (
        (IMAGENET_MEAN, IMAGENET_STD) if family == "deit" else (INCEPTION_MEAN, INCEPTION_STD)
    )
    if in_chans != 3:
        mean, std = [sum(mean) / 3] * in_chans, [sum(std) / 3] * in_chans
    size = p.get("input_size", [in_chans, img_size, img_size])
    out = {
        "source": "config.json" if p else "default",
        "mean": [float(x) for x in p.get("mean", mean)],
        "std": [float(x) for x in p.get("std", std)],
        "img_size": int(size[-1]),
        "interpolation": str(p.get("interpolation", "bicubic")),
        "crop_pct": float(p.get("crop_pct", 0.9)),
    }
    if p.get("crop_mode"):
        out["crop_mode"] = str(p["crop_mode"])
    if len(out["mean"]) != in_chans or len(out["std"]) != in_chans or size[-1] != size[-2]:
        raise VitcompressError(
            f"pretrained_cfg: mean/std/input_size {out['mean']}/{out['std']}/{list(size)} do not "
            f"fit a square {in_chans}-channel input"
        )
    return out


def _class_names(labels: Any, n: int, where: str) -> list[str]:
    if labels is None:
        return [str(i) for i in range(n)]
    if isinstance(labels, dict):
        try:
            labels = [labels[k] for k in sorted(labels, key=int)]
        except (ValueError, TypeError):
            raise VitcompressError(f"{where}: label_names keys must be class ids") from None
    if not isinstance(labels, list) or len(labels) != n:
        raise VitcompressError(f"{where}: label_names must name all {n} classes")
    return [str(x) for x in labels]


def _read_hub_config(folder: Path) -> tuple[dict, dict, dict]:
    """``(config, pretrained_cfg, model_args)`` of a timm hub folder, refusing settings we do
    not model."""
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    if "architecture" not in cfg:
        raise VitcompressError(f"{cfg_path} has no 'architecture' (not a timm model folder)")
    pretrained = cfg.get("pretrained_cfg", {})
    if not isinstance(pretrained, dict):
        raise VitcompressError(f"{cfg_path}: pretrained_cfg must be an object")
    if cfg.get("global_pool", "token") != "token":
        raise VitcompressError(
            f"{cfg_path}: global_pool {cfg['global_pool']!r} is not modelled "
            "(vitcompress classifies from the class token)"
        )
    model_args = cfg.get("model_args", {})
    for k, v in model_args.items():
        if k in _MODEL_ARGS_FIXED and v not in _MODEL_ARGS_FIXED[k]:
            raise VitcompressError(f"{cfg_path}: model_args {k}={v!r} is not modelled")
        if k not in _MODEL_ARGS_KNOWN:
            raise VitcompressError(
                f"{cfg_path}: model_args {k!r} is not understood; refusing rather than ignoring it"
            )
    return cfg, pretrained, model_args


def load_timm(path: str | Path, preset: str | None = None, **overrides: Any) -> ImportedModel:
    """Import a timm ViT / DeiT: a weight file, or a folder in timm's hub layout.

    Args:
        path: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state dict (also wrapped as
            ``{"model": ...}`` or ``{"state_dict": ...}``, also with DDP's ``module.``
            prefix), or a folder with timm's ``config.json`` (``architecture``,
            ``pretrained_cfg``, optional ``model_args`` and ``label_names``) and
            ``model.safetensors`` or ``pytorch_model.bin``.
        preset: one of our presets (``vit-small``, ``deit-tiny``, ...) or a plain timm
            architecture name (``vit_small_patch16_224``); required for a bare file unless
            ``num_heads`` is given. A folder's ``architecture`` serves when it is None.
        **overrides: :class:`ViTConfig` fields the weights do not fix (``num_heads``,
            ``layer_norm_eps``, ``act``) or fields to check against them.

    Raises:
        VitcompressError: an unreadable or code-running file, a timm feature we do not model
            (fc_norm / average pooling, register tokens, layer scale, pre-norm, qk-norm, no
            class token, no head), a missing or extra weight, a shape that contradicts the
            preset, architecture or overrides, or heads that cannot be determined.
    """
    path = Path(path)
    check_known_fields(ViTConfig, overrides, "ViT")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    where = str(path)
    hub_cfg, pretrained, model_args = {}, {}, {}
    if path.is_dir():
        hub_cfg, pretrained, model_args = _read_hub_config(path)
        weights = find_weights(path)
    elif path.exists():
        weights = path
    else:
        raise VitcompressError(f"{path} not found")
    if weights.name.endswith(".index.json"):
        raw, files = read_weights(weights)
    else:
        raw, files = read_file(weights), [weights.name]
    state, wrap = unwrap_state_dict(raw, str(weights))
    dropped = check_timm_keys(state, where)
    state = {k: v for k, v in state.items() if k not in dropped}

    given: dict[str, Any] = {}
    given_by: dict[str, str] = {}

    def give(fields: dict, by: str) -> None:
        given.update(fields)
        given_by.update(dict.fromkeys(fields, by))

    architecture = hub_cfg.get("architecture")
    if architecture is not None:
        fields = parse_architecture(architecture)
        fields.pop("img_size")  # timm resamples pos_embed to the name's size; we keep the weights'
        give(fields, f"architecture {architecture}")
    if preset is not None:
        give(*_preset_fields(preset))
    give({k: v for k, v in model_args.items() if k in _MODEL_ARGS_FIELDS}, "model_args")
    if "num_classes" in hub_cfg:
        give({"num_classes": hub_cfg["num_classes"]}, "config.json")
    give(overrides, "the caller")
    cfg = timm_config(state, where, given, given_by)
    model = load_strict(cfg, state, where)
    classes = _class_names(
        hub_cfg.get("label_names", pretrained.get("label_names")), cfg.num_classes, where
    )
    source = {
        "kind": "timm",
        "path": str(path.resolve()),
        "architecture": architecture or (preset if preset and "_" in preset else None),
        "preset": preset,
        "files": files,
        "dtypes": dtypes_of(state),
        "dropped": dropped,
        **wrap,
    }
    named = architecture or preset or ""
    family = "deit" if named.startswith("deit") or cfg.distilled else "vit"
    return ImportedModel(
        model=model,
        model_config={"arch": "vit", "preset": matching_preset(cfg), **cfg.to_dict()},
        classes=classes,
        preprocess=timm_preprocess(pretrained, cfg.in_chans, cfg.img_size, family),
        source=source,
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "TIMM_SIZES",
    "infer_timm_config",
    "load_timm",
    "parse_architecture",
    "timm_preprocess",
    "unwrap_state_dict",
]
