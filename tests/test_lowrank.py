import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.config import build_config
from vitcompress.errors import VitcompressError
from vitcompress.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    factors_from_svd,
    input_moment,
    rank_for_budget,
    rank_for_energy,
    rank_for_ratio,
    svd,
    svd_factors,
    whitened_svd,
)
from vitcompress.models import create_model
from vitcompress.steps.lowrank import (
    STEP,
    LowRankConfig,
    factorize_,
    lowrank_ranks,
    restore_lowrank_,
)
from vitcompress.steps.registry import StepContext


def factorized(model: nn.Module, config: LowRankConfig) -> dict:
    """Factorise in place through the recipe step; what it reports per layer."""
    return STEP.apply(model, config, StepContext(), 0)["layers"]


def known_spectrum(n: int, p: int, S: list[float]) -> torch.Tensor:
    """An (n, p) float64 matrix whose singular values are exactly ``S``."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(p, len(S), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(S, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("split", ["sqrt", "second"])
@pytest.mark.parametrize("r", [1, 5, 17, 29])
def test_eckart_young(split, r):
    torch.manual_seed(0)
    W = torch.randn(40, 30, dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    A, B = svd_factors(W, r, split)
    assert A.shape == (r, 30) and B.shape == (40, r) and A.dtype == torch.float64
    E = W - B @ A
    assert torch.linalg.matrix_norm(E).item() == pytest.approx(
        S[r:].square().sum().sqrt().item(), rel=1e-6
    )
    assert torch.linalg.matrix_norm(E, ord=2).item() == pytest.approx(S[r].item(), rel=1e-6)


def test_splits_give_the_study_factors_and_balanced_ones():
    W = known_spectrum(12, 10, [9.0, 4.0, 1.0])
    A, B = svd_factors(W, 2, "second")
    assert torch.allclose(A @ A.T, torch.eye(2, dtype=torch.float64))  # V_r^T, orthonormal rows
    A, B = svd_factors(W, 2, "sqrt")
    assert torch.allclose(A.norm(dim=1), torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert torch.allclose(B.norm(dim=0), torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_svd_factors_keep_dtype():
    A, B = svd_factors(torch.randn(16, 8), 3)
    assert A.dtype == B.dtype == torch.float32


def test_low_rank_linear_output_and_params():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40).double()
    low = LowRankLinear.from_linear(lin, 6)
    A, B = svd_factors(lin.weight.detach(), 6)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    assert torch.allclose(low(x), x @ (B @ A).T + lin.bias, atol=1e-12)
    assert torch.allclose(low.dense_weight(), B @ A, atol=1e-12)
    assert sum(p.numel() for p in low.parameters()) == 6 * (40 + 24) + 40
    assert low.rank == 6 and low.first.bias is None
    full = LowRankLinear.from_linear(lin, 24)
    assert torch.allclose(full(x), lin(x), atol=1e-10)


def test_low_rank_conv_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 20, kernel_size=4, stride=4).double()
    low = LowRankConv2d.from_conv(conv, 5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    A, B = svd_factors(conv.weight.detach(), 5)  # (5, 48), (20, 5)
    ref = F.conv2d(x, (B @ A).reshape(20, 3, 4, 4), conv.bias, stride=4)
    assert torch.allclose(low(x), ref, atol=1e-12)
    assert sum(p.numel() for p in low.parameters()) == 5 * (20 + 48) + 20
    full = LowRankConv2d.from_conv(conv, 20)
    assert torch.allclose(full(x), conv(x), atol=1e-10)


def test_rank_for_ratio():
    assert rank_for_ratio((30, 100), 0.1) == 3
    assert rank_for_ratio((64, 32), 0.25) == 8
    assert rank_for_ratio((64, 32), 0.26) == 9
    assert rank_for_ratio((64, 32), 1.0) == 32
    assert rank_for_ratio((8, 1, 4, 4), 0.5) == 4  # conv: min(8, 16)
    with pytest.raises(VitcompressError):
        rank_for_ratio((8, 8), 0.0)


def test_rank_for_energy_on_known_spectrum():
    S = torch.linalg.svdvals(known_spectrum(20, 10, [3.0, 2.0, 1.0, 1.0]))  # energies 9,4,1,1
    assert rank_for_energy(S, 0.5) == 1
    assert rank_for_energy(S, 9 / 15) == 1
    assert rank_for_energy(S, 0.61) == 2
    assert rank_for_energy(S, 13 / 15) == 2
    assert rank_for_energy(S, 0.9) == 3
    assert rank_for_energy(S, 0.95) == 4
    assert rank_for_energy(S, 1.0) == 4
    with pytest.raises(VitcompressError):
        rank_for_energy(S, 1.5)


def test_rank_for_budget():
    # dense: 64*32 + 64 = 2112 params; rank r costs r*96 + 64
    assert rank_for_budget((64, 32), 0.5) == 10  # 1056 - 64 = 992 -> 10
    assert rank_for_budget((64, 32), 64 + 96 * 7) == 7
    assert rank_for_budget((64, 32), 64 + 96 * 7 - 1) == 6
    assert rank_for_budget((64, 32), 0.5, bias=False) == 10  # 1024 / 96
    assert rank_for_budget((64, 32), 100) == 0
    assert rank_for_budget((64, 32), 1.0) == 21


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank_ratio=0.0), "rank_ratio.*\\(0, 1\\]"),
        (dict(rank_ratio=1.5), "rank_ratio"),
        (dict(energy=0.0), "energy"),
        (dict(budget=2.0), "budget"),
        (dict(), "exactly one"),
        (dict(rank_ratio=0.5, energy=0.9), "exactly one.*rank_ratio, energy"),
        (dict(rank_ratio=0.5, split="first"), "split"),
        (dict(rank_ratio=0.5, targets="re:("), "regular expression"),
    ],
)
def test_lowrank_config_rejects(kwargs, match):
    with pytest.raises(VitcompressError, match=match):
        LowRankConfig(**kwargs)


def test_lowrank_config_from_a_mapping():
    cfg = build_config(LowRankConfig, {"energy": 0.9, "layers": ["a", "b"]}, "lowrank")
    assert cfg.targets == ("a", "b")
    with pytest.raises(VitcompressError, match="unknown key 'ratio'"):
        build_config(LowRankConfig, {"ratio": 0.5}, "lowrank")


def test_factorize_mlp_skip_and_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    report = factorized(model, LowRankConfig(rank=8, targets="*"))
    assert report["0"] == {"rank": 8, "kept": (8 * 96 + 64) / (32 * 64 + 64)}
    assert report["2"] == {"rank": 4, "kept": "skipped"}  # rank clipped to 4; 4*68 >= 64*4
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], nn.Linear)
    assert sum(p.numel() for p in model[0].parameters()) == 8 * (32 + 64) + 64
    # a second pass does not factor the factors
    again = factorized(model, LowRankConfig(rank=2, targets="*"))
    assert again == {"2": {"rank": 2, "kept": (2 * 68 + 4) / 260}}


def test_factorize_vit_patch_embed_and_mlp():
    torch.manual_seed(0)
    model = create_model("vit-nano", in_chans=1, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    dense = sum(p.numel() for p in model.parameters())
    report = factorized(model, LowRankConfig(rank_ratio=0.25))
    assert set(report) == {"patch_embed.proj"} | {
        f"blocks.{i}.mlp.{fc}" for i in range(4) for fc in ("fc1", "fc2")
    }
    assert report["patch_embed.proj"]["rank"] == 4  # min(64, 1*4*4) = 16 -> 4
    assert report["blocks.0.mlp.fc1"]["rank"] == 16
    assert isinstance(model.patch_embed.proj, LowRankConv2d)
    assert isinstance(model.get_submodule("blocks.0.mlp.fc1.first"), nn.Linear)
    assert model(x).shape == before.shape
    assert sum(p.numel() for p in model.parameters()) < dense
    # the structure can be rebuilt on a fresh model and loaded
    fresh = create_model("vit-nano", in_chans=1, num_classes=10).eval()
    restore_lowrank_(fresh, lowrank_ranks(model))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


def test_factorize_energy_one_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(6, 40)
    with torch.no_grad():
        lin.weight.copy_(known_spectrum(40, 6, [5.0, 1.0]).float())
    model = nn.Sequential(lin)
    x = torch.randn(3, 6)
    before = model(x)
    report = factorized(model, LowRankConfig(energy=0.999, targets="0"))
    assert report["0"]["rank"] == 2
    assert torch.allclose(model(x), before, atol=1e-5)
    assert math.isclose(report["0"]["kept"], (2 * 46 + 40) / (240 + 40))


def test_factorize_target_matching_nothing():
    with pytest.raises(VitcompressError, match="matches no"):
        factorize_(nn.Sequential(nn.Linear(4, 4)), LowRankConfig(rank=1))


# --------------------------------------------------------------------------------------------
# Activation-aware (whitened) SVD
# --------------------------------------------------------------------------------------------


def skewed_inputs(tokens: int, p: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs whose channel scales span three decades (float64, (tokens, p))."""
    g = torch.Generator().manual_seed(seed)
    mix, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    scales = torch.logspace(-1.5, 1.5, p, dtype=torch.float64)
    return (torch.randn(tokens, p, generator=g, dtype=torch.float64) * scales) @ mix


