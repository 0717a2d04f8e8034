import math

import numpy as np
import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.formats import (
    FloatFormat,
    IntFormat,
    compute_qparams,
    dequantize_int,
    dynamic_qparams,
    expand_qparams,
    fake_quant_int,
    get_format,
    quantize_int,
)

# --- a float64 reference, by a different algorithm: a table of every code ------------------


def code_table(fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray, int]:
    """Values of codes 0..max_code+1 (the last one past the maximum: the overflow code)."""
    E, M, bias = fmt.exp_bits, fmt.man_bits, fmt.bias
    if fmt.has_inf:
        max_code = ((2**E - 2) << M) | (2**M - 1)
    elif fmt.has_nan:
        max_code = ((2**E - 1) << M) | (2**M - 2)
    else:
        max_code = (2**E << M) - 1
    codes = np.arange(max_code + 2, dtype=np.int64)
    ef, mf = codes >> M, codes & (2**M - 1)
    vals = np.where(
        ef == 0,
        mf * 2.0 ** (1 - bias - M),
        (1 + mf / 2.0**M) * np.exp2((ef - bias).astype(np.float64)),
    )
    if fmt.max_value is not None:
        max_code = int(np.nonzero(vals == fmt.max_value)[0][0])
        codes, vals = codes[: max_code + 2], vals[: max_code + 2]
    return vals, codes, max_code


def reference_round(x: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    vals, codes, max_code = code_table(fmt)
    a = np.abs(x.astype(np.float64))
    finite = np.isfinite(a)
    af = np.where(finite, a, 0.0)
    i = np.clip(np.searchsorted(vals, af, side="right") - 1, 0, len(vals) - 1)
    j = np.minimum(i + 1, len(vals) - 1)
    d_lo, d_hi = af - vals[i], vals[j] - af
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[j] % 2 == 0) & (j != i))
    k = np.where(pick_hi, j, i)
    k = np.where(af > vals[-1], len(vals) - 1, k)
    r = vals[k]
    over = (k > max_code) | ~finite
    if fmt.saturate:
        r = np.where(over, fmt.max, r)
    elif fmt.has_inf:
        r = np.where(over, np.inf, r)
    else:
        r = np.where(over, np.nan, r)
    if not fmt.subnormals:
        r = np.where(r < fmt.min_normal, 0.0, r)
    r = np.copysign(r, x.astype(np.float64))
    return np.where(np.isnan(x), np.nan, r).astype(np.float32)


def probe_values(fmt: FloatFormat, n_random: int = 4000) -> torch.Tensor:
    """Random values over every fp32 magnitude, plus each edge of ``fmt``."""
    g = torch.Generator().manual_seed(0)
    mant = torch.rand(n_random, generator=g) + 0.5
    expo = torch.randint(-152, 129, (n_random,), generator=g).float()
    rnd = (mant * torch.exp2(expo)).numpy().astype(np.float32)
    vals, _, max_code = code_table(fmt)
    grid = vals[: max_code + 2]
    pick = np.unique(
        np.r_[0:6, max_code - 3 : max_code + 2, np.linspace(0, max_code, 60).astype(int)]
    )
    pick = pick[pick < len(grid) - 1]
    mids = (grid[pick] + grid[pick + 1]) / 2  # exact ties (representable in fp32 here)
    with np.errstate(over="ignore"):  # bf16/tf32's overflow code is 2^128: inf in fp32
        edges = np.r_[grid[pick], mids, grid[max_code] * 1.01, grid[-1], 2 * grid[-1]].astype(
            np.float32
        )
    near = np.r_[np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(np.inf))]
    special = np.array([0.0, np.inf, np.nan, 1e-45, 3.4e38, 1.0, 1.5, 2.5], dtype=np.float32)
    allv = np.r_[rnd, edges, near, special].astype(np.float32)
    return torch.from_numpy(np.r_[allv, -allv])


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor) -> None:
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    a, b = out[~nan].view(torch.int32), ref[~nan].view(torch.int32)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, (
        f"{bad.numel()} mismatches, e.g. {out[~nan][bad[:3, 0]]} vs {ref[~nan][bad[:3, 0]]}"
    )


TORCH_DTYPES = [
    ("fp16", torch.float16),
    ("bf16", torch.bfloat16),
    ("fp8_e4m3", torch.float8_e4m3fn),
    ("fp8_e5m2", torch.float8_e5m2),
]


@pytest.mark.parametrize("name,dtype", TORCH_DTYPES)
def test_bit_exact_vs_torch_cast(name, dtype):
    fmt = get_format(name)
    x = probe_values(fmt)
    ref = x.to(dtype).float()
    assert_same_bits(fmt.emulate(x), ref)  # the arithmetic
    assert_same_bits(fmt.quantize(x), ref)  # the fast path
    assert_same_bits(torch.from_numpy(reference_round(x.numpy(), fmt)), ref)  # the reference


