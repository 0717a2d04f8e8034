"""Property-based tests of every parser of user files: recipes (mappings and YAML text), studies,
packed files, IDX files and CIFAR-10 pickles.

The property: on any input, random or a mutation of a real file, a parser gives a result or a
:class:`VitcompressError` whose message is one line; never another exception, a hang or a large
allocation (peak traced memory below :data:`PEAK_LIMIT` for the binary formats). Examples are
derandomized, so a run is repeatable (``VITCOMPRESS_FUZZ=2000`` searches longer, with new random
examples each run); inputs these tests once found to break a parser are kept as plain tests at
the end of the file.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import pickle
import struct
import tempfile
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vitcompress.config import parse_yaml
from vitcompress.data import cifar10
from vitcompress.data import fashion_mnist as fm
from vitcompress.errors import VitcompressError
from vitcompress.models import build_model, model_config
from vitcompress.pack import META_KEY, load_packed, save_packed
from vitcompress.steps.prune import PruneConfig, prune_
from vitcompress.steps.quantize import QuantizeConfig, quantize_
from vitcompress.steps.recipe import parse_recipe
from vitcompress.steps.registry import all_steps
from vitcompress.studies import expand_study
from vitcompress.studies.study import MODEL_KEYS, TOP_KEYS

SRC = Path(__file__).resolve().parents[1] / "src" / "vitcompress"
DATA = Path(__file__).parent / "data"
PEAK_LIMIT = 200 << 20
# VITCOMPRESS_FUZZ=N: N random examples per test (a longer search, different each run)
_DEEP = int(os.environ.get("VITCOMPRESS_FUZZ", "0"))
FUZZ = settings(
    max_examples=_DEEP or 60,
    deadline=None,
    derandomize=not _DEEP,  # by default the same examples on every run: CI is repeatable
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SLOW = settings(FUZZ, max_examples=_DEEP or 40)  # a model built and loaded per example


pytestmark = pytest.mark.usefixtures("one_thread")


def outcome(parse: Callable[..., Any], *args: Any, peak: int | None = None) -> Any:
    """``parse(*args)``: its result or the one-line VitcompressError it raised (any other
    exception fails the test); with ``peak``, the traced memory must stay below it."""
    if peak is not None:
        tracemalloc.start()
    try:
        return parse(*args)
    except VitcompressError as e:
        assert "\n" not in str(e), str(e)
        return e
    finally:
        if peak is not None:
            used = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert used < peak, f"{used:,} bytes traced"


_workdir = tempfile.TemporaryDirectory(prefix="vitcompress-fuzz-")


def write(name: str, data: bytes) -> Path:
    path = Path(_workdir.name) / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- random and mutated trees

STEP_OPTIONS = {k: [f.name for f in fields(s.config_cls)] for k, s in all_steps().items()}
WORDS = sorted(
    {*STEP_OPTIONS, *(o for opts in STEP_OPTIONS.values() for o in opts), *TOP_KEYS,
     *MODEL_KEYS, "layers", "grid", "steps", "name", "kind", "teacher", "self", "soft", "2:4",
     "1:4", "int8", "int4", "fp8", "fp16", "fp32", "per_channel", "per_group", "cubic", "blocks.*",
     "re:blocks\\.\\d+", "head", "$x", "${x}", "$distill", "vit-nano", "fashion-mnist",
     "@baseline:abc", "epochs", "max_steps", "batches", "percentile", "x"}
)  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from([0, -1, 10**6, 10**12, 2**63, -(2**70)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=6), st.integers(-2, 5), st.none())
trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=24,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every node of a JSON-like tree, by its path of keys and indices."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Any, keep: Callable[[tuple], bool] = lambda p: True) -> Any:
    """``base`` with one to three nodes replaced, deleted or given a new child (only nodes whose
    path ``keep`` accepts)."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p and keep(p)]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "insert"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "insert" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(keys)] = draw(trees)
        elif op == "insert" and isinstance(parent[path[-1]], list):
            parent[path[-1]].insert(draw(st.integers(0, 4)), draw(trees))
        else:
            parent[path[-1]] = draw(trees)
    return doc


