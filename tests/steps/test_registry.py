"""The registry: every technique is found by its recipe key and answers for itself."""

import copy
import dataclasses

import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.steps.recipe import apply_recipe, compress_, parse_recipe
from vitcompress.steps.registry import (
    STEP_MODULES,
    StepContext,
    all_steps,
    describe_structure,
    get_step,
    rebuild_structure_,
)

CALIB = [torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))]


def test_every_registered_step_declares_a_frozen_config():
    steps = all_steps()
    assert list(steps) == [m.rsplit(".", 1)[1] for m in STEP_MODULES]
    for kind, step in steps.items():
        assert step.kind == kind
        assert dataclasses.is_dataclass(step.config_cls), kind
        assert step.config_cls.__dataclass_params__.frozen, kind
    with pytest.raises(VitcompressError, match="step 1: unknown step 'distil'; steps are shrink"):
        parse_recipe({"name": "r", "steps": [{"distil": {}}]})
    with pytest.raises(VitcompressError, match="unknown step 7"):
        get_step(7)


@pytest.mark.parametrize(
    "steps,match",
    [
        ([{"prune": {"pattern": "2:4"}}, {"shrink": {"mlp": 0.5}}], "shrink .* before prune"),
        ([{"quantize": {}}, {"finetune": {}}], "quantize must be the last step"),
        ([{"prune": {"sparsity": 0.5, "schedule": "cubic"}}, {"quantize": {}}], "finetune step"),
    ],
)
def test_order_rules_come_from_the_steps(steps, match):
    with pytest.raises(VitcompressError, match=match):
        parse_recipe({"name": "r", "steps": steps})


# Recipe hashes written by vitcompress 0.1.0 (before the registry): the resolved recipe must
# hash the same, so results stored with these hashes stay comparable.
INT8 = {"weights": "int8", "activations": "int8"}
PINNED = {
    "440b88253d4e": {"name": "int8", "steps": [{"quantize": {**INT8, "granularity": "per_channel",
        "calibration": {"method": "percentile", "batches": 4}}}]},
    "3095342e9e65": {"name": "2of4-ft", "steps": [
        {"prune": {"pattern": "2:4", "layers": "blocks.*"}},
        {"finetune": {"max_steps": 20, "lr": 1.0e-4, "distill": {"teacher": "self"}}},
        {"quantize": INT8}]},
    "603d9b14906a": {"name": "shrink", "steps": [{"shrink": {"mlp": 0.5, "heads": 0.5}},
        {"quantize": {"weights": "fp16"}}]},
    "0ef252d0b1a9": {"name": "lowrank", "steps": [{"lowrank": {"rank_ratio": 0.5}}]},
    # was 73de9777e240 until Wanda read only `calib_batches` batches (it read the whole training
    # split): the change of results renames its runs on purpose
    "0e9332d34dda": {"name": "wanda-int4", "steps": [
        {"prune": {"sparsity": 0.5, "method": "wanda"}},
        {"quantize": {"weights": "int4", "granularity": "per_group", "group_size": 32,
                      "rest": "int8", "scales": "fp16"}}]},
}  # fmt: skip


@pytest.mark.parametrize("expected", list(PINNED))
def test_recipe_hashes_did_not_change(expected):
    assert parse_recipe(PINNED[expected]).hash == expected


def test_structure_records_rebuild_every_kind_of_compressed_model(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    recipe = parse_recipe({"name": "all", "steps": [
        {"shrink": {"mlp": 0.5, "heads": 0.25}},
        {"lowrank": {"rank_ratio": 0.25, "layers": "blocks.*.mlp.fc2"}},
        {"prune": {"pattern": "2:4", "layers": "blocks.*.attn.proj"}},
        {"quantize": {"weights": "int4", "activations": "int8", "granularity": "per_group",
                      "group_size": 16, "attention_matmul": "int8", "ignore": "*.attn.proj"}},
    ]})  # fmt: skip
    apply_recipe(model, recipe, StepContext(calib_loader=CALIB))
    records = describe_structure(model)
    assert [r["kind"] for r in records] == ["shrink", "lowrank", "prune", "quantize"]
    fresh = build_model(tiny_vit_cfg).eval()
    rebuild_structure_(fresh, copy.deepcopy(records))
    assert describe_structure(fresh) == records  # the records describe what they rebuild
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert describe_structure(build_model(tiny_vit_cfg)) == []  # a dense model has none


def test_compress_is_the_path_the_cli_takes(tiny_vit_cfg):
    """The Python API's compress_ and apply_recipe (what compress_run calls) give the same model."""
    torch.manual_seed(0)
    a = build_model(tiny_vit_cfg).eval()
    b = copy.deepcopy(a)
    spec = {"name": "r", "steps": [{"prune": {"sparsity": 0.5, "method": "wanda"}},
                                   {"quantize": INT8}]}  # fmt: skip
    compress_(a, spec, calib_data=CALIB)
    apply_recipe(b, parse_recipe(spec), StepContext(calib_loader=CALIB))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(VitcompressError, match="calibrates: pass calib_data"):
        compress_(build_model(tiny_vit_cfg), spec)
    with pytest.raises(VitcompressError, match="built-in recipes: 2of4-int8"):
        compress_(build_model(tiny_vit_cfg), "no-such-recipe")
