"""Transfer-learning surgery on our ViT: a new image size, number of input channels or classes.

Convention: every function here returns new tensors or a new model and never changes its
arguments (no trailing underscore anywhere). The model-level functions also return the
updated config dict, so that what a run directory stores (``config.json`` +
``model.safetensors``) always rebuilds the model it holds.

The maths follows timm's, which pretrained ViTs are fine-tuned with:

- :func:`resample_pos_embed` is timm's ``resample_abs_pos_embed``: the patch-grid part of the
  position embedding is resized as an image (bicubic, antialiased when shrinking), the class
  and distillation tokens' positions are kept as they are.
- :func:`adapt_input_conv` is timm's ``adapt_input_conv``: for one channel the RGB kernels are
  summed (a gray image then gives exactly the RGB model's embedding of that image in colour
  R = G = B); for more channels they are repeated and scaled by ``old / new`` channels, so an
  image whose channels are copies of one another still gives the same embedding.
- :func:`reset_head` gives new class heads (``head``, and ``head_dist`` for a DeiT that has
  one), zero-initialised by default: the fine-tuning starts from uniform predictions and the
  pretrained features, not from a random readout.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitcompress.errors import VitcompressError
from vitcompress.models.vit import VisionTransformer

HEAD_INITS = ("zeros", "trunc_normal")


def resample_pos_embed(
    posemb: Tensor,
    new_grid: int | tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """``posemb`` (1, prefix + H*W, C) resized to a ``new_grid`` of patches (timm's maths).

    Args:
        posemb: the position embedding; its first ``num_prefix_tokens`` rows (class token,
            distillation token) are kept unchanged.
        new_grid: patches per side, or (rows, columns).
        old_grid: the current grid; square if None.
        interpolation: an ``F.interpolate`` mode (timm uses bicubic).
        antialias: low-pass filter when shrinking (timm's default), as an image resize does.

    Returns:
        A new tensor (1, prefix + rows*cols, C) in ``posemb``'s dtype; ``posemb`` itself when
        the grid does not change.
    """
    new = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise VitcompressError(
            f"pos_embed has {n} patch positions, not a {old_grid[0]}x{old_grid[1]} grid"
        )
    if tuple(old_grid) == new:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    c = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)  # (1, C, H, W)
    grid = F.interpolate(grid, size=new, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], c).to(posemb.dtype)  # (1, N', C)
    return torch.cat([prefix, grid], dim=1)


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """A patch-embedding kernel (C, in, p, p) for ``in_chans`` input channels (timm's maths):
    summed over the old channels for 1, repeated and scaled by ``in / in_chans`` otherwise."""
    c_out, c_in, kh, kw = weight.shape
    if in_chans < 1:
        raise VitcompressError(f"in_chans must be >= 1, got {in_chans}")
    w = weight.float()
    if in_chans == c_in:
        w = w.clone()
    elif in_chans == 1:
        w = w.sum(dim=1, keepdim=True)  # (C, 1, p, p)
    else:
        repeat = math.ceil(in_chans / c_in)
        w = w.repeat(1, repeat, 1, 1)[:, :in_chans] * (c_in / in_chans)  # (C, in_chans, p, p)
    return w.to(weight.dtype)


def _new_head(old: nn.Module, dim: int, num_classes: int, init: str) -> nn.Linear:
    ref = next(old.parameters())
    head = nn.Linear(dim, num_classes, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if init == "zeros":
            head.weight.zero_()
        else:
            nn.init.trunc_normal_(head.weight, std=0.02)  # as the model's own initialisation
        head.bias.zero_()
    return head


def reset_head(
    model: VisionTransformer, num_classes: int, init: str = "zeros"
) -> VisionTransformer:
    """A copy of ``model`` with new heads for ``num_classes`` classes: ``head``, and
    ``head_dist`` for a DeiT that has one; ``init`` is ``"zeros"`` or ``"trunc_normal"``
    (std 0.02, drawn from torch's global generator)."""
    if init not in HEAD_INITS:
        raise VitcompressError(f"head init must be one of {HEAD_INITS}, got {init!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise VitcompressError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    new = copy.deepcopy(model)
    dim = model.cfg.embed_dim
    new.head = _new_head(model.head, dim, num_classes, init).train(model.head.training)
    if model.head_dist is not None:
        new.head_dist = _new_head(model.head_dist, dim, num_classes, init)
        new.head_dist.train(model.head_dist.training)
    new.num_classes = num_classes
    new.cfg = replace(model.cfg, num_classes=num_classes)
    return new


def adapt_model(
    model: VisionTransformer,
    config: dict,
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    head_init: str = "zeros",
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> tuple[VisionTransformer, dict]:
    """``model`` and its ``config`` dict made to fit a new task; None keeps a setting.

    Args:
        img_size: a new input size (a multiple of the patch size): the position embedding is
            resampled to the new patch grid (:func:`resample_pos_embed`).
        in_chans: a new number of input channels (:func:`adapt_input_conv`).
        num_classes: a new number of classes: new heads (:func:`reset_head`); an unchanged
            number keeps the heads.

    Returns:
        A new model and config dict; ``build_model(config)`` rebuilds that model (its weights
        then load by name). The arguments are left as they were.
    """
    cfg = model.cfg
    differ = [k for k, v in cfg.to_dict().items() if k in config and config[k] != v]
    if differ:
        k = differ[0]
        raise VitcompressError(f"config has {k} {config[k]!r}, the model {getattr(cfg, k)!r}")
    img_size = cfg.img_size if img_size is None else img_size
    in_chans = cfg.in_chans if in_chans is None else in_chans
    new_cfg = replace(cfg, img_size=img_size, in_chans=in_chans)  # validates the new numbers
    if num_classes is not None and num_classes != cfg.num_classes:
        new = reset_head(model, num_classes, head_init)
    else:
        new = copy.deepcopy(model)
    proj = new.patch_embed.proj
    if type(proj) is not nn.Conv2d:
        raise VitcompressError(f"patch_embed.proj is a {type(proj).__name__}, not a Conv2d")
    with torch.no_grad():
        if in_chans != cfg.in_chans:
            conv = nn.Conv2d(in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size,
                             device=proj.weight.device, dtype=proj.weight.dtype)  # fmt: skip
            conv.weight.copy_(adapt_input_conv(proj.weight, in_chans))
            conv.bias.copy_(proj.bias)
            new.patch_embed.proj = conv
        if img_size != cfg.img_size:
            grid = img_size // cfg.patch_size
            posemb = resample_pos_embed(
                new.pos_embed.detach(), grid, new.num_prefix_tokens, None, interpolation, antialias
            )
            new.pos_embed = nn.Parameter(posemb, requires_grad=model.pos_embed.requires_grad)
            new.patch_embed.img_size = img_size
            new.patch_embed.num_patches = grid * grid
    new.cfg = replace(new_cfg, num_classes=new.cfg.num_classes)
    new_config = {**config, "img_size": img_size, "in_chans": in_chans,
                  "num_classes": new.cfg.num_classes}  # fmt: skip
    return new, new_config


__all__ = ["HEAD_INITS", "adapt_input_conv", "adapt_model", "reset_head", "resample_pos_embed"]
