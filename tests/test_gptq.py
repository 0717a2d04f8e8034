"""GPTQ against a float64 Optimal Brain Surgeon reference, round to nearest, and the packer."""

import pytest
import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.formats import IntFormat, compute_qparams, fake_quant, get_format
from vitcompress.gptq import gptq_quantize
from vitcompress.quantize import QuantLinear, round_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n=4096, k=128, rank=16, seed=0):
    """Tokens whose features are strongly correlated, as a ViT's activations are: a few latent
    factors plus noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    x = z @ torch.randn(rank, k, generator=g) + 0.5 * torch.randn(n, k, generator=g)
    return x.double()  # (n, k)


def hessian(x):
    return 2 * x.T @ x / x.shape[0]


def weight(out=64, k=128, seed=1):
    return torch.randn(out, k, generator=torch.Generator().manual_seed(seed))


def rtn(w, fmt, granularity, group_size=None, scale_dtype=torch.float32):
    """The package's round to nearest, as the quantize step does it."""
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    q = QuantLinear.from_linear(linear, fmt, granularity, group_size, scale_dtype=scale_dtype)
    return q.weight.detach()


def output_error(x, w, q):
    return (x @ (w.double() - q.double()).T).norm().item()  # ||X W^T - X Q^T||


def obs_reference(w, h, fmt, granularity, group_size, damp, act_order):
    """GPTQ as the sequential Optimal Brain Surgeon it is equivalent to, in float64: no Cholesky,
    no blocks; after each column, the inverse Hessian loses that column by elimination."""
    W = w.double().clone()
    H = h.double().clone()
    k = W.shape[1]
    d = torch.diagonal(H).clone()
    H[d == 0, d == 0] = 1.0
    perm = (
        torch.argsort(torch.where(d == 0, 1.0, d), descending=True, stable=True)
        if act_order
        else torch.arange(k)
    )
    H = H[perm][:, perm]
    H += damp * torch.diagonal(H).mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    W = W[:, perm]
    fixed = granularity != "per_group"
    if fixed:
        s, z = compute_qparams(w.float(), fmt, granularity, axis=0)
    groups = {}  # group -> its qparams, computed when its first column comes
    for p in range(k):
        j = int(perm[p])
        if not fixed:
            g = j // group_size
            if g not in groups:
                members = range(g * group_size, min(k, (g + 1) * group_size))
                cols = [int(torch.nonzero(perm == c)) for c in members]
                groups[g] = compute_qparams(W[:, cols].float(), fmt, "per_channel", axis=0)
            s, z = groups[g]
        q = fake_quant(W[:, p : p + 1].float(), fmt, s, z)[:, 0].double()
        W[:, p:] -= ((W[:, p] - q) / Hinv[p, p])[:, None] * Hinv[p, p:][None, :]
        W[:, p] = q
        Hinv = Hinv - Hinv[:, p : p + 1] @ Hinv[p : p + 1, :] / Hinv[p, p]
    return W[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "fmt,granularity,group_size",
    [
        (IntFormat(4), "per_channel", None),
        (IntFormat(3, symmetric=False), "per_group", 32),
        (IntFormat(4), "per_group", 24),  # groups that straddle blocks
        (get_format("fp4_e2m1"), "per_tensor", None),
    ],
)
def test_blocked_gptq_equals_the_float64_obs_reference(fmt, granularity, group_size, act_order):
    x = correlated_inputs(k=96)
    h, w = hessian(x), weight(32, 96)
    ref = obs_reference(w, h, fmt, granularity, group_size, 0.01, act_order)
    for block_size in (1, 16, 40, 128):
        got = gptq_quantize(
            w, h, fmt, granularity, group_size, act_order=act_order, block_size=block_size
        ).weight
        assert torch.equal(got, ref), block_size


