"""Structured pruning: whole heads and MLP neurons leave, the layers get smaller, and what is
left computes exactly what the original model computes with those units switched off."""

import copy

import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.export import export_onnx
from vitcompress.measure import compression_fields
from vitcompress.models import build_model, model_config
from vitcompress.ort import read_metadata
from vitcompress.pack import load_packed, save_packed
from vitcompress.runs import load_run, save_run
from vitcompress.steps.quantize import QuantizeConfig, quantize_
from vitcompress.steps.recipe import apply_recipe, parse_recipe
from vitcompress.steps.registry import StepContext, describe_structure
from vitcompress.steps.shrink import ShrinkConfig, kept_count, kept_units, shrink_

# 4 heads of 8 channels, MLP of 64 neurons: enough units to pick from
CFG = model_config("vit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4,
                   embed_dim=32, num_heads=4)  # fmt: skip
SHAPE = (1, 16, 16)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(CFG).eval()
    with torch.no_grad():  # biases away from zero, so that dropping a unit is visible
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _x(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _switch_off(model, block: int, heads=(), neurons=()) -> None:
    """Zero what removed units add to the residual stream: proj columns, fc2 columns."""
    b = model.blocks[block]
    d = b.attn.head_dim
    with torch.no_grad():
        for h in heads:
            b.attn.proj.weight[:, h * d : (h + 1) * d] = 0
        for j in neurons:
            b.mlp.fc2.weight[:, j] = 0


def test_kept_count_rounds_and_respects_multiples():
    assert kept_count(64, 0.5) == 32
    assert kept_count(3, 0.5) == 1  # round(1.5) = 2 removed
    assert kept_count(2, 0.9) == 1  # never below one unit
    assert kept_count(100, 0.5, multiple_of=16) == 64  # 50 rounded up to a multiple of 16
    assert kept_count(20, 0.1, multiple_of=16) == 20  # never above n


def test_magnitude_shrink_keeps_the_largest_units_and_equals_switching_them_off():
    model = _model()
    with torch.no_grad():  # make units 1 and 3 of block 0 the largest heads, 0..15 the neurons
        a, mlp = model.blocks[0].attn, model.blocks[0].mlp
        hd = a.num_heads * a.head_dim
        for h in (1, 3):
            a.qkv.weight[2 * hd + h * 8 : 2 * hd + (h + 1) * 8] *= 10
        mlp.fc1.weight[:16] *= 10
    ref = copy.deepcopy(model)
    report = kept_units(model, ShrinkConfig(heads=0.5, mlp=0.75))
    shrink_(model, ShrinkConfig(heads=0.5, mlp=0.75))
    assert report["blocks.0.attn"] == [1, 3]
    assert report["blocks.0.mlp"] == list(range(16))
    b = model.blocks[0]
    assert b.attn.num_heads == 2 and tuple(b.attn.qkv.weight.shape) == (3 * 16, 32)
    assert tuple(b.attn.proj.weight.shape) == (32, 16)
    assert tuple(b.mlp.fc1.weight.shape) == (16, 32) and tuple(b.mlp.fc2.weight.shape) == (32, 16)
    # the shrunk model is the original with the removed units' outputs zeroed
    for i in range(len(model.blocks)):
        gone_h = sorted(set(range(4)) - set(report[f"blocks.{i}.attn"]))
        gone_n = sorted(set(range(64)) - set(report[f"blocks.{i}.mlp"]))
        _switch_off(ref, i, gone_h, gone_n)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    params = sum(p.numel() for p in model.parameters())
    assert params < sum(p.numel() for p in _model().parameters()) * 0.6


def test_activation_shrink_folds_constant_neurons_into_the_bias():
    """A neuron whose output never varies scores zero and goes, and its constant contribution
    is moved into the fc2 bias: the model's output does not change at all."""
    model = _model()
    with torch.no_grad():
        for blk in model.blocks:
            blk.mlp.fc1.weight[::2] = 0  # even neurons: gelu(bias), a constant
            blk.mlp.fc1.weight[1::2] *= 0.01  # odd ones: small weights that still vary
    ref = copy.deepcopy(model)
    x = _x(16)
    config = ShrinkConfig(mlp=0.5, method="activation")
    report = kept_units(model, config, [x[:8]])
    shrink_(model, config, [x[:8]])
    for i in range(len(model.blocks)):
        assert report[f"blocks.{i}.mlp"] == list(range(1, 64, 2))
    with torch.no_grad():  # on inputs the calibration never saw, too
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    # magnitude scoring removes the same neurons (zero fc1 rows) but loses their constant part
    plain = copy.deepcopy(ref)
    shrink_(plain, ShrinkConfig(mlp=0.5))
    with torch.no_grad():
        assert (plain(x) - ref(x)).abs().max() > 1e-3


def test_heads_are_scored_by_magnitude_whatever_the_method():
    model = _model()
    with torch.no_grad():
        a = model.blocks[0].attn
        hd = a.num_heads * a.head_dim
        a.qkv.weight[2 * hd : 2 * hd + 16] *= 0.01  # heads 0, 1: small values
    by_act = kept_units(model, ShrinkConfig(heads=0.5, method="activation"))
    by_mag = kept_units(model, ShrinkConfig(heads=0.5))
    assert by_act == by_mag and by_mag["blocks.0.attn"] == [2, 3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mlp=1.0), "shrink.mlp must be a fraction"),
        (dict(heads=-0.1), "shrink.heads must be a fraction"),
        (dict(), "give mlp and/or heads"),
        (dict(mlp=0.5, method="random"), "shrink.method"),
        (dict(mlp=0.5, multiple_of=0), "multiple_of"),
        (dict(mlp=0.5, batches=0), "shrink.batches"),
    ],
)
def test_bad_config_is_one_line(kwargs, match):
    with pytest.raises(VitcompressError, match=match):
        ShrinkConfig(**kwargs)


