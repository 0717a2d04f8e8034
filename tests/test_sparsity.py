import pytest
import torch
from torch import nn

from vitcompress.config import build_config
from vitcompress.errors import VitcompressError
from vitcompress.models import create_model
from vitcompress.sparsity import (
    GradualPruner,
    achieved_sparsity,
    apply_masks_,
    count_nonzero,
    cubic_sparsity,
    enforce_masks_,
    get_masks,
    global_magnitude_masks,
    magnitude_mask,
    masks_from_state_dict,
    nm_mask,
    register_mask_hooks,
    sparsity_report,
    wanda_mask,
)
from vitcompress.steps.prune import PruneConfig, prune_

STUDY_SPARSITIES = [0.5, 0.75, 0.875, 0.9375, 0.96875]


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def assert_2of4(w: torch.Tensor) -> None:
    groups = w.reshape(w.shape[0], -1, 4)  # (out, in/4, 4)
    assert ((groups == 0).sum(-1) >= 2).all()


# ---- pure maths ---------------------------------------------------------------------------


@pytest.mark.parametrize("s", STUDY_SPARSITIES)
@pytest.mark.parametrize("shape", [(64, 32), (30, 7), (8, 3, 4, 4)])
def test_magnitude_mask_exact_count_and_smallest(s, shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    mask = magnitude_mask(w, s)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == round(s * w.numel())
    assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_magnitude_mask_ties_are_deterministic():
    w = torch.tensor([1.0, -1.0, 1.0, 2.0, 1.0, 0.5])
    mask = magnitude_mask(w, 0.5)  # prune 3: 0.5, then the two later of the four 1.0s
    assert mask.tolist() == [True, True, False, True, False, False]
    assert torch.equal(mask, magnitude_mask(w.clone(), 0.5))


def test_magnitude_mask_prior_is_monotone():
    torch.manual_seed(2)
    w = torch.randn(40, 16)
    prior = magnitude_mask(torch.randn(40, 16), 0.5)  # a mask unrelated to |w|
    mask = magnitude_mask(w, 0.75, prior)
    assert not (mask & ~prior).any()
    assert int((~mask).sum()) == round(0.75 * w.numel())


@pytest.mark.parametrize("s", STUDY_SPARSITIES)
def test_global_masks_exact_total_and_one_threshold(s):
    torch.manual_seed(3)
    weights = {"a": torch.randn(32, 16), "b": 3 * torch.randn(8, 8), "c": 0.1 * torch.randn(24)}
    masks = global_magnitude_masks(weights, s)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(s * total)
    kept = torch.cat([weights[k].abs()[masks[k]] for k in weights])
    pruned = torch.cat([weights[k].abs()[~masks[k]] for k in weights])
    assert pruned.max() <= kept.min()
    # the small-magnitude layer is pruned harder than the large one
    assert (~masks["c"]).float().mean() > (~masks["b"]).float().mean()


def test_nm_mask_keeps_the_two_largest_of_every_four():
    torch.manual_seed(4)
    w = torch.randn(16, 32)
    mask = nm_mask(w, 2, 4)
    g_mask = mask.reshape(16, 8, 4)
    g_abs = w.abs().reshape(16, 8, 4)
    assert (g_mask.sum(-1) == 2).all()
    top2 = g_abs.topk(2, dim=-1).indices
    expected = torch.zeros_like(g_mask).scatter_(-1, top2, True)
    assert torch.equal(g_mask, expected)
    assert_2of4(w * mask)


def test_nm_mask_conv_is_flattened_and_other_ratios():
    torch.manual_seed(5)
    w = torch.randn(6, 1, 4, 4)  # in*k*k = 16
    mask = nm_mask(w, 1, 4)
    assert (mask.reshape(6, 4, 4).sum(-1) == 1).all()
    w2 = torch.randn(4, 16)
    assert (nm_mask(w2, 4, 8).reshape(4, 2, 8).sum(-1) == 4).all()


def test_nm_mask_non_divisible_names_the_layer():
    with pytest.raises(VitcompressError, match="blocks.0.mlp.fc1.*not a multiple of 4"):
        nm_mask(torch.randn(8, 10), 2, 4, name="blocks.0.mlp.fc1")


def test_wanda_mask_uses_activations():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    uniform = wanda_mask(w, torch.ones(4), 0.5)
    assert torch.equal(uniform, w >= 3)
    loud_first = wanda_mask(w, torch.tensor([100.0, 1.0, 1.0, 1.0]), 0.5)
    assert loud_first[:, 0].all()  # a small weight on a loud input survives
    assert ((~loud_first).sum(1) == 2).all()  # per output row


def test_cubic_schedule_against_formula():
    si, sf, t0, n, dt = 0.1, 0.875, 10, 5, 4

    def formula(t):
        return sf + (si - sf) * (1 - (t - t0) / (n * dt)) ** 3

    assert cubic_sparsity(0, si, sf, t0, n, dt) == si
    assert cubic_sparsity(9, si, sf, t0, n, dt) == si
    assert cubic_sparsity(t0, si, sf, t0, n, dt) == si
    assert cubic_sparsity(t0 + 2 * dt, si, sf, t0, n, dt) == pytest.approx(formula(t0 + 2 * dt))
    # between pruning steps the value of the last pruning step holds
    assert cubic_sparsity(t0 + 2 * dt + 3, si, sf, t0, n, dt) == pytest.approx(formula(18))
    assert cubic_sparsity(t0 + n * dt, si, sf, t0, n, dt) == sf
    assert cubic_sparsity(t0 + n * dt - 1, si, sf, t0, n, dt) == pytest.approx(formula(26))
    assert cubic_sparsity(10_000, si, sf, t0, n, dt) == sf
    values = [cubic_sparsity(t, si, sf, t0, n, dt) for t in range(40)]
    assert values == sorted(values)


# ---- configs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.5), "sparsity.*\\[0, 1\\)"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity="0.5"), "sparsity"),
        (dict(), "sparsity is required"),
        (dict(pattern="5:4"), "1 <= N < M"),
        (dict(pattern="0:4"), "1 <= N < M"),
        (dict(pattern="2-4"), "'unstructured' or 'N:M'"),
        (dict(pattern="2:4", sparsity=0.75), "contradicts"),
        (dict(pattern="2:4", scope="global"), "scope"),
        (dict(sparsity=0.5, scope="row"), "scope"),
        (dict(sparsity=0.5, schedule="cubic", n_steps=0), "n_steps"),
        (dict(sparsity=0.5, schedule="cubic", n_steps=5, frequency=0), "frequency"),
        (dict(sparsity=0.5, schedule="cubic", n_steps=5, initial_sparsity=0.6), "initial"),
        (dict(sparsity=0.5, n_steps=5), "only apply to schedule 'cubic'"),
        (dict(sparsity=0.5, method="random"), "method"),
        (dict(sparsity=0.5, method="wanda", schedule="cubic", n_steps=3), "one shot"),
        (dict(sparsity=0.5, targets="re:blocks[("), "regular expression"),
    ],
)
def test_prune_config_rejects(kwargs, match):
    with pytest.raises(VitcompressError, match=match):
        PruneConfig(**kwargs)