@pytest.mark.parametrize(
    "fmt",
    [IntFormat(4), IntFormat(3, symmetric=False), get_format("uint8"), get_format("fp8_e4m3"),
     get_format("fp6_e3m2"), get_format("fp4_e2m1"), get_format("fp16")],
    ids=lambda f: f.name + ("" if getattr(f, "symmetric", True) else "_asym"),
)  # fmt: skip
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_uncorrelated_inputs_give_round_to_nearest_exactly(fmt, granularity):
    """A diagonal Hessian (identity, or inputs of different scales but no correlation) moves no
    error between columns: GPTQ is then RTN, bit for bit, in any order."""
    w = weight(24, 40)
    scales = torch.rand(40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for h in (torch.eye(40, dtype=torch.float64), torch.diag(scales + 0.1)):
        for act_order in (False, True):
            got = gptq_quantize(w, h, fmt, granularity, 16, act_order=act_order, block_size=8)
            assert torch.equal(got.weight, rtn(w, fmt, granularity, 16)), (act_order, h[0, 0])


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("granularity,group_size", [("per_channel", None), ("per_group", 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_well_below_rtn_on_correlated_inputs(
    bits, granularity, group_size, act_order
):
    x = correlated_inputs()
    w = weight()
    fmt = IntFormat(bits)
    q = gptq_quantize(w, hessian(x), fmt, granularity, group_size, act_order=act_order).weight
    ratio = output_error(x, w, q) / output_error(x, w, rtn(w, fmt, granularity, group_size))
    assert ratio < 0.5, ratio  # about 0.25-0.33 on these inputs


@pytest.mark.parametrize(
    "fmt,granularity,scales",
    [
        (IntFormat(4), "per_group", torch.float16),
        (IntFormat(3, symmetric=False), "per_channel", torch.bfloat16),
        (get_format("fp8_e4m3"), "per_channel", torch.float32),
        (get_format("fp4_e2m1"), "per_group", torch.float32),
    ],
    ids=["int4-fp16scales", "int3asym-bf16scales", "fp8", "fp4"],
)
def test_gptq_weights_are_codes_times_scales_so_they_pack_like_rtn(fmt, granularity, scales):
    x = correlated_inputs(k=64)
    w = weight(16, 64)
    res = gptq_quantize(w, hessian(x), fmt, granularity, 16, scale_dtype=scales)
    assert torch.equal(res.scale, round_scale(res.scale, scales))  # scales in their precision
    linear = nn.Linear(64, 16)
    q = QuantLinear.from_linear(
        linear, fmt, granularity, 16, None, scales, weight=res.weight,
        qparams=(res.scale, res.zero_point),
    )  # fmt: skip
    assert torch.equal(q.weight.detach(), res.weight)  # storing GPTQ's values changes nothing
    assert q.weight_derivation() is not None  # codes + scales give the weight back bit for bit
    if isinstance(fmt, IntFormat):
        assert q.qweight.min() >= fmt.qmin and q.qweight.max() <= fmt.qmax


def test_a_mask_keeps_pruned_weights_at_zero_and_its_error_is_compensated():
    x = correlated_inputs(k=64)
    w = weight(16, 64)
    keep = torch.rand(16, 64, generator=torch.Generator().manual_seed(5)) > 0.5
    w = w * keep
    fmt = IntFormat(4, symmetric=False)
    res = gptq_quantize(w, hessian(x), fmt, "per_group", 16, mask=keep)
    assert (res.weight[~keep] == 0).all()
    assert not torch.signbit(res.weight[~keep]).any()  # +0.0, which the packer's bitmask wants
    q = QuantLinear.from_linear(nn.Linear(64, 16), fmt, "per_group", 16, weight=res.weight,
                                qparams=(res.scale, res.zero_point))  # fmt: skip
    assert q.weight_derivation() is not None
    rtn_err = output_error(x, w, rtn(w, fmt, "per_group", 16))
    # half the columns' entries cannot take any error: less to gain than dense (about 0.7)
    assert output_error(x, w, res.weight) < 0.8 * rtn_err


def test_dead_inputs_are_rounded_to_nearest_and_pass_no_error():
    x = correlated_inputs(k=32)
    x[:, [3, 17]] = 0  # two inputs the calibration data never shows
    w = weight(8, 32)
    fmt = IntFormat(4)
    res = gptq_quantize(w, hessian(x), fmt, "per_channel")
    assert torch.isfinite(res.weight).all()
    assert torch.equal(res.weight[:, [3, 17]], rtn(w, fmt, "per_channel")[:, [3, 17]])
    w2 = w.clone()
    w2[:, [3, 17]] = 5.0  # what a dead input's weight is does not change the other columns...
    res2 = gptq_quantize(w2, hessian(x), fmt, "per_channel")
    s, _ = compute_qparams(w2, fmt, "per_channel", axis=0)
    # ... beyond the scale it sets (same scale here: the columns already set the max)
    if torch.equal(s, compute_qparams(w, fmt, "per_channel", axis=0)[0]):
        live = [j for j in range(32) if j not in (3, 17)]
        assert torch.equal(res2.weight[:, live], res.weight[:, live])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(damp=0.0), r"gptq.damp = 0.0: expected a number > 0"),
        (dict(damp=-0.1), r"gptq.damp"),
        (dict(damp=float("nan")), r"gptq.damp"),
        (dict(block_size=0), r"gptq.block_size = 0: expected an integer >= 1"),
        (dict(granularity="per_row"), r"granularity must be one of"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, match):
    kw = {"granularity": "per_channel", **kwargs}
    with pytest.raises(VitcompressError, match=match) as e:
        gptq_quantize(weight(4, 8), torch.eye(8), IntFormat(4), **kw)
    assert "\n" not in str(e.value)


def test_a_hessian_of_the_wrong_size_or_not_finite_is_refused():
    with pytest.raises(VitcompressError, match=r"the Hessian is \(7, 7\), the weight has 8 inputs"):
        gptq_quantize(weight(4, 8), torch.eye(7), IntFormat(4))
    h = torch.eye(8)
    h[0, 0] = float("nan")
    with pytest.raises(VitcompressError, match="NaN or Inf"):
        gptq_quantize(weight(4, 8), h, IntFormat(4))
    with pytest.raises(VitcompressError, match="not positive definite even with damp"):
        gptq_quantize(weight(4, 8), -torch.eye(8), IntFormat(4))
