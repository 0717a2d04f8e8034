"""Datasets held in memory as one uint8 tensor (fashion-mnist, cifar10), prepared once at load.

Channel reduction (RGB to luminance) and the resize run once over the whole split when the
result fits in ``EAGER_BYTES``; a larger result (fashion-mnist at 224 px is 3 GB) is resized
per sample instead. Gray to RGB is never stored: normalisation broadcasts it per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vitcompress.data.transforms import ImageTransform, resize_crop, to_channels

EAGER_BYTES = 1 << 30  # largest split resized at load time
_CHUNK = 4096  # images per chunk in whole-split conversions (bounds the float temporaries)


class TensorImageDataset(Dataset):
    """(transform(images[i]), label) pairs over uint8 images (N, C, H, W) and int64 labels (N,)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        transform: Callable[[Tensor], Tensor],
    ) -> None:
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.transform = transform
        self._labels = labels.tolist()  # python ints: no tensor op per sample for the label

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.images[i]), self._labels[i]


def _map_chunks(images: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return torch.cat([fn(images[i : i + _CHUNK]) for i in range(0, len(images), _CHUNK)])


def uint8_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the 0..1 scale."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(images), _CHUNK):
        x = images[i : i + _CHUNK].double().transpose(0, 1).reshape(c, -1) / 255  # (C, n*H*W)
        s += x.sum(1)
        s2 += (x * x).sum(1)
    n = images[:, 0].numel()
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


def build(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    img_size: int,
    channels: int,
    augment: bool,
    flip: bool,
    pad: int | None = None,
    limit: int | None,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    fixed_stats: bool = False,
) -> tuple[TensorImageDataset, TensorImageDataset, tuple[float, ...], tuple[float, ...]]:
    """Train and test datasets from uint8 (N, C, H, W) images and labels; returns the stats used.

    ``mean``/``std`` describe the stored channels; they are repeated for gray shown as RGB and
    recomputed from the whole training split for RGB shown as gray (luminance std is not a
    function of the per-channel ones), unless ``fixed_stats`` (a model's own normalisation,
    given for the output channels). Images are resized as ``interpolation`` and ``crop_pct``
    say (:func:`~vitcompress.data.transforms.resize_crop`).
    """
    (xtr, ytr), (xte, yte) = train, test
    stored = xtr.shape[1]
    if stored == 3 and channels == 1:
        xtr, xte = (_map_chunks(x, lambda b: to_channels(b, 1)) for x in (xtr, xte))
        if not fixed_stats:
            mean, std = uint8_stats(xtr)
    elif stored == 1 and channels == 3 and not fixed_stats:
        mean, std = tuple(mean) * 3, tuple(std) * 3
    if limit is not None:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]

    datasets = []
    for x, y, aug in ((xtr, ytr, augment), (xte, yte, False)):
        lazy = None
        if tuple(x.shape[-2:]) != (img_size, img_size) or crop_pct != 1.0:
            if len(x) * x.shape[1] * img_size * img_size <= EAGER_BYTES:
                x = _map_chunks(x, lambda b: resize_crop(b, img_size, interpolation, crop_pct))
            else:
                lazy = img_size
        t = ImageTransform(mean, std, augment=aug, flip=flip, size=lazy, pad=pad,
                           interpolation=interpolation, crop_pct=crop_pct)  # fmt: skip
        datasets.append(TensorImageDataset(x.contiguous(), y, classes, t))
    return datasets[0], datasets[1], tuple(map(float, mean)), tuple(map(float, std))