def test_torch_overflow_rules_are_the_defaults():
    big = torch.tensor([1e6, -1e6, math.inf, -math.inf])
    assert get_format("fp16").quantize(big).isinf().all()
    assert get_format("bf16").quantize(big[2:]).isinf().all()
    assert get_format("e5m2").quantize(big).isinf().all()
    assert get_format("e4m3").quantize(big).tolist() == [448.0, -448.0, 448.0, -448.0]
    assert big.to(torch.float8_e4m3fn).float().tolist() == [448.0, -448.0, 448.0, -448.0]
    # the OCP non-saturating e4m3: overflow is NaN; 464 is a tie that rounds to 448 (even)
    nonsat = FloatFormat(4, 3, has_inf=False, saturate=False)
    assert nonsat.quantize(torch.tensor([464.0])).item() == 448.0
    assert nonsat.quantize(torch.tensor([464.5, math.inf])).isnan().all()
    sat16 = FloatFormat(5, 10, saturate=True)
    assert sat16.quantize(torch.tensor([7e4, -math.inf])).tolist() == [65504.0, -65504.0]


def tf32_bit_trick(x: np.ndarray) -> np.ndarray:
    """Round fp32 bits to 10 mantissa bits, ties to even (how hardware truncates fp32 to tf32)."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0xFFF + ((b >> 13) & 1)) & ~np.uint64(0x1FFF)
    out = b.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.nan, out).astype(np.float32)


def test_tf32_matches_bit_trick_and_reference():
    fmt = get_format("tf32")
    assert fmt.bits == 19
    x = probe_values(fmt).numpy()
    out = fmt.quantize(torch.from_numpy(x))
    assert_same_bits(out, torch.from_numpy(tf32_bit_trick(x)))
    assert_same_bits(out, torch.from_numpy(reference_round(x, fmt)))


GENERAL = [
    get_format("e3m2"),
    get_format("e2m1"),
    get_format("e2m3"),
    get_format("e4m3"),
    FloatFormat(4, 3, has_inf=False, saturate=False),
    FloatFormat(5, 2, saturate=True),
    FloatFormat(3, 4),  # IEEE-like, tiny
    FloatFormat(4, 2, bias=9, has_inf=False),  # other bias
    FloatFormat(5, 10, subnormals=False),  # fp16 flushing subnormals
    FloatFormat(4, 3, has_inf=False, max_value=240.0),  # clipped range
]


@pytest.mark.parametrize("fmt", GENERAL, ids=lambda f: f"{f.name}-{f.bias}-{f.saturate}-{f.max}")
def test_general_formats_match_reference(fmt):
    x = probe_values(fmt, n_random=2000).numpy()
    assert_same_bits(fmt.quantize(torch.from_numpy(x)), torch.from_numpy(reference_round(x, fmt)))


def test_format_numbers():
    assert get_format("e2m1").max == 6.0 and get_format("e3m2").max == 28.0
    assert get_format("fp8").max == 448.0 and get_format("fp8_e5m2").max == 57344.0
    assert get_format("fp16").min_subnormal == 2.0**-24
    assert get_format("fp8_e4m3").torch_dtype is torch.float8_e4m3fn
    assert {get_format(n).bits for n in ("fp8", "e5m2")} == {8}
    assert get_format("bf16").bits == 16 and get_format("fp4").bits == 4
    assert FloatFormat(5, 10, subnormals=False).quantize(torch.tensor([2.0**-20])).item() == 0.0


# --- integer affine ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["sym", "asym", "unsigned"])
@pytest.mark.parametrize(
    "granularity,group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 16)]
)
def test_int_round_trip_within_half_scale(bits, kind, granularity, group_size):
    fmt = IntFormat(bits, symmetric=kind == "sym", unsigned=kind == "unsigned")
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(12, 40, generator=g) * torch.rand(12, 1, generator=g) * 3 + 0.3  # K=40: ragged
    scale, zp = compute_qparams(x, fmt, granularity, group_size, axis=0)
    want = {"per_tensor": (), "per_channel": (12, 1), "per_group": (12, 3)}[granularity]
    assert tuple(scale.shape) == want and tuple(zp.shape) == want
    s = expand_qparams(scale, x.shape, granularity, group_size)
    z = expand_qparams(zp, x.shape, granularity, group_size)
    q = quantize_int(x, s, z, fmt.qmin, fmt.qmax)
    assert q.dtype == fmt.storage_dtype
    assert int(q.min()) >= fmt.qmin and int(q.max()) <= fmt.qmax
    back = dequantize_int(q, s, z)
    assert ((back - x).abs() <= s / 2 * (1 + 1e-5)).all()
    assert torch.equal(back, fake_quant_int(x, s, z, fmt.qmin, fmt.qmax))
    if kind == "sym":
        assert (zp == 0).all() and fmt.qmin == -fmt.qmax
    # zero is exact
    assert (
        dequantize_int(
            quantize_int(torch.zeros(()), scale.flatten()[0], zp.flatten()[0], fmt.qmin, fmt.qmax),
            scale.flatten()[0],
            zp.flatten()[0],
        )
        == 0
    )


def test_int_ranges_and_rounding():
    assert (IntFormat(8).qmin, IntFormat(8).qmax) == (-127, 127)
    assert (IntFormat(8, narrow=False).qmin, IntFormat(8, narrow=False).qmax) == (-128, 127)
    assert (IntFormat(8, symmetric=False).qmin, IntFormat(8, symmetric=False).qmax) == (-128, 127)
    assert (IntFormat(8, False, True).qmin, IntFormat(8, False, True).qmax) == (0, 255)
    assert (IntFormat(4).qmin, IntFormat(2).qmax) == (-7, 1)
    q = quantize_int(
        torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0]), torch.tensor(1.0), torch.tensor(0), -127, 127
    )
    assert q.tolist() == [0, 2, 2, 0, 127]  # half to even, then clamp


def test_percentile_and_mse_clip_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[0] = 100.0  # one outlier
    fmt = IntFormat(8)
    s_mm, _ = compute_qparams(x, fmt)
    s_p, _ = compute_qparams(x, fmt, method="percentile", percentile=99.9)
    s_mse, _ = compute_qparams(x, fmt, method="mse")
    assert s_p < s_mm / 10 and s_mse < s_mm

    def err(s):
        return (fake_quant_int(x, s, torch.tensor(0), -127, 127) - x).pow(2).sum()

    assert err(s_mse) < err(s_mm)


def test_per_channel_axis_and_dynamic():
    x = torch.randn(3, 5, 7)
    s, _ = compute_qparams(x, IntFormat(8), "per_channel", axis=1)
    assert s.shape == (1, 5, 1)
    assert torch.allclose(s.flatten(), x.abs().amax(dim=(0, 2)) / 127)
    sd, zd = dynamic_qparams(x, IntFormat(8, symmetric=False), dim=-1)
    assert sd.shape == (3, 5, 1) and zd.dtype == torch.int32


def test_quantize_int_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 33, generator=g) * 4
    formats = (
        IntFormat(8),
        IntFormat(8, narrow=False),
        IntFormat(8, False),
        IntFormat(8, False, True),
    )
    for fmt in formats:
        s, z = compute_qparams(x, fmt, "per_channel", axis=0)
        ztype = TensorProto.UINT8 if fmt.unsigned else TensorProto.INT8
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=0)]
        inits = [
            numpy_helper.from_array(s.flatten().numpy(), "s"),
            numpy_helper.from_array(
                z.flatten().numpy().astype(np.uint8 if fmt.unsigned else np.int8), "z"
            ),
        ]
        graph = helper.make_graph(
            nodes,
            "q",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 33])],
            [helper.make_tensor_value_info("q", ztype, [6, 33])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
        mine = quantize_int(x, s, z, fmt.qmin, fmt.qmax).numpy()
        assert np.array_equal(got, mine), fmt


# --- names ---------------------------------------------------------------------------------


def test_get_format_names():
    assert get_format("FP8").name == "fp8_e4m3" and get_format("e4m3fn").name == "fp8_e4m3"
    assert get_format("int4") == IntFormat(4)
    assert get_format("uint8") == IntFormat(8, symmetric=False, unsigned=True)
    assert get_format("e6m5").has_inf and not get_format("e3m3").has_nan
    assert (
        get_format("e5m10").quantize(torch.tensor([1 / 3])).item()
        == get_format("fp16").quantize(torch.tensor([1 / 3])).item()
    )
    assert get_format("int2").bits == 2 and get_format("fp32").bits == 32


@pytest.mark.parametrize("bad", ["int9", "int1", "uint9", "fp7", "", "float8"])
def test_get_format_unknown_lists_valid_names(bad):
    with pytest.raises(VitcompressError, match="valid: fp32, tf32"):
        get_format(bad)


@pytest.mark.parametrize("bad", ["e9m2", "e4m0", "e3m24"])
def test_get_format_impossible_float(bad):
    with pytest.raises(VitcompressError, match="bits must be"):
        get_format(bad)


def test_format_construction_errors():
    with pytest.raises(VitcompressError, match="max_value"):
        FloatFormat(4, 3, has_inf=False, max_value=449.0)
    with pytest.raises(VitcompressError, match="saturate"):
        FloatFormat(2, 1, has_inf=False, has_nan=False, saturate=False)
    with pytest.raises(VitcompressError, match="asymmetric"):
        IntFormat(8, symmetric=True, unsigned=True)
    with pytest.raises(VitcompressError, match="narrow"):
        IntFormat(8, symmetric=False, unsigned=True, narrow=True)
    with pytest.raises(VitcompressError, match="group_size"):
        compute_qparams(torch.randn(4, 4), IntFormat(8), "per_group")