# ---------------------------------------------------------------- recipes


RECIPES = [yaml.safe_load(p.read_text()) for p in sorted((SRC / "recipes").glob("*.yaml"))]


@st.composite
def recipe_like(draw: st.DrawFn) -> dict:
    """A mapping shaped like a recipe: known step kinds with their own option names."""
    steps = []
    for kind in draw(st.lists(st.sampled_from(sorted(STEP_OPTIONS)), max_size=4)):
        opts = st.dictionaries(st.sampled_from(STEP_OPTIONS[kind]), trees, max_size=3)
        steps.append({kind: draw(opts | trees)})
    return {"name": draw(scalars), "steps": steps}


@FUZZ
@given(st.one_of(trees, recipe_like(), st.sampled_from(RECIPES).flatmap(mutated)))
def test_parse_recipe_on_random_mappings(doc):
    outcome(parse_recipe, doc)


yaml_texts = st.one_of(
    st.text(alphabet="abc:-{}[],'\"&*!|>#%@ \n\t0123456789.$", max_size=120),
    st.sampled_from(RECIPES).flatmap(mutated).map(yaml.safe_dump),
)


@st.composite
def garbled(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> str:
    """A text with a few characters replaced, inserted or deleted."""
    text = draw(texts)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.text(alphabet=":-{}[]&*!|>\n \"'", max_size=2)) + text[i + 1 :]
    return text


def _parse_recipe_text(text: str) -> Any:
    return parse_recipe(parse_yaml(text, "recipe.yaml"), "recipe.yaml")


@FUZZ
@given(garbled(yaml_texts))
def test_parse_recipe_on_random_yaml(text):
    outcome(_parse_recipe_text, text)


# ---------------------------------------------------------------- studies


STUDY = {
    "name": "tiny",
    "data": "fashion-mnist",
    "limit": 128,
    "models": {"vit-nano": {"preset": "vit-nano", "epochs": 1, "batch_size": 64}},
    "recipes": [
        {
            "name": "$fmt",
            "grid": {"fmt": {"fp32": {"weights": "fp32", "activations": None},
                             "int8": {"weights": "int8", "activations": "int8"}}},
            "steps": [{"quantize": "$fmt"}],
        },
        {"name": "p$s", "grid": {"s": [0.5, 0.75]},
         "steps": [{"prune": {"sparsity": "$s"}}, {"finetune": {"max_steps": 2}}]},
    ],
}  # fmt: skip
SMOKE = yaml.safe_load((SRC / "studies" / "builtin" / "smoke.yaml").read_text())


study_keys = st.one_of(st.sampled_from(TOP_KEYS), keys)


@FUZZ
@given(
    st.one_of(
        st.dictionaries(study_keys, trees, max_size=6),
        st.sampled_from([STUDY, SMOKE]).flatmap(mutated),
    )
)
def test_expand_study_on_random_mappings(doc):
    outcome(expand_study, doc)


# ---------------------------------------------------------------- packed files