def output_error(W: torch.Tensor, usv: tuple, r: int, X: torch.Tensor) -> float:
    A, B = factors_from_svd(*usv, r)
    return float((X @ (W - B @ A).T).norm() / (X @ W.T).norm())


@pytest.mark.parametrize("r", [4, 12, 24])
def test_whitened_svd_has_less_output_error_than_plain_svd(r):
    torch.manual_seed(0)
    W = torch.randn(48, 64, dtype=torch.float64)
    X = skewed_inputs(4000, 64)
    C = input_moment(X) / X.shape[0]
    plain_err = output_error(W, svd(W), r, X)
    white_err = output_error(W, whitened_svd(W, C), r, X)
    assert white_err < 0.7 * plain_err
    # it is the optimum: no other rank-r matrix does better on these inputs (the residual of a
    # least-squares fit of the best rank-r outputs cannot be undercut by the plain SVD's)
    Y = X @ W.T  # (tokens, n)
    best = torch.linalg.svdvals(Y)[r:].square().sum().sqrt() / Y.norm()
    assert white_err == pytest.approx(float(best), rel=1e-3)  # up to the fp32 moment


def test_whitened_svd_is_plain_svd_for_isotropic_inputs():
    torch.manual_seed(0)
    W = torch.randn(20, 30, dtype=torch.float64)
    for r in (1, 7, 20):
        for split in ("sqrt", "second"):
            A, B = factors_from_svd(
                *whitened_svd(W, 2.5 * torch.eye(30, dtype=torch.float64)), r, split
            )
            A0, B0 = factors_from_svd(*svd(W), r, split)
            assert torch.allclose(B @ A, B0 @ A0, atol=1e-12)
    U, S, Vh = whitened_svd(W, torch.eye(30, dtype=torch.float64))
    assert torch.allclose(U @ torch.diag(S) @ Vh, W, atol=1e-12)  # an exact decomposition