def test_refusals():
    with pytest.raises(VitcompressError, match="needs calibration data"):
        shrink_(_model(), ShrinkConfig(mlp=0.5, method="activation"))
    with pytest.raises(VitcompressError, match="calibration data yielded no batches"):
        shrink_(_model(), ShrinkConfig(mlp=0.5, method="activation"), [])  # empty data
    with pytest.raises(VitcompressError, match="matches no"):
        shrink_(_model(), ShrinkConfig(mlp=0.5, targets="encoder.*"))
    q = _model()
    quantize_(q, QuantizeConfig(), [_x()])
    with pytest.raises(VitcompressError, match="shrink before prune, lowrank and quantize"):
        shrink_(q, ShrinkConfig(mlp=0.5))
    with pytest.raises(VitcompressError, match="must come before prune"):
        parse_recipe({"name": "r", "steps": [{"prune": {"pattern": "2:4"}},
                                             {"shrink": {"mlp": 0.5}}]})  # fmt: skip
    with pytest.raises(VitcompressError, match="unknown key 'neurons'"):
        parse_recipe({"name": "r", "steps": [{"shrink": {"neurons": 0.5}}]})


def test_shrunk_run_reloads_packs_and_exports(tmp_path):
    """shrink -> finetune -> int8 through a recipe: the run directory, the packed file and the
    ONNX exports all rebuild the narrower blocks and give the same logits."""
    model = _model()
    x = _x(32, seed=1)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    recipe = parse_recipe({"name": "shrink-int8", "steps": [
        {"shrink": {"mlp": 0.5, "heads": 0.25, "method": "activation", "multiple_of": 8}},
        {"finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16}},
        {"quantize": {"weights": "int8", "activations": "int8"}},
    ]})  # fmt: skip
    reports = apply_recipe(model, recipe, StepContext(train_loader=loader, calib_loader=loader))
    records = describe_structure(model)
    assert reports[0]["blocks"]["blocks.0.mlp"] == {"before": 64, "after": 32}
    assert reports[0]["blocks"]["blocks.0.attn"] == {"before": 4, "after": 3}
    model.eval()
    config = {"model": CFG, "compression": records}
    fields = compression_fields(model, _model(), recipe, reports, config)
    assert fields["pattern"] == "structured" and fields["sparsity"] == 0.0
    assert fields["params_total"] < 0.75 * fields["bytes_fp32"] / 4  # parameters really gone
    save_run(tmp_path / "run", model, {"model": CFG, "compression": records}, {})
    loaded, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(loaded(x), ref)
    save_packed(model, tmp_path / "m.vcpack", {"model": CFG, "compression": records})
    packed, _ = load_packed(tmp_path / "m.vcpack")
    with torch.no_grad():
        assert torch.equal(packed(x), ref)
    for fused in (False, True):
        path = export_onnx(model, tmp_path / f"m{fused}.onnx", SHAPE, fused_attention=fused)
        check = read_metadata(path)["vitcompress.check"]
        assert '"argmax_agree": 1.0' in check
