"""The log2 and twin-uniform activation grids: their values against float64 references, and what
their calibration picks on post-softmax and post-GELU values."""

import pytest
import torch
import torch.nn.functional as F

from vitcompress.errors import VitcompressError
from vitcompress.formats import IntFormat, compute_qparams, fake_quant
from vitcompress.quant_grids import (
    Log2Quantizer,
    TwinUniformQuantizer,
    log2_fake_quant,
    search_log2,
    search_twin,
    twin_fake_quant,
)


def attention_probs(seed: int = 0) -> torch.Tensor:
    """Post-softmax values of peaky attention rows: most near 0, a few near 1."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(32, 50, 50, generator=g) * 2.5).softmax(-1).reshape(-1)


def gelu_outputs(seed: int = 0) -> torch.Tensor:
    """Post-GELU values with a long positive tail (a few channels 12x larger)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(100_000, generator=g)
    x[:100] *= 12
    return F.gelu(x)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean())


def uniform_mse(x: torch.Tensor, bits: int) -> float:
    """The best per-tensor uniform grid the quantize step has: asymmetric, MSE-clipped."""
    fmt = IntFormat(bits, symmetric=False)
    s, z = compute_qparams(x, fmt, method="mse")
    return mse(fake_quant(x, fmt, s, z), x)


# --- the grids against float64 references -------------------------------------------------


def log2_reference(x: torch.Tensor, s: float, bits: int) -> torch.Tensor:
    """Nearest level in the log domain among ``s * 2^-q`` (q <= 2^bits - 2), 0 counting as the
    next power down; brute force over every level, float64."""
    n = 2**bits - 1
    logs = torch.log2(torch.tensor(s, dtype=torch.float64)) - torch.arange(n + 1).double()
    lx = torch.log2(x.double().clamp(min=1e-300))[:, None]  # (N, 1)
    k = (lx - logs[None, :]).abs().argmin(dim=1)  # (N,)
    out = torch.where(k < n, torch.exp2(logs[k.clamp(max=n - 1)]), torch.zeros(()).double())
    return torch.where(x.double() > 0, out, torch.zeros(()).double())


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_log2_grid_matches_the_float64_reference(bits):
    s = 0.8125
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.rand(4000, generator=g) * 1.2 * s,  # across and above the range
                   torch.exp2(-torch.rand(4000, generator=g) * 2**bits),  # every decade
                   torch.tensor([0.0, -0.3, s, 2 * s])])  # fmt: skip
    got = log2_fake_quant(x, s, bits)
    assert torch.equal(got.double(), log2_reference(x, s, bits).float().double())
    levels = s * torch.exp2(-torch.arange(2**bits - 1).float())  # every non-zero level
    assert torch.equal(log2_fake_quant(levels, s, bits), levels)  # grid values round-trip
    assert got[-2] == s and got[-1] == s and got[-3] == 0  # saturates above, 0 for x <= 0
    assert len(set(got.tolist())) <= 2**bits  # b bits: at most 2^b values


def twin_reference(x: torch.Tensor, s1: float, z: int, m: int, bits: int) -> torch.Tensor:
    """Nearest value of the union of both grids, by brute force in float64."""
    n = 2 ** (bits - 1)
    q = torch.arange(n).double()
    grid = torch.cat([s1 * (q - z), s1 * 2**m * q])  # (2n,)
    k = (x.double()[:, None] - grid[None, :]).abs().argmin(dim=1)
    return grid[k]


@pytest.mark.parametrize("bits,z,m", [(4, 0, 2), (6, 5, 3), (8, 20, 0)])
def test_twin_grid_matches_the_float64_reference(bits, z, m):
    s1 = 0.0390625  # a power of two: both grids exact in fp32 and fp64 alike
    n = 2 ** (bits - 1)
    g = torch.Generator().manual_seed(bits)
    top = s1 * 2**m * (n - 1)
    x = (torch.rand(8000, generator=g) * 1.3 - 0.15) * top  # below, across and above the range
    got = twin_fake_quant(x, s1, z, m, bits)
    assert torch.equal(got.double(), twin_reference(x, s1, z, m, bits))
    grid = torch.cat([s1 * (torch.arange(n) - z), s1 * 2**m * torch.arange(n)]).float()
    assert torch.equal(twin_fake_quant(grid, s1, z, m, bits), grid)  # grid values round-trip
    assert len(set(got.tolist())) <= 2**bits


# --- calibration --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_twin_calibration_on_softmax_splits_fine_and_coarse(bits):
    x = attention_probs()
    s, z, m = search_twin(x[:32768], float(x.min()), float(x.max()), bits)
    n = 2 ** (bits - 1)
    assert z == 0  # nothing negative to cover
    assert m >= 1  # a fine range for the mass near 0 ...
    assert s * 2**m * (n - 1) >= 0.5 * float(x.max())  # ... a coarse one up to the top values
    assert mse(twin_fake_quant(x, s, z, m, bits), x) < 0.7 * uniform_mse(x, bits)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_twin_calibration_on_gelu_covers_the_negative_side(bits):
    x = gelu_outputs()
    s, z, m = search_twin(x[:32768], float(x.min()), float(x.max()), bits)
    assert z >= 1 and m >= 1
    assert -z * s <= -0.05  # the fine range reaches well into GELU's negative values
    assert mse(twin_fake_quant(x, s, z, m, bits), x) < 0.5 * uniform_mse(x, bits)


def test_log2_calibration_keeps_small_attention_probabilities():
    """At 4 bits a uniform grid sends most probabilities to 0; the log2 grid none above 2^-14,
    each within a factor sqrt(2) of its value."""
    x = attention_probs()
    s = search_log2(x[:32768], float(x.max()), 4)
    assert float(x.max()) / 4 <= s <= float(x.max())
    q = log2_fake_quant(x, s, 4)
    fmt = IntFormat(4, symmetric=False)
    su, zu = compute_qparams(x, fmt, method="mse")
    qu = fake_quant(x, fmt, su, zu)
    kept = (x > 1e-3) & (x <= s)
    assert float((qu[kept] == 0).float().mean()) > 0.5
    assert not bool((q[kept] == 0).any())
    ratio = (q[kept] / x[kept]).double()
    assert float(ratio.max()) <= 2**0.5 + 1e-6 and float(ratio.min()) >= 2**-0.5 - 1e-6


@pytest.mark.parametrize("cls", [Log2Quantizer, TwinUniformQuantizer])
def test_quantizer_modules_calibrate_freeze_and_reload(cls):
    x = attention_probs().reshape(32, 50, 50)
    q = cls(IntFormat(6))
    with pytest.raises(VitcompressError, match="used before calibration"):
        q(x)
    q.start_observing(2)
    assert torch.equal(q(x[:16]), x[:16])  # observing passes values through
    q(x[16:])
    q.freeze("blocks.0.attn.av_matmul")
    assert bool(q.calibrated)
    y = q(x)
    again = cls(IntFormat(6))
    again.load_state_dict(q.state_dict())
    assert torch.equal(again(x), y)
    assert len(torch.unique(y)) <= 64
    with pytest.raises(VitcompressError, match="saw no data"):
        fresh = cls(IntFormat(6))
        fresh.start_observing(1)
        fresh.freeze("x")
    with pytest.raises(VitcompressError, match="needs an integer format, got fp8_e4m3"):
        from vitcompress.formats import get_format

        cls(get_format("fp8_e4m3"))
