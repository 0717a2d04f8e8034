"""Data sources: (float32 CHW normalised image, int label) pairs, with class names and stats.

Spec strings:
    fashion-mnist              the IDX files in /usr/share/datasets/fashion-mnist
    fashion-mnist:DIR          the same four files (gzip or plain) in DIR
    imagefolder:PATH           one sub-folder per class (RESISC45 layout), see ``imagefolder``
    cifar10:PATH               the python pickles, PATH is cifar-10-batches-py or its parent

Fashion-MNIST and CIFAR-10 come with their official test split (``seed`` and ``val_fraction``
do not apply); an image folder without ``train/`` and ``val/`` is split per class by ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vitcompress.data import cifar10, fashion_mnist, imagefolder, memory
from vitcompress.data.sampler import EpochShuffleSampler
from vitcompress.data.transforms import ImageTransform, check_interpolation, scaled_size
from vitcompress.errors import VitcompressError

__all__ = ["DataInfo", "load_data", "data_info", "make_loader", "parse_spec", "SPEC_FORMS"]

SPEC_FORMS = "fashion-mnist, fashion-mnist:DIR, imagefolder:PATH or cifar10:PATH"
DEFAULT_SIZE = {"fashion-mnist": 28, "cifar10": 32, "imagefolder": 224}


@dataclass(frozen=True)
class DataInfo:
    """What a model and a report need to know about a data source.

    ``num_train`` and ``num_test`` count the samples as returned, after ``limit``.
    """

    name: str  # "fashion-mnist", "imagefolder", "cifar10"
    spec: str  # the spec string as given
    classes: list[str]
    channels: int  # channels of the images as they come out
    img_size: int  # side of the images as they come out
    mean: tuple[float, ...]  # per output channel, 0..1 pixel scale
    std: tuple[float, ...]
    num_train: int
    num_test: int


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``"kind[:PATH]"`` -> (kind, path or None); the path is split off at the first colon."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DEFAULT_SIZE:
        raise VitcompressError(f"unknown data spec {spec!r}: use {SPEC_FORMS}")
    if not sep or not rest.strip():
        if kind != "fashion-mnist":
            raise VitcompressError(f"data spec {spec!r} needs a path: {kind}:PATH")
        return kind, None
    return kind, Path(rest.strip()).expanduser()


def _check(
    img_size: int | None, val_fraction: float, limit: int | None, channels: int | None
) -> None:
    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise VitcompressError(f"img_size must be a positive integer, got {img_size!r}")
    if not 0 < val_fraction < 1:
        raise VitcompressError(
            f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}"
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise VitcompressError(f"limit must be a positive integer or None, got {limit!r}")
    if channels not in (None, 1, 3):
        raise VitcompressError(f"channels must be 1 or 3, got {channels!r}")


AUGMENT_MODES = ("crop+flip", "flip", "crop", "none")


@dataclass(frozen=True)
class Prep:
    """A model's own preprocessing: normalisation (None: the data's), resize, centre crop."""

    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    interpolation: str = "bilinear"
    crop_pct: float = 1.0


def augment_mode(augment: bool | str) -> tuple[bool, bool]:
    """``(crop, flip)`` of an augmentation setting: True / False or one of AUGMENT_MODES."""
    if augment is True:
        augment = "crop+flip"
    elif augment is False:
        augment = "none"
    if augment not in AUGMENT_MODES:
        raise VitcompressError(
            f"augment must be true, false or one of {', '.join(AUGMENT_MODES)}, got {augment!r}"
        )
    return "crop" in augment, "flip" in augment


def load_data(
    spec: str,
    img_size: int | None = None,
    *,
    seed: int = 0,
    augment: bool | str = True,
    val_fraction: float = 0.2,
    limit: int | None = None,
    channels: int | None = None,
    flip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    class_order: Sequence[str] | None = None,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Training set (augmented when ``augment``), test/val set (never augmented), and info.

    Args:
        spec: where the data is, see the module docstring.
        img_size: side of the square images that come out; None keeps the source's own
            (28 fashion-mnist, 32 cifar10, 224 imagefolder).
        seed: the per-class split of an image folder without ``train/``/``val/`` folders.
        augment: random crop (padding ``img_size // 8``) and horizontal flip on training samples
            (True), none (False), or one of them: ``"crop"``, ``"flip"``.
        val_fraction: share of each class held out when an image folder is split here.
        limit: keep only the first ``limit`` samples of each split (smoke runs, tests).
        channels: 1 or 3 to convert (gray repeated to RGB, RGB to luminance); None keeps the
            source's (1 for fashion-mnist, 3 otherwise).
        flip: allow the horizontal flip when augmenting.
        mean, std: a model's own normalisation (per output channel, 0..1 scale) instead of the
            data's statistics: an imported model sees its inputs as it was trained on them.
        interpolation, crop_pct: the resize (``bilinear``, ``bicubic``, ``nearest``) and the
            centre crop (resize to ``floor(img_size / crop_pct)``, keep the centre) of a model's
            own preprocessing; every split, training too, is prepared the same way.
        class_order: a model's class names in label order: an image folder with exactly these
            classes numbers them so (else in sorted folder order).
    """
    _check(img_size, val_fraction, limit, channels)
    check_interpolation(interpolation)
    scaled_size(1, crop_pct)
    fixed = mean is not None or std is not None
    if fixed and (mean is None or std is None or len(mean) != len(std)):
        raise VitcompressError(f"give mean and std together, one value per channel: {mean}, {std}")
    if fixed and channels is not None and len(mean) != channels:
        raise VitcompressError(f"mean {list(mean)} has {len(mean)} values for {channels} channels")
    crop, flip_ok = augment_mode(augment)
    augment, flip = crop or (flip and flip_ok), flip and flip_ok
    pad = None if crop else 0
    kind, path = parse_spec(spec)
    size = img_size or DEFAULT_SIZE[kind]
    if kind == "imagefolder":
        assert path is not None
        prep = Prep(mean, std, interpolation, crop_pct)
        return _load_imagefolder(
            spec, path, size, seed, augment, val_fraction, limit, channels, flip, pad, prep,
            class_order,
        )  # fmt: skip
    if kind == "fashion-mnist":
        train, test = fashion_mnist.load_arrays(path or fashion_mnist.DEFAULT_DIR)
        classes = fashion_mnist.CLASSES
        data_mean, data_std = fashion_mnist.MEAN, fashion_mnist.STD
    else:
        assert path is not None
        train, test, classes = cifar10.load_arrays(path)
        data_mean, data_std = cifar10.MEAN, cifar10.STD
    out_channels = channels or (len(mean) if fixed else train[0].shape[1])
    own_mean, own_std = (mean, std) if fixed else (data_mean, data_std)
    tr, te, mean, std = memory.build(
        train, test, classes, own_mean, own_std,
        img_size=size, channels=out_channels, augment=augment, flip=flip, limit=limit, pad=pad,
        interpolation=interpolation, crop_pct=crop_pct, fixed_stats=fixed,
    )  # fmt: skip
    info = DataInfo(kind, spec, list(classes), out_channels, size, mean, std, len(tr), len(te))
    return tr, te, info


