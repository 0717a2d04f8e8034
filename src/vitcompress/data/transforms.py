"""Per-sample image transforms on CHW tensors: pure torch, cheap enough for 60k samples an epoch.

Training augmentation is a random crop with zero padding (the same as torchvision's
``RandomCrop(size, padding=pad)``: the image moves by up to ``pad`` pixels each way and the
uncovered border is black) and a random horizontal flip; then every image, train or test, is
normalised by the dataset's per-channel mean and std.

Random numbers come from torch's global generator, one draw per sample. A ``DataLoader`` with
workers seeds each worker from its own generator (see ``make_loader``); in the main process
``torch.manual_seed`` at the start of a run makes every epoch repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitcompress.errors import VitcompressError

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, the ones PIL's "L" conversion uses


def default_pad(img_size: int) -> int:
    """Crop padding: an eighth of the side (3 px at 28, 4 at 32, 28 at 224), CIFAR's usual ratio."""
    return max(1, img_size // 8)


def to_channels(x: Tensor, channels: int) -> Tensor:
    """(..., C, H, W) -> (..., channels, H, W): gray repeated to 3 (a view), RGB to luminance.

    uint8 in gives uint8 out (rounded); float in gives float out.
    """
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA, dtype=torch.float32).view(3, 1, 1)
        y = (x.float() * w).sum(-3, keepdim=True)
        return y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y
    raise VitcompressError(f"cannot convert images with {c} channels to {channels}; use 1 or 3")


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def check_interpolation(mode: str) -> None:
    if mode not in INTERPOLATIONS:
        raise VitcompressError(
            f"interpolation {mode!r} is not supported; use one of {', '.join(INTERPOLATIONS)}"
        )


def resize(x: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """(C, H, W) or (N, C, H, W) -> size x size (``mode``: bilinear or bicubic with antialias,
    or nearest); uint8 stays uint8."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    check_interpolation(mode)
    y = x.float() if x.dim() == 4 else x.float()[None]  # (N, C, H, W)
    if mode == "nearest":
        y = F.interpolate(y, size=(size, size), mode="nearest")
    else:
        y = F.interpolate(y, size=(size, size), mode=mode, antialias=True, align_corners=False)
    if x.dim() == 3:
        y = y[0]
    if x.dtype == torch.uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size`` x ``size`` window of (..., H, W) images (H, W >= size)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def resize_crop(x: Tensor, size: int, mode: str = "bilinear", crop_pct: float = 1.0) -> Tensor:
    """Resize to ``floor(size / crop_pct)`` then keep the central ``size`` square: the eval
    transform of timm and Hugging Face (``crop_pct`` 1.0: a plain resize)."""
    outer = scaled_size(size, crop_pct)
    y = resize(x, outer, mode)
    return y if outer == size else center_crop(y, size)


def scaled_size(size: int, crop_pct: float) -> int:
    """The side images are resized to before a centre crop to ``size`` (timm's rule)."""
    if not 0 < crop_pct <= 1:
        raise VitcompressError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    return max(size, int(size / crop_pct))


def crop_shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """The crop window moved by (dy, dx): ``out[..., i, j] = x[..., i + dy, j + dx]``, zero outside.

    Equal to zero-padding by ``max(|dy|, |dx|)`` and cropping the original size at that offset.
    Returns ``x`` itself when there is nothing to move.
    """
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = x[
        ..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Pixels on the 0..255 scale (uint8 or float) -> float32 ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x.float() / 255 - m) / s


class ImageTransform:
    """uint8 (C, H, W) -> float32 (channels, size, size): [resize], [crop + flip], normalise.

    Args:
        mean: per-channel mean of the output channels, on the 0..1 pixel scale.
        std: per-channel std, same length as ``mean``.
        augment: random crop with zero padding and (if ``flip``) a random horizontal flip.
        pad: crop padding in pixels; ``None`` picks ``default_pad`` of the output size.
        flip: allow the horizontal flip when augmenting.
        size: resize every sample to this side here (used when a resize of the whole dataset at
            load time would not fit in memory); ``None`` keeps the size it comes with.
        interpolation, crop_pct: how that resize is done (:func:`resize_crop`).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        pad: int | None = None,
        flip: bool = True,
        size: int | None = None,
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
    ) -> None:
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise VitcompressError(f"mean {mean} and std {std} must both have 1 or 3 values")
        if min(std) <= 0:
            raise VitcompressError(f"std {std} must be positive")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channels = len(mean)
        self.augment = augment
        self.pad = pad
        self.flip = flip
        self.size = size
        check_interpolation(interpolation)
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        # (x / 255 - mean) / std == x * scale + bias, one fused op per sample
        s = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * s)
        self._bias = -torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / s

    def __call__(self, x: Tensor) -> Tensor:
        if self.size is not None:
            x = resize_crop(x, self.size, self.interpolation, self.crop_pct)
        if x.shape[-3] == 3 and self.channels == 1:
            x = to_channels(x, 1)
        if self.augment:
            pad = default_pad(x.shape[-1]) if self.pad is None else self.pad
            n = 2 * pad + 1
            r = int(torch.randint(n * n * 2, ()).item())  # one draw: dy, dx and the flip
            dy, dx, flip = r % n - pad, (r // n) % n - pad, r // (n * n)
            if flip and self.flip:
                x = x.flip(-1)
            x = crop_shift(x, dy, dx)
        # broadcasting a 1-channel image against 3-channel scale/bias repeats gray to RGB
        return torch.addcmul(self._bias, x.float(), self._scale)  # (channels, H, W)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(mean={self.mean}, std={self.std}, augment={self.augment}, "
            f"pad={self.pad}, flip={self.flip}, size={self.size})"
        )
