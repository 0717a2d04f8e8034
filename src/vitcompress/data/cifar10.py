"""CIFAR-10 from its python pickles: data_batch_1..5 (50,000 train), test_batch, batches.meta.

Each batch is a dict with ``b"data"`` (uint8 N x 3072: 1024 red, 1024 green, 1024 blue values,
rows of 32) and ``b"labels"``; ``batches.meta`` holds ``b"label_names"``. Pickle can run any
code it names, so the files are read with an unpickler that builds only numpy arrays, dtypes and
plain containers, and no more of them than a real batch needs: anything else is refused before it
is called or built (:mod:`vitcompress.data.safe_pickle`).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitcompress.data.safe_pickle import PickleRefused, restricted_loads
from vitcompress.errors import VitcompressError

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
# per-channel mean and std over all pixels of the 50,000 training images, on the 0..1 scale
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# A batch file is 31 MB (10000 x 3072 bytes and the labels); one 8x larger is not a batch.
MAX_FILE_BYTES = 256 << 20
BUILD_RATIO = 2  # what unpickling may build: bytes per byte of file, beyond BUILD_SLACK
BUILD_SLACK = 16 << 20


def safe_load(path: Path) -> Any:
    """Unpickle ``path`` with the restricted unpickler (bytes keys, as the files were written):
    numpy arrays and plain containers only, and no more of them than :data:`BUILD_RATIO` times
    the file's size plus :data:`BUILD_SLACK` (a real batch builds about its own size)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read for ever
            raise VitcompressError(f"cannot read {path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise VitcompressError(
                f"cannot read {path}: {st.st_size:,} bytes, more than a CIFAR-10 batch "
                f"({MAX_FILE_BYTES >> 20} MiB at most)"
            )
        raw = path.read_bytes()
        budget = BUILD_RATIO * len(raw) + BUILD_SLACK
        return restricted_loads(raw, str(path), "a CIFAR-10 batch", budget)
    except PickleRefused as e:
        msg = str(e) if str(path) in str(e) else f"{e} (in {path})"
        raise VitcompressError(_one_line(msg)) from None
    except VitcompressError:
        raise
    except Exception as e:  # any failure to unpickle means the same thing: not a CIFAR batch
        detail = _one_line(f"{type(e).__name__}: {e}")
        raise VitcompressError(
            f"cannot read {path}: not a CIFAR-10 python pickle ({detail})"
        ) from None


def _one_line(msg: str, limit: int = 300) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def resolve_dir(root: Path) -> Path:
    """The folder with the batch files: ``root`` itself or ``root/cifar-10-batches-py``."""
    if not root.exists():
        raise VitcompressError(f"cifar10 data not found: {root}")
    if not (root / META_FILE).exists() and (root / BATCH_DIR).is_dir():
        return root / BATCH_DIR
    return root


def _field(d: Any, key: str, path: Path) -> Any:
    if isinstance(d, dict):
        for k in (key.encode(), key):  # bytes keys from Python 2, str keys if re-pickled
            if k in d:
                return d[k]
    raise VitcompressError(f"{path}: not a CIFAR-10 batch (no {key!r} entry)")


def _need(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise VitcompressError(
            f"cifar10 file missing: {path} (expected {', '.join(TRAIN_FILES)}, {TEST_FILE} and "
            f"{META_FILE} in {folder})"
        )
    return path


def read_batch(path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    d = safe_load(path)
    data, labels = _field(d, "data", path), _field(d, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise VitcompressError(f"{path}: 'data' must be a uint8 array N x 3072")
    if data.shape[1] != 3 * 32 * 32:
        raise VitcompressError(f"{path}: 'data' rows hold {data.shape[1]} values, expected 3072")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise VitcompressError(f"{path}: 'labels' must be a list of integers") from None
    if y.shape != (len(data),):
        raise VitcompressError(f"{path}: {y.shape} labels for {len(data)} images")
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise VitcompressError(f"{path}: labels must be 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def read_classes(folder: Path) -> list[str]:
    path = _need(folder, META_FILE)
    names = _field(safe_load(path), "label_names", path)
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError):
        raise VitcompressError(f"{path}: 'label_names' must be a list of names") from None


def load_arrays(
    root: Path,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    """((train images, labels), (test images, labels), class names) from a CIFAR-10 folder."""
    folder = resolve_dir(root)
    paths = [_need(folder, n) for n in (*TRAIN_FILES, TEST_FILE)]  # all missing-file errors first
    classes = read_classes(folder)
    batches = [read_batch(p, len(classes)) for p in paths]
    train_x = torch.cat([b[0] for b in batches[:-1]])
    train_y = torch.cat([b[1] for b in batches[:-1]])
    return (train_x, train_y), batches[-1], classes
