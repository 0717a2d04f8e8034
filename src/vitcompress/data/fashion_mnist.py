"""Fashion-MNIST from its four IDX files (gzip or plain): 60,000 train and 10,000 test, 28x28 gray.

The IDX format: two zero bytes, a type code (0x08 for uint8), the number of dimensions, one
big-endian uint32 size per dimension, then the values. Magic number and length are checked, so
a truncated download fails with the file's name instead of a reshape error.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitcompress.errors import VitcompressError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# per-pixel mean and std of the 60,000 training images, on the 0..1 scale
MEAN = (0.2860,)
STD = (0.3530,)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (OSError, EOFError, zlib.error) as e:  # a truncated gzip stream ends in EOFError
        raise VitcompressError(f"cannot read {path}: {e}") from None


def _parse_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise VitcompressError(
            f"{path} is not an IDX file: magic number {raw[:4].hex() or 'missing'}, "
            "expected 0000 followed by a type code (08 for uint8) and the number of dimensions"
        )
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise VitcompressError(f"{path} is truncated: its IDX header needs {start} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    return np.dtype(_IDX_DTYPES[raw[2]]), shape, start


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """The array an IDX byte string holds (native byte order, a writable copy)."""
    dtype, shape, start = _parse_header(raw, Path(path))
    want = math.prod(shape) * dtype.itemsize
    got = len(raw) - start
    if got != want:
        problem = "is truncated" if got < want else "has trailing bytes"
        raise VitcompressError(
            f"{path} {problem}: its IDX header says shape {tuple(shape)} "
            f"({want} bytes of data), the file holds {got}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))
    )


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (told apart by content, not by name)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), path)


def idx_shape(path: Path | str) -> tuple[int, ...]:
    """The shape in an IDX file's header, reading only the header."""
    path = Path(path)
    try:
        with path.open("rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if compressed else raw
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 else b""
    except (OSError, EOFError, zlib.error) as e:
        raise VitcompressError(f"cannot read {path}: {e}") from None
    return _parse_header(head, path)[1]


def find_file(root: Path, base: str) -> Path:
    """``base.gz`` or ``base`` in root (also the ``t10k-images.idx3-ubyte`` spelling)."""
    dotted = base.replace("-idx", ".idx")
    for name in (base + ".gz", base, dotted + ".gz", dotted):
        if (root / name).is_file():
            return root / name
    raise VitcompressError(
        f"fashion-mnist file not found: {root / (base + '.gz')} (or without .gz)"
    )


def check_root(root: Path) -> Path:
    if not root.is_dir():
        hint = " (give fashion-mnist:DIR with the four IDX files)" if root == DEFAULT_DIR else ""
        raise VitcompressError(f"fashion-mnist data not found: {root}{hint}")
    return root


def load_arrays(root: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((train images uint8 (N, 1, H, W), labels int64 (N,)), (test images, test labels))."""
    check_root(root)
    splits = []
    for split in ("train", "test"):
        ipath = find_file(root, FILES[f"{split}_images"])
        lpath = find_file(root, FILES[f"{split}_labels"])
        images, labels = read_idx(ipath), read_idx(lpath)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise VitcompressError(
                f"{ipath}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
            )
        if labels.shape != (len(images),):
            raise VitcompressError(
                f"{lpath}: {labels.shape} labels for {len(images)} images in {ipath}"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASSES):
            raise VitcompressError(f"{lpath}: labels must be 0..{len(CLASSES) - 1}")
        splits.append(
            (torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)))
        )
    return splits[0], splits[1]


def split_sizes(root: Path) -> tuple[int, int, int]:
    """(train count, test count, image side) from the headers alone."""
    check_root(root)
    train = idx_shape(find_file(root, FILES["train_images"]))
    test = idx_shape(find_file(root, FILES["test_images"]))
    return train[0], test[0], train[-1]
