"""SmoothQuant: the float model is unchanged, the activation outliers move into the weights."""

import copy

import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.lowrank import LowRankLinear
from vitcompress.models import build_model
from vitcompress.steps.calib import observe_inputs
from vitcompress.steps.recipe import apply_recipe, parse_recipe
from vitcompress.steps.registry import StepContext
from vitcompress.steps.smooth import (
    STEP,
    SmoothConfig,
    range_ratio,
    smooth_,
    smoothing_scales,
)

CALIB = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
X = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(9))


def outlier_vit(cfg: dict) -> torch.nn.Module:
    """A tiny ViT whose LayerNorms give three channels 30x the others (as trained ViTs do)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[[3, 17, 40]] *= 30.0
                norm.bias.add_(torch.randn_like(norm.bias) * 0.1)
    return model


def input_ranges(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of each named layer over CALIB."""
    out: dict[str, torch.Tensor] = {}

    def observe(name, module, x):
        a = x.reshape(-1, x.shape[-1]).abs().amax(0)
        out[name] = a if name not in out else torch.maximum(out[name], a)

    layers = {n: model.get_submodule(n) for n in names}
    observe_inputs(model, layers, CALIB, observe)
    return out


def test_smoothing_scales_follow_the_formula_in_float64():
    act = torch.tensor([4.0, 0.5, 0.0, 9.0, 1e-12])
    w = torch.tensor([0.25, 2.0, 1.0, 0.0, 1.0])
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smoothing_scales(act, w, alpha)
        ref = act[:2].double() ** alpha / w[:2].double() ** (1 - alpha)
        assert torch.allclose(s[:2], ref, rtol=1e-12)
        assert s[2] == 1.0 and s[3] == 1.0  # nothing to balance in a dead channel
        assert s[4] >= 1e-5  # clamped
    assert range_ratio(torch.tensor([1.0, 1.0, 10.0])) == 10.0


def test_smooth_leaves_the_float_model_unchanged_and_flattens_the_inputs(tiny_vit_cfg):
    model = outlier_vit(tiny_vit_cfg)
    smoothed = copy.deepcopy(model)
    names = [f"blocks.{i}.{p}" for i in range(4) for p in ("attn.qkv", "mlp.fc1")]
    before = input_ranges(model, names)
    report = STEP.apply(smoothed, SmoothConfig(alpha=0.5), StepContext(calib_loader=CALIB), 0)
    assert report["layers"] == names and report["skipped"] == []
    with torch.no_grad():
        ref, got = model(X), smoothed(X)
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max().clamp(min=1)
    after = input_ranges(smoothed, names)
    for n in names:
        assert range_ratio(after[n]) < 0.5 * range_ratio(before[n]), n
        # alpha = 0.5: every channel's range becomes sqrt(max|X_j| * max|W_j|)
        w = model.get_submodule(n).weight.detach().abs().amax(0)
        assert torch.allclose(after[n], (before[n] * w).sqrt(), rtol=1e-4)
    assert report["range_ratio"]["after"] < 0.5 * report["range_ratio"]["before"]
    # alpha = 0 moves nothing
    still = copy.deepcopy(model)
    smooth_(still, SmoothConfig(alpha=0.0, targets="blocks.0.mlp.fc1"), CALIB)
    w = model.blocks[0].mlp.fc1.weight.detach().abs().amax(0)
    assert torch.allclose(still.blocks[0].norm2.weight, model.blocks[0].norm2.weight * w)


def test_smooth_after_lowrank_scales_the_first_factor_and_skips_other_layers(tiny_vit_cfg):
    model = outlier_vit(tiny_vit_cfg)
    recipe = parse_recipe({"name": "r", "steps": [
        {"lowrank": {"rank_ratio": 0.5, "layers": "blocks.*.mlp.fc1"}},
        {"smooth": {"targets": ["blocks.0.mlp.*", "blocks.0.attn.proj"]}},
    ]})  # fmt: skip
    ref = copy.deepcopy(model)
    apply_recipe(ref, parse_recipe({"name": "r", "steps": recipe.source["steps"][:1]}),
                 StepContext())  # fmt: skip
    reports = apply_recipe(model, recipe, StepContext(calib_loader=CALIB))
    assert isinstance(model.blocks[0].mlp.fc1, LowRankLinear)
    assert reports[1]["layers"] == ["blocks.0.mlp.fc1"]  # and not again for fc1.first
    assert reports[1]["skipped"] == ["blocks.0.attn.proj", "blocks.0.mlp.fc1.second",
                                     "blocks.0.mlp.fc2"]  # fmt: skip
    assert not torch.equal(model.blocks[0].mlp.fc1.first.weight, ref.blocks[0].mlp.fc1.first.weight)
    assert torch.equal(model.blocks[0].mlp.fc1.second.weight, ref.blocks[0].mlp.fc1.second.weight)
    with torch.no_grad():
        assert torch.allclose(model(X), ref(X), atol=1e-5)


@pytest.mark.parametrize(
    "steps,match",
    [
        ([{"smooth": {}}, {"lowrank": {"rank_ratio": 0.5}}], "must come after lowrank"),
        ([{"smooth": {}}, {"shrink": {"mlp": 0.5}}], "must come after shrink"),
        ([{"quantize": {}}, {"smooth": {}}], "quantize must be the last step"),
        (
            [{"smooth": {"alpha": 1.5}}],
            r"step 1 \(smooth\): smooth.alpha must be a number in \[0, 1\]",
        ),
        ([{"smooth": {"alpha": "half"}}], "smooth.alpha must be a number"),
        ([{"smooth": {"batches": 0}}], "smooth.batches must be an integer >= 1"),
        ([{"smooth": {"beta": 0.5}}], "unknown key 'beta'"),
    ],
)
def test_bad_smooth_recipes_are_one_line_errors(steps, match):
    with pytest.raises(VitcompressError, match=match) as e:
        parse_recipe({"name": "r", "steps": steps})
    assert "\n" not in str(e.value)


def test_smooth_refuses_layers_no_layernorm_feeds(tiny_vit_cfg):
    model = build_model(tiny_vit_cfg)
    with pytest.raises(VitcompressError, match="no matched layer takes a LayerNorm output"):
        smooth_(model, SmoothConfig(targets="blocks.*.mlp.fc2"), CALIB)
    with pytest.raises(VitcompressError, match="needs calibration data"):
        smooth_(model, SmoothConfig(), None)
    with pytest.raises(VitcompressError, match="pattern 'blocks.*.mlp.fc9' matches no"):
        smooth_(model, SmoothConfig(targets="blocks.*.mlp.fc9"), CALIB)