def test_prune_config_derived_values_and_from_a_mapping():
    cfg = build_config(PruneConfig, {"pattern": "2:4", "layers": ["blocks.*"]}, "prune")
    assert cfg.nm == (2, 4) and cfg.target_sparsity == 0.5 and cfg.targets == ("blocks.*",)
    assert PruneConfig(pattern="2:4", sparsity=0.5).target_sparsity == 0.5
    with pytest.raises(VitcompressError, match="unknown key 'amount'"):
        build_config(PruneConfig, {"sparsity": 0.5, "amount": 0.5}, "prune")


# ---- module glue --------------------------------------------------------------------------


@pytest.mark.parametrize("s", STUDY_SPARSITIES)
def test_prune_vit_exact_per_layer(s):
    torch.manual_seed(0)
    model = create_model("vit-nano", in_chans=1, num_classes=10)
    prune_(model, PruneConfig(sparsity=s))
    report = achieved_sparsity(get_masks(model))
    assert len(report) == 4 * 4  # qkv, proj, fc1, fc2 of 4 blocks; head and patch_embed dense
    for name, achieved in report.items():
        module = model.get_submodule(name)
        zeros = int((module.weight == 0).sum())
        assert zeros == round(s * module.weight.numel()), name
        assert achieved == pytest.approx(zeros / module.weight.numel())
        assert module.weight_mask.dtype == torch.bool
        assert torch.equal(module.weight == 0, ~module.weight_mask)
    assert sparsity_report(model)["head"] == 0.0
    assert "weight_mask" not in dict(model.head.named_buffers())


def test_prune_global_scope_exact_total():
    model = create_model("vit-nano", in_chans=1, num_classes=10)
    prune_(model, PruneConfig(sparsity=0.875, scope="global", targets="blocks.*.mlp.*"))
    ws = [m.weight for n, m in model.named_modules() if n.startswith("blocks") and "mlp.fc" in n]
    total = sum(w.numel() for w in ws)
    assert sum(int((w == 0).sum()) for w in ws) == round(0.875 * total)


def test_prune_target_matching_nothing():
    with pytest.raises(VitcompressError, match="matches no"):
        prune_(tiny_mlp(), PruneConfig(sparsity=0.5, targets="blocks.*"))
    with pytest.raises(VitcompressError, match="matches no"):
        prune_(create_model("vit-nano", in_chans=1), PruneConfig(sparsity=0.5, targets="blk.*"))


def test_prune_2of4_non_divisible_layer_errors():
    model = nn.Sequential(nn.Linear(10, 8))
    with pytest.raises(VitcompressError, match="'?0'?.*not a multiple of 4"):
        prune_(model, PruneConfig(pattern="2:4", targets="*"))


