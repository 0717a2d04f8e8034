"""Model registry: every preset by name, built from a config that is plain data."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.models.resnet import RESNET_PRESETS, ResNet, ResNetConfig, resnet_config
from vitcompress.models.vit import VIT_PRESETS, VisionTransformer, ViTConfig, vit_config

PRESETS: list[str] = [f"{fam}-{size}" for fam in ("vit", "deit") for size in VIT_PRESETS] + list(
    RESNET_PRESETS
)


def model_config(name: str, **overrides: Any) -> dict:
    """The full config (a plain dict, with ``arch`` and ``preset``) of a preset with overrides.

    Overrides use the common names ``img_size``, ``patch_size``, ``in_chans``, ``num_classes``;
    ``patch_size`` is ignored by ResNets.
    """
    if name in RESNET_PRESETS:
        overrides.pop("patch_size", None)
        cfg = resnet_config(name, **overrides).to_dict()
        return {"arch": "resnet", "preset": name, **cfg}
    if name.partition("-")[0] in ("vit", "deit") and name.partition("-")[2] in VIT_PRESETS:
        return {"arch": "vit", "preset": name, **vit_config(name, **overrides).to_dict()}
    raise VitcompressError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")


def build_model(config: dict) -> nn.Module:
    """A model from the dict that :func:`model_config` returns (as stored in config.json)."""
    cfg = {k: v for k, v in config.items() if k not in ("arch", "preset")}
    arch = config.get("arch")
    try:
        if arch == "vit":
            return VisionTransformer(ViTConfig(**cfg))
        if arch == "resnet":
            cfg["layers"], cfg["widths"] = tuple(cfg["layers"]), tuple(cfg["widths"])
            return ResNet(ResNetConfig(**cfg))
    except TypeError as e:
        raise VitcompressError(f"model config does not fit {arch!r}: {e}") from None
    raise VitcompressError(f"model config has unknown arch {arch!r} (expected 'vit' or 'resnet')")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build preset ``name`` (``vit-tiny``, ``deit-small``, ``resnet18``, ...) with overrides."""
    return build_model(model_config(name, **overrides))


__all__ = [
    "PRESETS",
    "ResNet",
    "VisionTransformer",
    "build_model",
    "create_model",
    "model_config",
]
