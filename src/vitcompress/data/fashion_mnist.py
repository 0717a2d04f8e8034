"""Fashion-MNIST from its four IDX files (gzip or plain): 60,000 train and 10,000 test, 28x28 gray.

The IDX format: two zero bytes, a type code (0x08 for uint8), the number of dimensions, one
big-endian uint32 size per dimension, then the values. Magic number and length are checked, so
a truncated download fails with the file's name instead of a reshape error.
"""

from __future__ import annotations

import gzip
import math
import stat
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
# The values an IDX file may hold: Fashion-MNIST's largest is 47 MB (60000 x 28 x 28), so 4 GiB
# is generous and still refuses a header that claims 10^12 values before anything is allocated
# (or decompressed: a gzip stream is inflated only as far as its header promises).
MAX_IDX_BYTES = 4 << 30
_READ_CHUNK = 16 << 20  # bytes inflated per step: memory grows with what the stream really holds


class _Gunzip:
    """Bounded reads from a gzip stream (one or more members, as ``gzip.decompress`` reads)."""

    def __init__(self, raw: bytes) -> None:
        self.d = zlib.decompressobj(wbits=31)
        self.rest = raw

    def read(self, n: int) -> bytearray:
        """Up to ``n`` decompressed bytes; fewer only at the end of the stream."""
        out = bytearray()
        while len(out) < n:
            if self.d.eof:
                tail = self.d.unused_data
                if not tail.strip(b"\0"):  # the end (zero padding is allowed, as gzip does)
                    break
                if tail[:2] != _GZIP_MAGIC:
                    raise zlib.error("trailing bytes after the gzip stream")
                self.d, self.rest = zlib.decompressobj(wbits=31), tail
            before = len(self.rest)
            chunk = self.d.decompress(self.rest, min(n - len(out), _READ_CHUNK))
            self.rest = self.d.unconsumed_tail
            if not chunk and not self.d.eof and len(self.rest) == before:
                raise EOFError("compressed file ended before the end-of-stream marker")
            out += chunk
        return out


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
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if math.prod(shape) * dtype.itemsize > MAX_IDX_BYTES:
        raise VitcompressError(
            f"{path}: its IDX header claims shape {shape} of {dtype.name}, more than "
            f"{MAX_IDX_BYTES >> 30} GiB (a corrupt header?)"
        )
    return dtype, shape, start


def _from_header(
    dtype: np.dtype,
    shape: tuple[int, ...],
    data: bytes | bytearray | memoryview,
    holds: str,
    path: Path,
) -> np.ndarray:
    """The array from its header and data; ``holds``: the data bytes the file has, when they
    are not exactly the header's (else empty)."""
    want = math.prod(shape) * dtype.itemsize
    if holds:
        problem = "is truncated" if len(data) < want else "has trailing bytes"
        raise VitcompressError(
            f"{path} {problem}: its IDX header says shape {tuple(shape)} "
            f"({want} bytes of data), the file holds {holds}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """The array an IDX byte string holds (native byte order, a writable copy).

    A gzip-compressed string (told apart by content) is inflated only as far as its header
    promises, so a stream that inflates to more is refused without being inflated.
    """
    path = Path(path)
    if raw[:2] != _GZIP_MAGIC:
        dtype, shape, start = _parse_header(raw, path)
        want = math.prod(shape) * dtype.itemsize
        got = len(raw) - start
        return _from_header(
            dtype, shape, memoryview(raw)[start:], "" if got == want else str(got), path
        )
    try:
        stream = _Gunzip(raw)
        head = stream.read(4)
        head += stream.read(4 * head[3]) if len(head) == 4 else b""
        dtype, shape, _ = _parse_header(head, path)
        want = math.prod(shape) * dtype.itemsize
        data = stream.read(want)
        more = len(data) == want and stream.read(1)
    except (EOFError, zlib.error) as e:  # a truncated gzip stream ends in EOFError
        raise VitcompressError(f"cannot read {path}: {e}") from None
    holds = str(len(data)) if len(data) < want else f"more than {want}" if more else ""
    return _from_header(dtype, shape, data, holds, path)


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (told apart by content, not by name)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read for ever
            raise VitcompressError(f"cannot read {path}: not a regular file")
        if st.st_size > MAX_IDX_BYTES + 4 + 4 * 255:
            raise VitcompressError(f"{path}: larger than {MAX_IDX_BYTES >> 30} GiB of IDX data")
        raw = path.read_bytes()
    except OSError as e:
        raise VitcompressError(f"cannot read {path}: {e}") from None
    return parse_idx(raw, path)


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