def _load_imagefolder(
    spec: str,
    path: Path,
    size: int,
    seed: int,
    augment: bool,
    val_fraction: float,
    limit: int | None,
    channels: int | None,
    flip: bool,
    pad: int | None,
    prep: Prep,
    class_order: Sequence[str] | None,
) -> tuple[Dataset, Dataset, DataInfo]:
    classes, train, val = imagefolder.scan(path, val_fraction, seed, class_order)
    out_channels = channels or (len(prep.mean) if prep.mean is not None else 3)
    mode = "L" if out_channels == 1 else "RGB"
    if prep.mean is not None:
        mean, std = tuple(prep.mean), tuple(prep.std)
    else:  # measured on the training split
        mean, std = imagefolder.dataset_stats(train, size, mode)
    if limit is not None:
        train, val = train[:limit], val[:limit]
    datasets = [
        imagefolder.ImageFileDataset(
            samples,
            classes,
            size,
            mode,
            ImageTransform(mean, std, augment=aug, flip=flip, pad=pad),
            prep.interpolation,
            prep.crop_pct,
        )  # fmt: skip
        for samples, aug in ((train, augment), (val, False))
    ]
    info = DataInfo(
        "imagefolder", spec, classes, out_channels, size, mean, std, len(train), len(val)
    )
    return datasets[0], datasets[1], info


def data_info(
    spec: str,
    img_size: int | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    limit: int | None = None,
    channels: int | None = None,
) -> DataInfo:
    """The ``DataInfo`` that ``load_data`` would give; reads only the headers for fashion-mnist.

    An image folder still measures its mean and std (up to 500 images are read).
    """
    _check(img_size, val_fraction, limit, channels)
    kind, path = parse_spec(spec)
    if kind != "fashion-mnist":
        return load_data(
            spec, img_size, seed=seed, augment=False, val_fraction=val_fraction,
            limit=limit, channels=channels,
        )[2]  # fmt: skip
    n_train, n_test, _ = fashion_mnist.split_sizes(path or fashion_mnist.DEFAULT_DIR)
    c = channels or 1
    if limit is not None:
        n_train, n_test = min(n_train, limit), min(n_test, limit)
    return DataInfo(
        kind, spec, list(fashion_mnist.CLASSES), c, img_size or DEFAULT_SIZE[kind],
        fashion_mnist.MEAN * c, fashion_mnist.STD * c, n_train, n_test,
    )  # fmt: skip


def make_loader(
    ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A ``DataLoader`` whose shuffle order (and workers' augmentation seeds) follow ``seed``.

    Epoch k is shuffled by (seed, k) (the training loop calls ``sampler.set_epoch``), so epochs
    differ from each other, repeat run to run, and a resumed run sees the same order.
    With ``num_workers == 0`` augmentation draws from torch's global generator, so seed that too
    (``torch.manual_seed``) for a repeatable run.
    """
    if batch_size < 1:
        raise VitcompressError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise VitcompressError(f"num_workers must be 0 or more, got {num_workers}")
    g = torch.Generator()
    g.manual_seed(seed)
    # the order of epoch k depends on (seed, k) alone, so --resume repeats it exactly
    sampler = EpochShuffleSampler(len(ds), seed) if shuffle else None
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        generator=g,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