def test_whitened_svd_survives_a_singular_moment():
    """Fewer tokens than channels and a dead channel: damped, finite, and still better."""
    torch.manual_seed(0)
    W = torch.randn(16, 40, dtype=torch.float64)
    X = skewed_inputs(30, 40)  # rank 30 < 40
    X[:, 5] = 0.0
    C = input_moment(X) / X.shape[0]
    U, S, Vh = whitened_svd(W, C)
    assert all(bool(torch.isfinite(t).all()) for t in (U, S, Vh))
    assert output_error(W, (U, S, Vh), 8, X) < 0.7 * output_error(W, svd(W), 8, X)
    U, S, Vh = whitened_svd(W, torch.zeros(40, 40, dtype=torch.float64))  # never saw input
    A, B = factors_from_svd(U, S, Vh, 8)
    A0, B0 = factors_from_svd(*svd(W), 8)
    assert torch.allclose(B @ A, B0 @ A0, atol=1e-12)
    with pytest.raises(VitcompressError, match="input moment of shape"):
        whitened_svd(W, torch.eye(3))


def test_whitened_factorize_through_the_step_on_a_mlp_and_a_patch_conv():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8))
    tokens = skewed_inputs(5 * 64, 32).float()
    calib, held_out = list(tokens[:256].split(64)), tokens[256:]
    errs = {}
    for method in ("svd", "whitened"):
        model = copy.deepcopy(dense)
        cfg = LowRankConfig(rank=6, targets="0", method=method)
        report = STEP.apply(model, cfg, StepContext(calib_loader=calib), 0)["layers"]
        assert report["0"]["rank"] == 6
        with torch.no_grad():
            errs[method] = float((model[0](held_out) - dense[0](held_out)).norm())
    assert errs["whitened"] < 0.7 * errs["svd"]
    # the patch projection, whose moment comes from unfolded patches in the weight's
    # (in, kh, kw) order: on its calibration images, the least output error any rank-4 conv has
    conv = nn.Conv2d(3, 24, kernel_size=4, stride=4).double()
    tint = torch.tensor([0.05, 1.0, 4.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) * tint for _ in range(2)]
    outs = {}
    for method in ("svd", "whitened"):
        model = nn.Sequential(copy.deepcopy(conv))
        factorize_(model, LowRankConfig(rank=4, targets="0", method=method), imgs)
        assert isinstance(model[0], LowRankConv2d)
        with torch.no_grad():
            outs[method] = float(sum((model(x) - conv(x)).square().sum() for x in imgs).sqrt())
    with torch.no_grad():
        Y = torch.cat([(conv(x) - conv.bias[:, None, None]).flatten(2).transpose(1, 2)
                       for x in imgs]).reshape(-1, 24)  # fmt: skip
    best = float(torch.linalg.svdvals(Y)[4:].square().sum().sqrt())
    assert outs["whitened"] == pytest.approx(best, rel=1e-3) and outs["whitened"] < outs["svd"]


def test_whitened_energy_reads_the_whitened_spectrum_and_needs_data():
    """Inputs living in 2 of 12 directions: 99 % of the output energy needs rank <= 2, while
    the weight's own spectrum is flat."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.linalg.qr(torch.randn(12, 12))[0])  # all singular values 1
    x = torch.zeros(256, 12)
    x[:, :2] = torch.randn(256, 2)
    model = nn.Sequential(lin)
    cfg = LowRankConfig(energy=0.99, targets="0", method="whitened")
    assert STEP.needs_calibration(cfg) and not STEP.needs_calibration(LowRankConfig(rank=1))
    report = STEP.apply(model, cfg, StepContext(calib_loader=[x]), 0)["layers"]
    assert report["0"]["rank"] <= 2
    assert torch.allclose(model(x), lin(x), atol=1e-4)
    with pytest.raises(VitcompressError, match="whitened' needs calibration data"):
        factorize_(nn.Sequential(nn.Linear(12, 12)), cfg)
    with pytest.raises(VitcompressError, match="lowrank.method must be one of"):
        LowRankConfig(rank=2, method="asvd")
