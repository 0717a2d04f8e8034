import torch
from torch import nn

from vitcompress.measure import (
    compression_fields,
    flops_per_image,
    latency_ms,
    params_nonzero,
    params_total,
)
from vitcompress.models import build_model
from vitcompress.pack import bytes_stored
from vitcompress.steps.recipe import apply_recipe, parse_recipe
from vitcompress.steps.registry import StepContext, describe_structure


def test_params_and_flops_counted_by_hand():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3, bias=False))
    with torch.no_grad():
        model[0].weight[:5] = 0
    assert params_total(model) == 10 * 20 + 20 + 20 * 3
    assert params_nonzero(model) == params_total(model) - 5 * 10 - int((model[0].bias == 0).sum())
    assert flops_per_image(model, (10,)) == 2 * (10 * 20 + 20 * 3)  # 2 per multiply-add


def test_vit_flops_follow_its_shapes(tiny_vit_cfg):
    model = build_model(tiny_vit_cfg)
    n, d, hid = 16 + 1, 64, 128  # 4x4 patches + class token; nano: dim 64, MLP 128
    per_block = 2 * n * (d * 3 * d + d * d + 2 * d * hid) + 2 * 2 * n * n * d  # linears + QK, AV
    patch = 2 * 16 * (1 * 4 * 4) * d
    assert flops_per_image(model, (1, 16, 16)) == 4 * per_block + patch + 2 * d * 4


def test_compression_fields_come_from_the_steps_that_ran(tiny_vit_cfg):
    torch.manual_seed(0)
    model, dense = build_model(tiny_vit_cfg), build_model(tiny_vit_cfg)
    recipe = parse_recipe({"name": "r", "steps": [
        {"prune": {"pattern": "2:4"}},
        {"quantize": {"weights": "int8", "activations": "int8"}},
    ]})  # fmt: skip
    reports = apply_recipe(model, recipe, StepContext(calib_loader=[torch.randn(4, 1, 16, 16)]))
    config = {"model": tiny_vit_cfg, "compression": describe_structure(model)}
    f = compression_fields(model, dense, recipe, reports, config)
    assert f["format"] == "int8" and f["activations"] == "int8"
    assert f["pattern"] == "2:4" and f["sparsity_target"] == 0.5
    # the 2:4 zeros are still there after quantization, plus weights that round to code 0
    assert 0.5 <= f["sparsity"] < 0.501
    assert f["rank_ratio"] is None  # no low-rank step: its default
    assert f["bytes_stored"] == bytes_stored(model, config)
    assert f["bytes_fp32"] == 4 * params_total(dense)


def test_latency_reports_order_statistics():
    r = latency_ms(nn.Linear(8, 8), (8,), batch_size=2, warmup=1, iters=5)
    assert r["median_ms"] <= r["p90_ms"] and r["mean_ms"] > 0 and r["std_ms"] >= 0
