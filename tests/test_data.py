"""Data sources: real Fashion-MNIST, and image folders, IDX files and CIFAR pickles built here."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitcompress.data import DataInfo, cifar10, data_info, load_data, make_loader
from vitcompress.data import fashion_mnist as fm
from vitcompress.data.cifar10 import read_batch
from vitcompress.data.imagefolder import image_stats, list_images
from vitcompress.data.transforms import ImageTransform, crop_shift, normalize, to_channels
from vitcompress.errors import VitcompressError

FMNIST = fm.DEFAULT_DIR
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {FMNIST}",
)


# ---------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
    return load_data("fashion-mnist")


@needs_fmnist
def test_fashion_mnist_sizes_shapes_labels(fmnist):
    train, test, info = fmnist
    assert (len(train), len(test)) == (60000, 10000)
    assert info == DataInfo(
        "fashion-mnist", "fashion-mnist", fm.CLASSES, 1, 28, (0.286,), (0.353,), 60000, 10000
    )
    assert info.classes[0] == "T-shirt/top" and info.classes[9] == "Ankle boot"
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    for ds in (train, test):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert torch.bincount(ds.labels).tolist() == [len(ds) // 10] * 10  # balanced classes
    assert data_info("fashion-mnist") == info  # header-only path agrees with the full load


@needs_fmnist
def test_fashion_mnist_test_set_is_normalised(fmnist):
    _, test, _ = fmnist
    x = torch.stack([test[i][0] for i in range(len(test))])  # (10000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.02
    assert abs(x.std().item() - 1) < 0.02


@needs_fmnist
def test_fashion_mnist_augmentation_and_determinism(fmnist):
    train, test, _ = fmnist
    torch.manual_seed(0)
    a = torch.stack([train[i][0] for i in range(64)])  # (64, 1, 28, 28)
    torch.manual_seed(0)
    b = torch.stack([train[i][0] for i in range(64)])
    assert torch.equal(a, b)  # same seed, same augmentation
    moves = set()  # each sample is the original, maybe flipped, cropped within 3 px of padding
    norm = ImageTransform((0.286,), (0.353,))
    for i in range(64):
        img = train.images[i]
        found = [
            (f, dy, dx)
            for f in (0, 1)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if torch.allclose(a[i], norm(crop_shift(img.flip(-1) if f else img, dy, dx)), atol=1e-5)
        ]
        assert found, i
        moves.add(found[0])
    assert len(moves) > 20  # and the moves vary (98 equally likely)

    order = [torch.cat([y for _, y in make_loader(test, 500, True, seed=s)]) for s in (1, 1, 2)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert torch.equal(order[0].sort().values, test.labels.sort().values)  # a permutation


@needs_fmnist
@pytest.mark.parametrize("mode", ["flip", "crop", "none"])
def test_augment_modes_do_only_what_they_say(mode):
    train, _, _ = load_data("fashion-mnist", limit=64, augment=mode)
    norm = ImageTransform((0.286,), (0.353,))
    torch.manual_seed(0)
    kinds = set()
    for i in range(64):
        x, img = train[i][0], train.images[i]
        flipped = torch.allclose(x, norm(img.flip(-1)), atol=1e-5)
        same = torch.allclose(x, norm(img), atol=1e-5)
        kinds.add("same" if same else "flip" if flipped else "moved")
    if mode == "crop":  # an unmoved crop (1 in 49) may or may not come up
        assert "moved" in kinds and "flip" not in kinds
    else:
        assert kinds == {"flip": {"same", "flip"}, "none": {"same"}}[mode]
    with pytest.raises(VitcompressError, match="augment must be"):
        load_data("fashion-mnist", limit=8, augment="rotate")


@needs_fmnist
def test_fashion_mnist_resize_and_three_channels():
    train, test, info = load_data("fashion-mnist", 32, channels=3, limit=50, augment=False)
    assert (len(train), len(test), info.num_train, info.num_test) == (50, 50, 50, 50)
    assert info.channels == 3 and info.img_size == 32 and info.mean == (0.286,) * 3
    x, _ = test[0]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # gray repeated
    assert data_info("fashion-mnist", 32, channels=3, limit=50) == info


# ---------------------------------------------------------------- transforms


def test_crop_shift_matches_pad_and_crop():
    x = torch.arange(2 * 6 * 5, dtype=torch.float32).view(2, 6, 5)
    p = 3
    padded = F.pad(x, (p, p, p, p))
    for dy in range(-p, p + 1):
        for dx in range(-p, p + 1):
            ref = padded[:, p + dy : p + dy + 6, p + dx : p + dx + 5]
            assert torch.equal(crop_shift(x, dy, dx), ref), (dy, dx)


def test_normalise_and_channel_conversion():
    x = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = (x.double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    got = ImageTransform(mean, std)(x)
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize(x, mean, std), ref.float(), rtol=0, atol=1e-5)
    gray = to_channels(x, 1)
    pil = np.array(Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L"))
    assert (gray[0].int() - torch.from_numpy(pil).int()).abs().max() <= 1  # PIL's luminance


# ---------------------------------------------------------------- IDX files


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_fmnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = _idx_bytes(arr)
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)


def test_idx_reader_roundtrip_gzip_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(arr))
    (tmp_path / "b.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    for name in ("a.idx", "b.gz"):
        got = fm.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, arr)
        assert fm.idx_shape(tmp_path / name) == (2, 3, 4)


def test_idx_reader_rejects_corrupt_files(tmp_path):
    good = _idx_bytes(np.zeros((4, 28, 28), np.uint8))
    cases = {
        "short.idx": good[:-10],  # truncated data
        "long.idx": good + b"xx",
        "magic.idx": b"\x1f\x00" + good[2:],
        "header.idx": good[:9],
        "cut.gz": gzip.compress(good)[:-30],  # truncated gzip stream
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VitcompressError, match=name) as e:
            fm.read_idx(tmp_path / name)
        assert "\n" not in str(e.value)


def test_fashion_mnist_from_user_dir(tmp_path):
    _write_fmnist(tmp_path / "gz")
    _write_fmnist(tmp_path / "plain", gz=False)
    a = load_data(f"fashion-mnist:{tmp_path / 'gz'}", augment=False)
    b = load_data(f"fashion-mnist:{tmp_path / 'plain'}", augment=False)
    assert a[2].num_train == 12 and a[2].num_test == 5 and a[2].classes == fm.CLASSES
    assert torch.equal(a[0].images, b[0].images) and a[1].labels.tolist() == [0, 1, 2, 3, 4]

    labels = tmp_path / "gz" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx_bytes(np.zeros(11, np.uint8))))  # one label short
    with pytest.raises(VitcompressError, match="11,.*12 images"):
        load_data(f"fashion-mnist:{tmp_path / 'gz'}")
    labels.unlink()
    with pytest.raises(VitcompressError, match="train-labels-idx1-ubyte"):
        load_data(f"fashion-mnist:{tmp_path / 'gz'}")


def test_bad_specs(tmp_path):
    with pytest.raises(VitcompressError, match="fashion-mnist, fashion-mnist:DIR, imagefolder"):
        load_data("mnist")
    with pytest.raises(VitcompressError, match="needs a path"):
        load_data("cifar10")
    for kind in ("fashion-mnist", "imagefolder", "cifar10"):
        with pytest.raises(VitcompressError, match=f"not found: {tmp_path / 'nope'}"):
            load_data(f"{kind}:{tmp_path / 'nope'}")
    with pytest.raises(VitcompressError, match="val_fraction"):
        load_data(f"imagefolder:{tmp_path}", val_fraction=1.5)


# ---------------------------------------------------------------- image folders


def _image(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(16)
    return rgba.convert(mode)


def _write_folder(root: Path, classes=("beach", "forest", "harbor"), n: int = 5) -> None:
    kinds = [("RGB", "png"), ("RGBA", "png"), ("L", "jpg"), ("P", "png"), ("RGB", "JPEG")]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            mode, ext = kinds[(i + c) % len(kinds)]
            img = _image((20 + 3 * i, 15 + 5 * c), mode, seed=10 * c + i)
            img.save(root / name / f"{i:03d}.{ext}")


def test_imagefolder_modes_sizes_and_strays(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "beach" / "notes.txt").write_text("not an image")
    (tmp_path / "beach" / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / "beach" / ".DS_Store").write_bytes(b"\0" * 10)
    (tmp_path / ".cache").mkdir()  # hidden folder: not a class
    (tmp_path / "README.md").write_text("top-level file: ignored")
    train, val, info = load_data(f"imagefolder:{tmp_path}", 16, augment=True)
    assert info.classes == ["beach", "forest", "harbor"] and info.channels == 3
    assert (len(train), len(val)) == (12, 3)  # 1 of 5 per class held out
    assert info.mean == (0.485, 0.456, 0.406)  # too few images to measure: ImageNet's
    for ds in (train, val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 3
    assert sorted(val.labels.tolist()) == [0, 1, 2]
    gray_train, _, gray = load_data(f"imagefolder:{tmp_path}", 8, channels=1)
    assert gray_train[0][0].shape == (1, 8, 8) and gray.channels == 1 and len(gray.mean) == 1


def test_imagefolder_stratified_split_is_deterministic_and_disjoint(tmp_path):
    _write_folder(tmp_path, n=6)
    splits = {}
    for seed in (0, 0, 1, 2, 3):
        train, val, _ = load_data(f"imagefolder:{tmp_path}", 8, seed=seed, val_fraction=0.34)
        tr, va = [s[0] for s in train.samples], [s[0] for s in val.samples]
        assert not set(tr) & set(va) and len(set(tr) | set(va)) == 18
        assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # 2 of 6 per class
        if seed in splits:
            assert splits[seed] == (tr, va)
        splits[seed] = (tr, va)
    assert len({tuple(v) for _, v in splits.values()}) > 1  # the seed matters
    first = load_data(f"imagefolder:{tmp_path}", 8, limit=4)[0]
    assert first.labels.tolist() == [0, 1, 2, 0]  # limit keeps every class


def test_imagefolder_train_val_folders(tmp_path):
    _write_folder(tmp_path / "train", n=3)
    _write_folder(tmp_path / "val", classes=("beach", "harbor"), n=2)
    train, val, info = load_data(f"imagefolder:{tmp_path}", 8)
    assert info.classes == ["beach", "forest", "harbor"]
    assert (len(train), len(val)) == (9, 4)
    assert all(p.parent.parent.name == "val" for p, _ in val.samples)
    assert sorted(val.labels.tolist()) == [0, 0, 2, 2]
    (tmp_path / "val" / "castle").mkdir()
    with pytest.raises(VitcompressError, match="castle is not one of the classes"):
        load_data(f"imagefolder:{tmp_path}", 8)


def test_imagefolder_errors(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "desert").mkdir()
    (tmp_path / "desert" / "readme.txt").write_text("no images here")
    with pytest.raises(VitcompressError, match=f"class folder {tmp_path / 'desert'} has no images"):
        load_data(f"imagefolder:{tmp_path}", 8)
    (tmp_path / "desert" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    train, val, _ = load_data(f"imagefolder:{tmp_path}", 8)
    bad = [i for i, (p, _) in enumerate(train.samples + val.samples) if p.name == "bad.png"]
    ds, i = (train, bad[0]) if bad[0] < len(train) else (val, bad[0] - len(train))
    with pytest.raises(VitcompressError, match="bad.png"):
        ds[i]
    flat = tmp_path / "flat"
    flat.mkdir()
    _image((8, 8), "RGB", 0).save(flat / "a.png")
    with pytest.raises(VitcompressError, match="no class sub-folders"):
        load_data(f"imagefolder:{flat}")


def test_image_stats_are_exact_on_solid_colours(tmp_path):
    Image.new("RGB", (5, 7), (255, 0, 51)).save(tmp_path / "a.png")
    Image.new("RGB", (9, 4), (0, 0, 51)).save(tmp_path / "b.png")
    mean, std = image_stats([tmp_path / "a.png", tmp_path / "b.png"], 6)
    assert mean == pytest.approx((0.5, 0.0, 0.2), abs=1e-9)
    assert std == pytest.approx((0.5, 1 / 255, 1 / 255), abs=1e-9)  # floored, not zero


# ---------------------------------------------------------------- CIFAR-10 pickles


def _write_cifar(root: Path, n: int = 4, protocol: int = 2, old_numpy: bool = False) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        first = data if first is None else first
        batch = {b"batch_label": b"x", b"data": data, b"labels": list(range(n))}
        raw = pickle.dumps(batch, protocol=protocol)
        if old_numpy:  # the real files name numpy.core, numpy 2 writes numpy._core
            raw = raw.replace(b"numpy._core.", b"numpy.core.")
        (folder / name).write_bytes(raw)
    meta = {b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return first


@pytest.mark.parametrize("protocol, old_numpy", [(2, True), (2, False), (5, False)])
def test_cifar10_loads_tiny_pickles(tmp_path, protocol, old_numpy):
    first = _write_cifar(tmp_path, protocol=protocol, old_numpy=old_numpy)
    train, test, info = load_data(f"cifar10:{tmp_path}", augment=False)
    assert (info.num_train, info.num_test, info.img_size, info.channels) == (20, 4, 32, 3)
    assert info.classes[0] == "airplane" and info.classes[9] == "truck"
    assert torch.equal(train.images[0, 0].flatten(), torch.from_numpy(first[0, :1024]))  # red
    assert torch.equal(train.images[0, 2].flatten(), torch.from_numpy(first[0, 2048:]))  # blue
    assert train.labels.tolist()[:5] == [0, 1, 2, 3, 0]
    x, _ = test[0]
    assert x.shape == (3, 32, 32)
    same_dir = load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", augment=False)
    assert torch.equal(same_dir[0].images, train.images)
    _, gray_test, gray = load_data(f"cifar10:{tmp_path}", 16, channels=1)
    assert gray_test[0][0].shape == (1, 16, 16) and len(gray.mean) == 1
    assert gray.mean[0] == pytest.approx(0.5, abs=0.02)  # measured on uniform noise


def test_cifar10_missing_batch(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(VitcompressError, match="data_batch_3"):
        load_data(f"cifar10:{tmp_path}")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_malicious_pickle(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil(marker)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(VitcompressError, match=r"refusing to unpickle .*system.*data_batch_2"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


# ---------------------------------------------------------------- bounded inputs


def _peak_bytes(fn, *args) -> tuple[object, int]:
    """(fn's result or the VitcompressError it raised, the peak bytes traced meanwhile)."""
    tracemalloc.start()
    try:
        out = fn(*args)
    except VitcompressError as e:
        out = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak


def test_idx_header_is_bounded_before_anything_is_inflated(tmp_path):
    huge = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 100_000, 100_000, 100_000)  # 10^15
    bomb = gzip.compress(_idx_bytes(np.zeros(1000, np.uint8))[:8] + b"\0" * 50_000_000)
    cases = {
        "huge.idx": huge,  # a header claiming 10^15 values, refused before reading on
        "huge.gz": gzip.compress(huge),
        "bomb.gz": bomb,  # 1000 values promised, 50 MB inflated: stopped after 1001
        "junk.gz": gzip.compress(_idx_bytes(np.zeros(4, np.uint8))) + b"junk",
        "wide.idx": bytes([0, 0, 0x0E, 2]) + struct.pack(">2I", 2**32 - 1, 2**32 - 1),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        err, peak = _peak_bytes(fm.read_idx, tmp_path / name)
        assert isinstance(err, VitcompressError) and name in str(err), (name, err)
        assert "\n" not in str(err)
        assert peak < 2 * len(data) + (1 << 20), (name, peak)  # nothing expanded
    with pytest.raises(VitcompressError, match="claims shape"):
        fm.idx_shape(tmp_path / "huge.gz")
    assert "has trailing bytes" in str(_peak_bytes(fm.read_idx, tmp_path / "bomb.gz")[0])


def test_idx_gzip_members_and_padding_read_as_gzip_does(tmp_path):
    arr = np.arange(3 * 5, dtype=np.uint8).reshape(3, 5)
    raw = _idx_bytes(arr)
    two = gzip.compress(raw[:7]) + gzip.compress(raw[7:])  # two members: one stream
    for data in (two, gzip.compress(raw) + b"\0" * 9):
        assert np.array_equal(fm.parse_idx(data), arr)
        assert np.array_equal(fm.parse_idx(data), fm.parse_idx(gzip.decompress(data)))


def test_idx_reader_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(VitcompressError, match="not a regular file"):
        fm.read_idx(tmp_path / "train-images-idx3-ubyte")  # instead of blocking for ever


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as CIFAR-10's own files hold it: cPickle protocol 2 from Python 2, numpy.core."""
    g = lambda module, name: b"c" + module + b"\n" + name + b"\n"  # noqa: E731
    dtype = g(b"numpy", b"dtype") + b"U\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xff"
    dtype += b"J\xff\xff\xff\xffK\x00tb"
    array = g(b"numpy.core.multiarray", b"_reconstruct") + g(b"numpy", b"ndarray")
    array += b"K\x00\x85U\x01b\x87R(K\x01" + b"J" + struct.pack("<i", data.shape[0])
    array += b"J" + struct.pack("<i", data.shape[1]) + b"\x86" + dtype + b"\x89T"
    array += struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"
    items = b"".join(b"J" + struct.pack("<i", y) for y in labels)
    return b"\x80\x02}(U\x04data" + array + b"U\x06labels](" + items + b"eu."


def test_cifar10_reads_the_python2_format_of_the_real_files(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    (tmp_path / "data_batch_1").write_bytes(_py2_batch(data, [0, 9, 4]))
    x, y = read_batch(tmp_path / "data_batch_1", 10)
    assert torch.equal(x.reshape(3, -1), torch.from_numpy(data)) and y.tolist() == [0, 9, 4]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


class _Reduce:
    """Pickles as ``func(*args)`` followed by ``BUILD state`` (when given)."""

    def __init__(self, func, args, state=None) -> None:
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own pickling functions
_SCALAR = np.float64(0).__reduce__()[0]

PICKLE_BOMBS = {
    # bytes(2_000_000_000): a few bytes of pickle, 2 GB once called
    "bytes": b"\x80\x02" + _global("__builtin__", "bytes") + b"J\x00\x94\x35\x77\x85R.",
    # an empty array of 10^8 elements
    "reconstruct": pickle.dumps(_Reduce(_RECONSTRUCT, (np.ndarray, (10**8,), b"b"))),
    # one scalar of a dtype whose items are 2 GB
    "dtype": pickle.dumps(_Reduce(_SCALAR, (np.dtype("V2000000000"),))),
    # an object array's state allocates its shape (800 MB) before reading its (empty) list
    "objects": pickle.dumps(
        _Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (10**8,), np.dtype(object), False, []))
    ),
    # a thousand lists of the same megabyte: 3 pickle bytes each, 8 MB each once built
    "copies": b"\x80\x04B\x00\x00\x10\x00" + b"\0" * (1 << 20) + b"\x94("
    + (_global("builtins", "list") + b"h\x00\x85R") * 1000 + b"t.",
    # hex of hex of hex ...: each call doubles
    "codec": b"\x80\x02" + _global("_codecs", "encode") + b"X\x01\x00\x00\x00aX\x03\x00\x00\x00hex"
    + b"\x86R.",
    # a tuple nested deep put in a set: hashing it recurses in C without a limit (a crash at
    # depth 10^6, 1 MB of pickle)
    "nested": b"\x80\x04\x8f(" + b")" + b"\x85" * 60_000 + b"\x90.",
    "nested-deeper": b"\x80\x04\x8f(" + b")" + b"\x85" * 1_000_000 + b"\x90.",
    # NEWOBJ calls cls.__new__ directly, past any check on calls
    "newobj": b"\x80\x02" + _global("__builtin__", "bytes") + b"J\x00\x94\x35\x77\x85\x81.",
}  # fmt: skip