@functools.cache
def packed_files() -> tuple[bytes, ...]:
    """Real packed files: the two of format 2 kept in tests/data, and one of format 3 (2:4
    pruned, int8 quantised: nm, bits, scaled, zeros and derived entries)."""
    torch.manual_seed(0)
    cfg = model_config("vit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4)
    model = build_model(cfg).eval()
    prune_(model, PruneConfig(pattern="2:4"))
    quantize_(model, QuantizeConfig(weights="int8", activations=None, granularity="per_channel"))
    path = write("v3.vcpack", b"")
    save_packed(model, path, {"model": cfg})
    v2 = sorted(DATA.glob("v2-*.packed"))
    return (path.read_bytes(), *(p.read_bytes() for p in v2))


def _with_header(data: bytes, edit: Callable[[dict], dict]) -> bytes:
    """The packed file ``data`` with its compressed JSON header edited."""
    t = st_load(data)
    header = json.loads(zlib.decompress(t["header"].numpy().tobytes()))
    text = json.dumps(edit(header)).encode()
    packed = torch.frombuffer(bytearray(zlib.compress(text)), dtype=torch.uint8)
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    return st_save({"header": packed, "data": t["data"]}, metadata={META_KEY: meta[META_KEY]})


def _not_model_config(path: tuple) -> bool:
    """A header edit that build_model would have to survive: it trusts its config (a depth of
    10^9 builds for ever), which is not the packed reader's to bound."""
    return path[:2] != ("config", "model")


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with bytes flipped, cut off, or a slice of itself or random bytes spliced in."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "splice", "insert"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "splice":
            j = draw(st.integers(0, len(data)))
            data[i:i] = data[j : j + draw(st.integers(1, 64))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@st.composite
def packed_inputs(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(packed_files()))
    kind = draw(st.sampled_from(["bytes", "header", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "bytes":
        return draw(mutated_bytes(base))
    t = st_load(base)
    header = json.loads(zlib.decompress(t["header"].numpy().tobytes()))
    edited = draw(mutated(header, keep=_not_model_config))
    return _with_header(base, lambda _: edited)


def _load_packed_bytes(data: bytes) -> Any:
    return load_packed(write("m.vcpack", data))


@FUZZ_SLOW
@given(packed_inputs())
def test_load_packed_on_random_and_mutated_files(data):
    outcome(_load_packed_bytes, data, peak=PEAK_LIMIT)


def test_the_packed_files_fuzzed_are_valid():
    for data in packed_files():
        model, _ = _load_packed_bytes(data)
        assert sum(p.numel() for p in model.parameters()) > 0


# ---------------------------------------------------------------- IDX files


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


IDX = [_idx(np.arange(60, dtype=np.uint8).reshape(3, 4, 5)), _idx(np.arange(7, dtype=np.uint8))]


@st.composite
def idx_inputs(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(IDX)))
    kind = draw(st.sampled_from(["random", "header", "bytes"]))
    if kind == "random":
        data = draw(st.binary(max_size=64))
    elif kind == "header":  # a type code, a number of dimensions, sizes up to 2^32 - 1
        base[2] = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0, 0xFF]))
        base[3] = draw(st.integers(0, 255))
        sizes = draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4))
        data = bytes(base[:4]) + struct.pack(f">{len(sizes)}I", *sizes) + bytes(base[4:])
    else:
        data = draw(mutated_bytes(bytes(base)))
    if draw(st.booleans()):
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = draw(mutated_bytes(data))  # a damaged gzip stream
    return data


@FUZZ
@given(idx_inputs())
def test_idx_parser_on_random_and_mutated_files(data):
    outcome(fm.parse_idx, data, peak=PEAK_LIMIT)
    outcome(fm.read_idx, write("x-idx3-ubyte", data), peak=PEAK_LIMIT)
    outcome(fm.idx_shape, write("x-idx3-ubyte", data), peak=PEAK_LIMIT)


# ---------------------------------------------------------------- CIFAR-10 pickles


def _batch(protocol: int) -> bytes:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    return pickle.dumps({b"data": data, b"labels": [1, 2], b"names": {b"x", 3}}, protocol=protocol)


PICKLES = [_batch(2), _batch(5), _batch(0), pickle.dumps({b"label_names": [b"cat"]}, 2)]