def test_prune_wanda_end_to_end():
    torch.manual_seed(0)
    model = tiny_mlp()
    calib = [(torch.randn(4, 16), torch.zeros(4)) for _ in range(2)]
    with pytest.raises(VitcompressError, match="calibration"):
        prune_(model, PruneConfig(sparsity=0.5, method="wanda", targets="*"))
    prune_(model, PruneConfig(sparsity=0.5, method="wanda", targets="*"), calib)
    assert achieved_sparsity(get_masks(model)) == {"0": 0.5, "2": 0.5}
    assert ((model[0].weight == 0).sum(1) == 8).all()


def test_wanda_reads_only_calib_batches():
    torch.manual_seed(0)
    model = tiny_mlp()
    read = []

    def calib():
        for i in range(100):
            read.append(i)
            yield torch.randn(4, 16)

    prune_(model, PruneConfig(sparsity=0.5, method="wanda", targets="*", calib_batches=3), calib())
    assert len(read) == 3


def test_masks_survive_adamw_with_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.GELU(), nn.Linear(8, 4)
    )
    # momentum built up before pruning would move pruned weights without enforcement
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    prune_(model, PruneConfig(pattern="2:4", targets=["0", "2"]))
    prune_(model, PruneConfig(sparsity=0.75, targets="4"))
    masks = {k: v.clone() for k, v in get_masks(model).items()}
    handles = register_mask_hooks(model)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert (model[0].weight.grad[~model[0].weight_mask] == 0).all()
        opt.step()
        enforce_masks_(model)
    for h in handles:
        h.remove()
    for name, mask in get_masks(model).items():
        assert torch.equal(mask, masks[name])
        w = model.get_submodule(name).weight
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    assert_2of4(model[0].weight)
    assert_2of4(model[2].weight)
    assert int((model[4].weight == 0).sum()) == 24


def test_gradual_pruner_reaches_final_and_is_monotone():
    torch.manual_seed(0)
    model = tiny_mlp()
    cfg = PruneConfig(
        sparsity=0.9375,
        schedule="cubic",
        initial_sparsity=0.0,
        start_step=2,
        n_steps=4,
        frequency=3,
        targets="*",
    )
    pruner = GradualPruner(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 16), torch.randint(0, 8, (16,))
    previous = {k: v.clone() for k, v in get_masks(model).items()}
    seen = []
    for step in range(20):
        target = pruner.step(step)
        seen.append(target)
        for name, mask in get_masks(model).items():
            assert not (mask & ~previous[name]).any(), "a pruned weight came back"
            assert int((~mask).sum()) == round(target * mask.numel())
            previous[name] = mask.clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.apply()
    assert seen[-1] == 0.9375 and seen[:3] == [0.0, 0.0, 0.0]
    for name in sparsity_report(model):
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.9375 * w.numel()), name
    assert pruner.report() == pytest.approx({"0": 0.9375, "2": 0.9375})


def test_gradual_pruner_catches_up_when_called_rarely():
    model = tiny_mlp()
    cfg = PruneConfig(sparsity=0.75, schedule="cubic", n_steps=10, frequency=10, targets="*")
    pruner = GradualPruner(model, cfg)
    assert pruner.step(55) == pytest.approx(0.75 + (0 - 0.75) * (1 - 50 / 100) ** 3)
    assert pruner.step(1000) == 0.75
    assert int((model[0].weight == 0).sum()) == 384


def test_prune_cubic_needs_gradual_pruner():
    cfg = PruneConfig(sparsity=0.5, schedule="cubic", n_steps=3, targets="*")
    with pytest.raises(VitcompressError, match="GradualPruner"):
        prune_(tiny_mlp(), cfg)


def test_masks_round_trip_through_state_dict_and_counts():
    model = tiny_mlp()
    prune_(model, PruneConfig(sparsity=0.5, targets="*"))
    sd = model.state_dict()
    assert sd["0.weight_mask"].dtype == torch.bool
    fresh = tiny_mlp()
    apply_masks_(fresh, masks_from_state_dict(sd))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh[0].weight_mask, model[0].weight_mask)
    params = sum(p.numel() for p in model.parameters())
    zeros = 256 + 128  # half of 16*32 and of 32*8; biases are dense
    assert count_nonzero(model) == params - zeros
    assert sparsity_report(model) == {"0": 0.5, "2": 0.5}


def test_an_open_cubic_schedule_is_fitted_to_the_fine_tune():
    cfg = PruneConfig(sparsity=0.5, schedule="cubic")  # n_steps left to the fine-tune
    with pytest.raises(VitcompressError, match="needs n_steps"):
        cfg.sparsity_at(10)
    fitted = cfg.over(300)  # ramp over the first 200 steps, ten prunings
    assert (fitted.n_steps, fitted.frequency) == (10, 20)
    assert fitted.sparsity_at(0) == 0.0 and fitted.sparsity_at(200) == 0.5
    assert fitted.over(30) is fitted  # a fixed schedule stays as it is
