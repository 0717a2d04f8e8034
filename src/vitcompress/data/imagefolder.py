"""A folder of images, one sub-folder per class (the RESISC45 layout), read lazily with PIL.

Layouts:
    PATH/<class>/**/*.jpg                    split here: per class, ``val_fraction`` held out
    PATH/train/<class>/..., PATH/val/<class>/...  (or ``test/``; ``val/`` wins if both exist)

Files are images when their extension is one of ``IMAGE_EXTENSIONS`` (any case) and they are
regular files (or links to one); anything else (``.txt``, ``Thumbs.db``, ``.DS_Store``, a FIFO or
a folder named ``x.png``, a broken link, ...) is skipped, and so are hidden files and folders.
Class names are the folder names, sorted. Images are converted to RGB (alpha dropped, palette
transparency too) or to gray luminance when one channel is asked for, and resized to a square of
``img_size`` with PIL's bilinear filter (aspect ratio is not kept). EXIF rotation is applied.

Mean and std are measured on up to ``STATS_SAMPLE`` training images spread evenly over the
training list; with fewer than ``STATS_MIN`` training images the ImageNet values are used.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from vitcompress.data.transforms import center_crop, check_interpolation, scaled_size
from vitcompress.errors import VitcompressError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_SAMPLE = 500
STATS_MIN = 50

Sample = tuple[Path, int]


def _is_regular_file(path: Path) -> bool:
    """A regular file, or a symlink to one: not a FIFO (reading one blocks for ever), socket,
    device, directory or broken link, whatever its name."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; hidden entries, non-images and anything
    that is not a regular file (a FIFO named ``x.png``) skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if not f.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                if _is_regular_file(path):
                    found.append(path)
    return found


def class_folders(root: Path) -> list[Path]:
    """Non-hidden sub-folders of ``root``, sorted by name."""
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _scan_classes(root: Path) -> tuple[list[str], list[list[Path]]]:
    folders = class_folders(root)
    if not folders:
        raise VitcompressError(
            f"no class sub-folders in {root}: expected one folder of images per class, "
            f"e.g. {root / 'airplane' / '001.jpg'}"
        )
    if len(folders) < 2:
        raise VitcompressError(
            f"only one class folder in {root} ({folders[0].name}): need two or more"
        )
    files = []
    for f in folders:
        images = list_images(f)
        if not images:
            raise VitcompressError(
                f"class folder {f} has no images (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files.append(images)
    return [f.name for f in folders], files


def _interleave(per_class: Sequence[Sequence[Path]]) -> list[Sample]:
    """Round-robin over classes, so that the first ``limit`` samples cover every class."""
    out: list[Sample] = []
    for i in range(max((len(c) for c in per_class), default=0)):
        out.extend((c[i], label) for label, c in enumerate(per_class) if i < len(c))
    return out


def stratified_split(
    classes: Sequence[str], per_class: Sequence[Sequence[Path]], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``round(n * val_fraction)`` files per class (at least 1 of a class of 2 or more).

    Each class is shuffled by its own generator seeded from ``seed`` and its name, so a class
    added later does not change the split of the others.
    """
    train, val = [], []
    for name, files in zip(classes, per_class, strict=True):
        order = list(files)
        random.Random(f"{seed}:{name}").shuffle(order)
        n_val = min(max(round(len(order) * val_fraction), 1), len(order) - 1)
        val.append(sorted(order[:n_val]))
        train.append(sorted(order[n_val:]))
    return _interleave(train), _interleave(val)


def split_layout(root: Path) -> tuple[Path, Path | None]:
    """(train folder, held-out folder or None): ``root/train`` + ``root/val|test`` when present."""
    train = root / "train"
    if train.is_dir() and class_folders(train):
        for name in ("val", "test"):
            if (root / name).is_dir():
                return train, root / name
        return train, None
    return root, None


def scan(
    root: Path, val_fraction: float, seed: int, class_order: Sequence[str] | None = None
) -> tuple[list[str], list[Sample], list[Sample]]:
    """(class names, training samples, held-out samples) of an image folder.

    Classes are numbered in sorted folder order, or in ``class_order`` (a model's own label
    order) when that names exactly the same classes.
    """
    if not root.is_dir():
        raise VitcompressError(f"imagefolder data not found: {root}")
    train_dir, val_dir = split_layout(root)
    classes, per_class = _scan_classes(train_dir)
    if class_order is not None and sorted(class_order) == classes and list(class_order) != classes:
        where = {c: i for i, c in enumerate(classes)}
        per_class = [per_class[where[c]] for c in class_order]
        classes = list(class_order)
    if val_dir is None:
        train, val = stratified_split(classes, per_class, val_fraction, seed)
        if not val:
            raise VitcompressError(
                f"too few images in {root} to hold out {val_fraction:.0%} per class"
            )
        return classes, train, val
    index = {c: i for i, c in enumerate(classes)}
    held = [[] for _ in classes]
    for f in class_folders(val_dir):
        if f.name not in index:
            raise VitcompressError(f"{f} is not one of the classes in {train_dir}")
        held[index[f.name]] = list_images(f)
    val = _interleave(held)
    if not val:
        raise VitcompressError(f"no images in {val_dir}")
    return classes, _interleave(per_class), val


RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def load_image(
    path: Path, size: int, mode: str = "RGB", interpolation: str = "bilinear", crop_pct: float = 1.0
) -> Tensor:
    """uint8 (C, size, size) from an image file; C is 3 for mode "RGB", 1 for "L". The image
    is resized to a square of ``floor(size / crop_pct)`` and its centre ``size`` kept."""
    check_interpolation(interpolation)
    outer = scaled_size(size, crop_pct)
    try:
        with Image.open(path) as im:
            im.draft(mode, (outer, outer))  # JPEG: decode at a smaller scale when much larger
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "PA") or (im.mode == "LA" and mode == "RGB"):
                im = im.convert("RGBA")  # palette transparency goes to alpha, dropped next
            im = im.convert(mode)
            if im.size != (outer, outer):
                im = im.resize((outer, outer), RESAMPLING[interpolation])
            arr = np.array(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VitcompressError(f"cannot read image {path}: {e}") from None
    x = torch.from_numpy(arr)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1).contiguous()  # (C, S, S)
    return center_crop(x, size).contiguous() if outer != size else x


def image_stats(
    paths: Sequence[Path], size: int, mode: str = "RGB"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) over all pixels of the given images."""
    c = 1 if mode == "L" else 3
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for p in paths:
        x = load_image(p, size, mode).double().reshape(c, -1) / 255  # (C, S*S)
        s += x.sum(1)
        s2 += (x * x).sum(1)
    n = len(paths) * size * size
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


def dataset_stats(
    train: Sequence[Sample], size: int, mode: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Measured stats of an even sample of the training list, or ImageNet's for a small one."""
    if len(train) < STATS_MIN:
        if mode == "L":
            return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        return IMAGENET_MEAN, IMAGENET_STD
    k = min(STATS_SAMPLE, len(train))
    picks = np.linspace(0, len(train) - 1, k).round().astype(int)
    return image_stats([train[i][0] for i in picks], size, mode)


class ImageFileDataset(Dataset):
    """(transform(image), label) pairs read from files on each access."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        img_size: int,
        mode: str,
        transform: Callable[[Tensor], Tensor],
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.img_size = img_size
        self.mode = mode
        self.transform = transform
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        x = load_image(path, self.img_size, self.mode, self.interpolation, self.crop_pct)
        return self.transform(x), label
