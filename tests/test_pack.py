import json
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from vitcompress.codecs import decode_tensor, decode_values, encode_tensor, pack_bits, unpack_bits
from vitcompress.errors import VitcompressError
from vitcompress.int8 import to_int8_
from vitcompress.lowrank import LowRankLinear
from vitcompress.models import build_model
from vitcompress.pack import META_KEY, bytes_fp32, bytes_stored, load_packed, save_packed
from vitcompress.quantize import fake_quant_slices
from vitcompress.sparse_exec import sparsify_for_inference
from vitcompress.sparsity import get_masks
from vitcompress.steps.lowrank import LowRankConfig, factorize_
from vitcompress.steps.prune import PruneConfig, prune_
from vitcompress.steps.quantize import QuantizeConfig, quantize_
from vitcompress.steps.registry import describe_structure

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]


def _dense(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _pruned_24(cfg):
    m = _dense(cfg)
    prune_(m, PruneConfig(pattern="2:4"))
    return m


def _pruned_90(cfg):
    m = _dense(cfg)
    prune_(m, PruneConfig(sparsity=0.9))
    return m


def _lowrank(cfg):
    m = _dense(cfg)
    factorize_(m, LowRankConfig(rank_ratio=0.25))
    return m


def _int8(cfg):
    m = _dense(cfg)
    quantize_(m, QuantizeConfig(weights="int8", granularity="per_channel"), _calib())
    return m


def _dense_random_vectors(cfg):
    m = _dense(cfg)
    with torch.no_grad():  # non-trivial biases and norms, as in a trained model
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return m


def _int8_fp16_rest(cfg):
    m = _dense_random_vectors(cfg)
    quantize_(m, QuantizeConfig(granularity="per_channel", scales="fp16", rest="fp16"), _calib())
    to_int8_(m)
    return m


def _int8_int8_rest(cfg):
    m = _dense_random_vectors(cfg)
    quantize_(m, QuantizeConfig(granularity="per_tensor", scales="fp16", rest="int8"), _calib())
    to_int8_(m)
    return m


def _int4_group(cfg):
    m = _dense(cfg)
    quantize_(m, QuantizeConfig(weights="int4", activations=None, granularity="per_group",
                                group_size=16))  # fmt: skip
    return m


def _fp4(cfg):
    m = _dense(cfg)
    quantize_(m, QuantizeConfig(weights="fp4", activations=None))
    return m


def _int8_real_24(cfg):
    m = _pruned_24(cfg)
    quantize_(m, QuantizeConfig(), _calib())
    to_int8_(m)
    return m


def _half(cfg):
    return _dense(cfg).half()


BUILDERS = {
    "dense": _dense,
    "2:4": _pruned_24,
    "unstructured90": _pruned_90,
    "lowrank": _lowrank,
    "int8": _int8,
    "int8_fp16_scales_rest": _int8_fp16_rest,
    "int8_int8_rest": _int8_int8_rest,
    "int4_per_group": _int4_group,
    "fp4": _fp4,
    "2:4+int8_real": _int8_real_24,
    "fp16": _half,
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_round_trip_identical_logits_and_size(kind, tiny_vit_cfg, tmp_path):
    model = BUILDERS[kind](tiny_vit_cfg)
    path = tmp_path / "m.vcpack"
    config = {"model": tiny_vit_cfg, "note": kind}
    n = save_packed(model, path, config)
    assert n == path.stat().st_size == bytes_stored(model, config)
    loaded, cfg2 = load_packed(path)
    assert cfg2 == {**config, "compression": describe_structure(model)}  # stored once, with it
    x = torch.randn(3, 1, 16, 16, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    want, got = model.state_dict(), loaded.state_dict()
    assert list(want) == list(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert type(loaded.blocks[0].mlp.fc1) is type(model.blocks[0].mlp.fc1)


def _payload(model, cfg, tmp_path) -> int:
    """Bytes of the tensors in the file, without the JSON header (large for a tiny model)."""
    path = tmp_path / "p.vcpack"
    n = save_packed(model, path, cfg)
    return n - 8 - int.from_bytes(path.read_bytes()[:8], "little")


def _data_bytes(model, cfg, tmp_path) -> int:
    """Bytes of the stored values alone (the file's ``data`` tensor)."""
    path = tmp_path / "d.vcpack"
    save_packed(model, path, cfg)
    return load_file(path)["data"].numel()


def test_sizes_shrink_by_the_expected_factor(tiny_vit_cfg, tmp_path):
    cfg = {"model": tiny_vit_cfg}
    dense = _dense(tiny_vit_cfg)
    base = _payload(dense, cfg, tmp_path)
    # random fp32 weights take 4 bytes; zero biases and unit LayerNorm weights almost nothing
    assert 0.95 * bytes_fp32(dense) < base <= bytes_fp32(dense)
    linear_w = sum(m.weight.numel() for m in dense.modules() if isinstance(m, nn.Linear))
    block_w = sum(
        m.weight.numel() for n, m in dense.named_modules() if n.startswith("blocks.")
        and isinstance(m, nn.Linear)
    )  # fmt: skip
    # int8: every Linear weight from 4 bytes to 1 (plus one fp32 scale per row)
    saved = base - _payload(_int8(tiny_vit_cfg), cfg, tmp_path)
    assert saved > 0.95 * 3 * linear_w
    # int4 per group of 16: half a byte per weight plus a scale per 16 weights
    saved4 = base - _payload(_int4_group(tiny_vit_cfg), cfg, tmp_path)
    assert saved4 > 0.95 * (4 - 0.5 - 4 / 16) * linear_w
    # 2:4: half the values (fp32) plus 2 bits per kept value; masks are not stored
    saved24 = base - _payload(_pruned_24(tiny_vit_cfg), cfg, tmp_path)
    assert saved24 > 0.95 * (2 - 0.25) * block_w
    # 90 % unstructured: 10 % of the values plus a 1-bit mask per weight
    saved90 = base - _payload(_pruned_90(tiny_vit_cfg), cfg, tmp_path)
    assert saved90 > 0.95 * (4 - 0.4 - 0.125) * block_w


def test_fp16_scales_and_rest_take_two_bytes(tiny_vit_cfg, tmp_path):
    cfg = {"model": tiny_vit_cfg}
    m = _int8_fp16_rest(tiny_vit_cfg)
    fp32 = _dense_random_vectors(tiny_vit_cfg)
    quantize_(fp32, QuantizeConfig(granularity="per_channel"), _calib())
    to_int8_(fp32)
    linear_w = sum(q.out_features * q.in_features for q in m.modules() if hasattr(q, "qweight"))
    rest = bytes_fp32(m) // 4 - linear_w
    scales = sum(q.weight_scale.numel() for q in m.modules() if hasattr(q, "qweight"))
    # every parameter but the int8 codes, and every weight scale, from 4 bytes to 2
    saved = _payload(fp32, cfg, tmp_path) - _payload(m, cfg, tmp_path)
    assert saved >= 0.98 * 2 * (rest + scales)


def test_int8_rest_takes_one_byte_plus_scales(tiny_vit_cfg, tmp_path):
    cfg = {"model": tiny_vit_cfg}
    m = _int8_int8_rest(tiny_vit_cfg)
    fp16 = _dense_random_vectors(tiny_vit_cfg)
    quantize_(fp16, QuantizeConfig(granularity="per_tensor", scales="fp16", rest="fp16"), _calib())
    to_int8_(fp16)
    linear_w = sum(q.out_features * q.in_features for q in m.modules() if hasattr(q, "qweight"))
    rest = bytes_fp32(m) // 4 - linear_w
    leftovers = [p for p in m.parameters() if p.is_floating_point()]  # int8 codes are not
    assert sum(p.numel() for p in leftovers) == rest
    n_scales = sum(p.shape[0] if p.dim() >= 2 else 1 for p in leftovers)
    assert n_scales <= rest / 8  # the scales are few next to the values they scale
    # every leftover parameter from 2 bytes to 1, plus a 2-byte scale per slice: exactly, in
    # the data (the compressed header grows a little with the layout of each tensor)
    assert _data_bytes(fp16, cfg, tmp_path) - _data_bytes(m, cfg, tmp_path) == rest - 2 * n_scales
    assert _payload(fp16, cfg, tmp_path) - _payload(m, cfg, tmp_path) >= 0.9 * (rest - 2 * n_scales)


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
@pytest.mark.parametrize("shape", [(64,), (16, 1, 4, 4), (1, 17, 8), (5, 7)])
def test_scaled_layout_finds_fake_quantised_tensors(bits, shape):
    g = torch.Generator().manual_seed(bits)
    t = torch.randn(shape, generator=g)
    if len(shape) >= 2:  # slices from 1e-30 (bf16 scales have no subnormals there) to 1e3
        t *= torch.logspace(-30, 3, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
        t[-1] = 0 if shape[0] > 1 else t[-1]  # an all-zero slice: scale 0
    else:
        t *= 1e-20
    q = fake_quant_slices(t, bits)
    meta, blobs = encode_tensor(q)
    assert meta["layout"] == "scaled" and meta["elem"]["bits"] <= bits
    assert meta["groups"] == (shape[0] if len(shape) >= 2 else 1)
    assert blobs["s"].element_size() == 2
    dec, support = decode_tensor(meta, blobs, list(shape), torch.float32)
    assert torch.equal(dec.view(torch.int32), q.view(torch.int32)) and bool(support.all())
    # plain float tensors are not mistaken for one
    assert encode_tensor(t + 1e-3)[0]["layout"] == "dense"


def test_masks_are_rebuilt_not_stored(tiny_vit_cfg, tmp_path):
    model = _pruned_90(tiny_vit_cfg)
    with torch.no_grad():  # a kept weight that is exactly zero must stay "kept"
        model.blocks[0].mlp.fc1.weight[model.blocks[0].mlp.fc1.weight_mask] *= 1
        idx = model.blocks[0].mlp.fc1.weight_mask.nonzero()[0]
        model.blocks[0].mlp.fc1.weight[tuple(idx)] = 0.0
    save_packed(model, tmp_path / "p", {"model": tiny_vit_cfg})
    loaded, _ = load_packed(tmp_path / "p")
    masks, masks2 = get_masks(model), get_masks(loaded)
    assert set(masks) == set(masks2) and masks
    for k in masks:
        assert torch.equal(masks[k], masks2[k])


@pytest.mark.parametrize("n", range(1, 9))
def test_pack_bits_round_trip(n):
    rng = np.random.default_rng(n)
    u = rng.integers(0, 2**n, size=1001, dtype=np.uint8)
    p = pack_bits(u, n)
    assert len(p) == -(-1001 * n // 8)
    assert np.array_equal(unpack_bits(p, n, 1001), u)


def test_encode_tensor_is_bit_exact_and_picks_nm_for_2of4():
    t = torch.tensor([[0.0, -0.0, 1.5, float("nan")], [2.0, 0.0, 0.0, -3.0]])
    meta, blobs = encode_tensor(t)
    back, _ = decode_tensor(meta, blobs, [2, 4], torch.float32)
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))  # -0.0 and NaN kept
    w = torch.randn(8, 16)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask.view(-1, 4)[:, :2] = True
    meta, blobs = encode_tensor(w * mask, mask)
    assert (meta["layout"], meta["n"], meta["m"], meta["idx_bits"]) == ("nm", 2, 4, 2)
    assert blobs["i"].numel() == 8 * 16 // 4 * 2 * 2 // 8  # 2 bits per kept position
    assert meta["elem"]["codec"] == "raw" and blobs["v"].numel() == 64


def test_tf32_and_fp16_values_take_3_and_2_bytes():
    x = torch.randn(1000)
    tf32 = ((x * 1e10).view(torch.int32) & ~0x1FFF).view(torch.float32)  # beyond fp16's range
    meta, blobs = encode_tensor(tf32)
    assert meta["elem"]["codec"] == "top3" and blobs["v"].numel() == 3000
    meta, blobs = encode_tensor(x.half().float())
    assert meta["elem"]["codec"] == "f16" and blobs["v"].nbytes == 2000


def test_a_repeated_float_is_stored_once():
    x = torch.full((192, 1), 0.1)  # a per-tensor scale, expanded to one per row (Int8Linear)
    x.view(-1)[0] = 0.2  # one value differs: stored in full
    meta, blobs = encode_tensor(x)
    assert meta["elem"]["codec"] != "repeat"
    x.view(-1)[0] = 0.1
    meta, blobs = encode_tensor(x)
    assert meta["elem"]["codec"] == "repeat" and blobs["v"].nbytes == 4
    dec, _ = decode_tensor(meta, blobs, [192, 1], torch.float32)
    assert torch.equal(dec, x)


def test_corrupt_or_missing_file_is_one_line_error(tiny_vit_cfg, tmp_path):
    path = tmp_path / "m.vcpack"
    save_packed(_int8(tiny_vit_cfg), path, {"model": tiny_vit_cfg})
    data = path.read_bytes()
    for bad in (data[: len(data) // 2], b"\x00" * 16, data[:8] + b"[" + data[9:]):
        path.write_bytes(bad)
        with pytest.raises(VitcompressError, match="corrupt packed file") as e:
            load_packed(path)
        assert "\n" not in str(e.value)
    with pytest.raises(VitcompressError, match="not found"):
        load_packed(tmp_path / "missing")


def test_refuses_what_it_cannot_rebuild(tiny_vit_cfg, tmp_path):
    model = _pruned_90(tiny_vit_cfg)
    sparsify_for_inference(model, min_sparsity=0.8)
    with pytest.raises(VitcompressError, match="SparseLinear"):
        save_packed(model, tmp_path / "s", {"model": tiny_vit_cfg})
    with pytest.raises(VitcompressError, match="no 'model' section"):
        save_packed(nn.Sequential(nn.Linear(2, 2)), tmp_path / "q", {})
    odd = _dense(tiny_vit_cfg)
    odd.blocks[0].mlp.fc1 = LowRankLinear(64, 128, 4)
    odd.extra = nn.Linear(3, 3)  # not part of the model config describes
    with pytest.raises(VitcompressError, match="extra"):
        save_packed(odd, tmp_path / "o", {"model": tiny_vit_cfg})


# ---------------------------------------------------------------- corrupt and malicious files


def _parts(path) -> tuple[dict, torch.Tensor]:
    """The header (blob index included) and data of a packed file."""
    t = load_file(path)
    return json.loads(zlib.decompress(t["header"].numpy().tobytes())), t["data"]


def _write(path, header: dict | bytes, data: torch.Tensor) -> None:
    """A packed file with this header (a dict, or the raw bytes to compress) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    packed = torch.frombuffer(bytearray(zlib.compress(text, 9)), dtype=torch.uint8)
    path.write_bytes(st_save({"header": packed, "data": data}, metadata={META_KEY: "3"}))


def _load_error(path) -> tuple[str, int]:
    """(the one-line error load_packed raises, the peak bytes traced meanwhile)."""
    tracemalloc.start()
    try:
        with pytest.raises(VitcompressError, match="corrupt packed file") as e:
            load_packed(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert "\n" not in str(e.value)
    return str(e.value), peak


@pytest.fixture
def packed_int8(tiny_vit_cfg, tmp_path):
    path = tmp_path / "int8.vcpack"
    save_packed(_int8_real_24(tiny_vit_cfg), path, {"model": tiny_vit_cfg})
    return path


def _first(header: dict, layout: str) -> str:
    """The first entry of this layout (or, for "bits", whose values are bit-packed)."""
    if layout == "bits":
        entries = header["entries"].items()
        return next(k for k, e in entries if e.get("elem", {}).get("codec") == "bits")
    return next(k for k, e in header["entries"].items() if e["layout"] == layout)


def test_a_header_that_inflates_past_its_bound_is_refused(packed_int8, tmp_path):
    _, data = _parts(packed_int8)
    bomb = tmp_path / "bomb"
    _write(bomb, b'{"pad": "' + b" " * (200 << 20) + b'"}', data)  # 200 MB of JSON in 200 KB
    assert bomb.stat().st_size < 1 << 20
    msg, peak = _load_error(bomb)
    assert "inflates to more than" in msg and peak < 16 << 20


@pytest.mark.parametrize(
    "edit, expected",
    [
        # a constant claiming 10^12 elements: refused before torch.full allocates it
        (lambda h: h["entries"].update(x={"shape": [10**6, 10**6], "dtype": "int8",
                                         "layout": "dense",
                                         "elem": {"codec": "const", "value": 1}}),
         "would take"),
        # every blob points at the whole data: each clone would copy it again
        (lambda h: h["blobs"].update({f"x{i}#v": {"dtype": "uint8", "numel": h["_n"], "offset": 0}
                                      for i in range(300)}),
         "lies outside the data"),
        # one support cloned into a thousand masks
        (lambda h: h["mask_of"].update({f"m{i}": _first(h, "nm") for i in range(1000)}),
         "two masks"),
        # a shape that is not a list of integers, a numel that is not an integer
        (lambda h: h["entries"][_first(h, "nm")].update(shape=[4, -1]), "shape must be"),
        (lambda h: next(iter(h["blobs"].values())).update(numel=1e400), "no valid place"),
        # N:M with M = 0 (a ZeroDivisionError), with positions that do not fit
        (lambda h: h["entries"][_first(h, "nm")].update(m=0), "N:M layout"),
        (lambda h: h["entries"][_first(h, "nm")].update(n=3, m=4), "N:M positions need"),
        # bits: more than 8, or more values than the blob holds
        (lambda h: h["entries"][_first(h, "bits")].update(elem={"codec": "bits", "bits": 100,
                                                                "offset": 0}),
         "1 to 8 bits"),
        # a codec whose blob is missing (an AttributeError on None)
        (lambda h: h["entries"][_first(h, "dense")].update(elem={"codec": "top3"}), "top3"),
        # a stored tensor of another shape than the model's, or not in the model at all
        (lambda h: h["entries"][_first(h, "zeros")].update(shape=[3, 5]), "the model's"),
        (lambda h: h["entries"].update(x={"shape": [2], "dtype": "int8", "layout": "zeros"}),
         "not a tensor of the model"),
        # sections of the wrong type
        (lambda h: h.update(mask_of=[]), "'mask_of' is not a mapping"),
        (lambda h: h["config"].update(model=[]), "AttributeError"),
    ],
)  # fmt: skip
def test_a_corrupt_header_is_refused_before_it_is_expanded(packed_int8, tmp_path, edit, expected):
    header, data = _parts(packed_int8)
    header["_n"] = data.numel()  # for the blob case
    edit(header)
    del header["_n"]
    bad = tmp_path / "bad"
    _write(bad, header, data)
    msg, peak = _load_error(bad)
    assert expected in msg and peak < 64 << 20, (msg, peak)


def test_decoders_check_blobs_against_what_their_codec_stores():
    meta, blobs = encode_tensor(torch.randint(-8, 8, (64,), dtype=torch.int8))
    assert meta["elem"] == {"codec": "bits", "bits": 4, "offset": -8}
    with pytest.raises(VitcompressError, match="needs 32 stored elements"):
        decode_tensor(meta, {"v": blobs["v"][:-1]}, [64], torch.int8)
    with pytest.raises(VitcompressError, match="shape must be"):
        decode_tensor(meta, blobs, [8, True], torch.int8)
    with pytest.raises(VitcompressError, match="another codec"):
        decode_values({"codec": "repeat", "elem": {"codec": "repeat"}}, None, 4, torch.float32)
    with pytest.raises(VitcompressError, match="1 to 8 bits"):
        unpack_bits(np.zeros(4, np.uint8), 9, 2)
    with pytest.raises(VitcompressError, match="fewer than 33 values"):
        unpack_bits(np.zeros(4, np.uint8), 8, 33)  # was a short array, silently


def _all_zeros_file(path, cfg) -> int:
    """A packed file of ``cfg``'s model with every tensor in the zeros layout (no data: a few
    KB whatever the model's size); returns the decoded bytes it asks for."""
    with torch.device("meta"):
        state = build_model(cfg).state_dict()
    entries = {k: {"shape": list(v.shape), "dtype": "float32", "layout": "zeros"}
               for k, v in state.items()}  # fmt: skip
    header = {"version": 3, "config": {"model": cfg, "compression": []}, "entries": entries,
              "derived": {}, "mask_of": {}, "blobs": {}}  # fmt: skip
    _write(path, header, torch.zeros(0, dtype=torch.uint8))
    return 4 * sum(v.numel() for v in state.values())


def test_a_small_file_cannot_decode_to_more_than_its_budget(tiny_vit_cfg, tmp_path):
    big = {**tiny_vit_cfg, "embed_dim": 2048, "num_heads": 8}  # 200M parameters: 800 MB
    assert _all_zeros_file(tmp_path / "big", big) > 500 << 20
    assert (tmp_path / "big").stat().st_size < 64 << 10
    msg, peak = _load_error(tmp_path / "big")
    assert "would take" in msg and peak < 16 << 20
    _all_zeros_file(tmp_path / "small", tiny_vit_cfg)  # the same, small: within the floor
    model, _ = load_packed(tmp_path / "small")
    assert all(not p.any() for p in model.parameters())