_G = {
    "reconstruct": b"cnumpy.core.multiarray\n_reconstruct\n",
    "ndarray": b"cnumpy\nndarray\n",
    "dtype": b"cnumpy\ndtype\n",
    "scalar": b"cnumpy.core.multiarray\nscalar\n",
    "frombuffer": b"cnumpy._core.numeric\n_frombuffer\n",
    "bytes": b"c__builtin__\nbytes\n",
    "list": b"c__builtin__\nlist\n",
    "set": b"c__builtin__\nset\n",
    "str": b"c__builtin__\nstr\n",
    "encode": b"c_codecs\nencode\n",
    "os": b"cos\nsystem\n",
}
# pieces of pickles: every object-building opcode, the allowed names and their arguments
OPCODES = [
    *_G.values(),
    *b"(tR.b}]ue)\x85\x86\x87\x8f\x90\x91\x81\x92\x93N\x88\x890s2aelq",
    b"K\x00", b"K\x03", b"J\xff\xff\xff\x7f", b"M\xff\xff", b"J\x00\xe1\xf5\x05",
    b"U\x02u1", b"U\x01b", b"U\x01|", b"X\x02\x00\x00\x00u1", b"X\x0bV2000000000",
    b"C\x04abcd", b"\x96\x04\x00\x00\x00\x00\x00\x00\x00abcd", b"h\x00", b"h\x01", b"\x94",
    b"J\xff\xff\xff\xff", b"\x8a\x09" + b"\xff" * 9,
]  # fmt: skip


@st.composite
def pickle_inputs(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "bytes", "opcodes"]))
    if kind == "random":
        return draw(st.binary(max_size=128))
    if kind == "bytes":
        return draw(mutated_bytes(draw(st.sampled_from(PICKLES))))
    pieces = draw(st.lists(st.sampled_from(OPCODES), max_size=40))
    return b"\x80\x04" + b"".join(bytes([p]) if isinstance(p, int) else p for p in pieces) + b"."


@FUZZ
@given(pickle_inputs())
def test_cifar_unpickler_on_random_and_mutated_pickles(data):
    path = write("data_batch_1", data)
    outcome(cifar10.safe_load, path, peak=PEAK_LIMIT)
    outcome(cifar10.read_batch, path, 10, peak=PEAK_LIMIT)


def test_the_pickles_fuzzed_are_valid():
    for data in PICKLES:
        assert isinstance(cifar10.safe_load(write("batch", data)), dict)


# ---------------------------------------------------------------- what the fuzzing found
# Inputs these tests found to break the parsers as they were before they were bounded, kept as
# plain tests (minimised by hand from hypothesis's examples).


def _edited(which: int, edit: Callable[[dict], Any]) -> bytes:
    def apply(header: dict) -> dict:
        edit(header)
        return header

    return _with_header(packed_files()[which], apply)


@pytest.mark.parametrize(
    "which, edit",
    [
        # a blob missing from the index: AttributeError 'NoneType' object has no attribute ...
        (1, lambda h: h["blobs"].pop("patch_embed.proj.weight#v")),
        (1, lambda h: h["blobs"].pop("blocks.1.mlp.fc2.qweight#v")),
        # a format-2 structure of the wrong type: 'int' object has no attribute 'get'
        (1, lambda h: h.update(structure=3)),
        (1, lambda h: h["structure"]["masks"].__setitem__(0, {})),  # a layer name: a mapping
        # compression records as a mapping: 'Linear' object has no attribute 'derived_weight'
        (0, lambda h: h["config"].update(compression={})),
    ],
)
def test_found_packed_headers_that_raised_attribute_errors(which, edit):
    assert isinstance(outcome(_load_packed_bytes, _edited(which, edit)), VitcompressError)


def test_found_a_pickle_string_claiming_gigabytes_is_not_allocated():
    # BINUNICODE with a length of 2 GB in a 9-byte file: the C unpickler asked the file for
    # 2 GB, and the file allocated them before reading the 3 bytes there are
    err = outcome(cifar10.safe_load, write("data_batch_1", b"\x80\x02X\x00\x00\x00\x80abc."),
                  peak=PEAK_LIMIT)  # fmt: skip
    assert isinstance(err, VitcompressError)