@pytest.mark.parametrize("kind", list(PICKLE_BOMBS))
def test_cifar10_pickle_bombs_are_refused_before_they_go_off(tmp_path, kind):
    path = tmp_path / "data_batch_1"
    path.write_bytes(PICKLE_BOMBS[kind])
    err, peak = _peak_bytes(read_batch, path, 10)
    assert isinstance(err, VitcompressError), err
    assert str(path) in str(err) and "\n" not in str(err)
    assert peak < 32 << 20  # the budget: 16 MiB plus twice the file


def test_cifar10_refuses_a_file_larger_than_a_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(VitcompressError, match="more than a CIFAR-10 batch"):
        read_batch(path, 10)


def test_imagefolder_skips_special_files_and_folders_named_like_images(tmp_path):
    _write_folder(tmp_path, n=2)
    beach = tmp_path / "beach"
    os.mkfifo(beach / "fifo.png")  # reading it would block training for ever
    (beach / "folder.png").mkdir()
    (beach / "broken.png").symlink_to(tmp_path / "missing.png")
    (beach / "to-fifo.png").symlink_to(beach / "fifo.png")
    (beach / "link.png").symlink_to(tmp_path / "forest" / "000.png")  # a link to an image: kept
    found = [p.name for p in list_images(beach)]
    assert found == ["000.png", "001.png", "link.png"]
