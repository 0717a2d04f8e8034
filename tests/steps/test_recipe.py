import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.runs import load_run, save_run
from vitcompress.steps.recipe import (
    BUILTIN_RECIPES,
    apply_recipe,
    check_recipe_names,
    load_recipe,
    parse_recipe,
)
from vitcompress.steps.registry import StepContext, describe_structure


def _recipe(*steps):
    return parse_recipe({"name": "t", "steps": list(steps)})


@pytest.mark.parametrize(
    "step,match",
    [
        ({"prune": {"sparsity": 1.5}}, r"step 1 \(prune\).*sparsity"),
        ({"prune": {"pattern": "5:4"}}, r"step 1 \(prune\).*5:4"),
        ({"prune": {"sparsity": 0.5, "colour": "red"}}, r"unknown key 'colour'"),
        ({"lowrank": {"rank": 0}}, r"step 1 \(lowrank\).*rank"),
        ({"lowrank": {"rank_ratio": 0.5, "energy": 0.9}}, r"exactly one"),
        ({"quantize": {"weights": "int9"}}, r"step 1 \(quantize\).*int9"),
        ({"quantize": {"granularity": "per_row"}}, r"granularity"),
        ({"finetune": {"epochs": 0}}, r"finetune.epochs"),
        ({"finetune": {"distill": {"teacher": "/no/such/run"}}}, r"not a run directory"),
        ({"squeeze": {}}, r"unknown step 'squeeze'"),
    ],
)
def test_bad_steps_are_one_line_errors(step, match):
    with pytest.raises(VitcompressError, match=match) as e:
        _recipe(step)
    assert "\n" not in str(e.value)


def test_step_order_rules():
    with pytest.raises(VitcompressError, match="quantize must be the last step"):
        _recipe({"quantize": {"activations": None}}, {"finetune": {}})
    with pytest.raises(VitcompressError, match="follow it with a finetune step"):
        _recipe({"prune": {"sparsity": 0.5, "schedule": "cubic"}})
    with pytest.raises(VitcompressError, match="unknown key 'stpes'"):
        parse_recipe({"name": "x", "stpes": []})


def test_layers_is_an_alias_of_targets_and_patterns_are_checked(tiny_vit_cfg):
    model = build_model(tiny_vit_cfg)
    ok = _recipe(
        {"lowrank": {"rank_ratio": 0.5, "layers": "blocks.*.mlp.fc1"}},
        {"prune": {"sparsity": 0.5, "layers": "blocks.*.mlp.fc1.first"}},
    )
    check_recipe_names(ok, model)  # fc1.first exists once fc1 is factorised
    bad = _recipe({"prune": {"sparsity": 0.5, "layers": "blocks.*.mlp.fc9"}})
    with pytest.raises(VitcompressError, match=r"step 1 \(prune\).*fc9.*matches no"):
        check_recipe_names(bad, model)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(VitcompressError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = tmp_path / "r.yaml"
    p.write_text("steps: [prune: {sparsity: 0.5}\n")
    with pytest.raises(VitcompressError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("name: ok\nsteps:\n  - prune: {pattern: '2:4'}\n")
    r = load_recipe(p)
    assert r.steps[0].config.nm == (2, 4)
    assert r.hash == load_recipe(p).hash


def _toy_loader(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_prune_finetune_quantize_then_reload_gives_identical_logits(tmp_path, tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg)
    dense = build_model(tiny_vit_cfg)
    dense.load_state_dict(model.state_dict())
    recipe = _recipe(
        {"lowrank": {"rank_ratio": 0.25, "layers": "blocks.*.mlp.fc2"}},
        {"prune": {"pattern": "2:4", "layers": "blocks.*.mlp.fc1"}},
        {"finetune": {"epochs": 1, "lr": 1e-3, "distill": {"teacher": "self"}}},
        {"quantize": {"weights": "int8", "activations": "int8", "calibration": {"batches": 2}}},
    )
    ctx = StepContext(_toy_loader(), _toy_loader(seed=1), teacher_for=lambda spec: dense)
    apply_recipe(model, recipe, ctx)
    records = describe_structure(model)
    # quantised layers replace the masked ones (their zeros stay in the codes): no mask is left
    assert [r["kind"] for r in records] == ["lowrank", "quantize"]
    # 2:4 survived fine-tuning and quantization: every 4-group of fc1 has >= 2 zeros
    for blk in model.blocks:
        w = blk.mlp.fc1.weight.detach()
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    model.eval()
    save_run(tmp_path, model, {"model": tiny_vit_cfg, "compression": records}, {})
    loaded, _ = load_run(tmp_path)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), loaded(x))


def test_cubic_prune_reaches_its_target_during_finetune(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg)
    recipe = _recipe(
        {"prune": {"sparsity": 0.875, "schedule": "cubic", "layers": "blocks.*"}},
        {"finetune": {"epochs": 2, "lr": 1e-3}},
    )
    reports = apply_recipe(model, recipe, StepContext(train_loader=_toy_loader()))
    achieved = reports[0]["sparsity"]
    assert achieved and all(abs(s - 0.875) < 1e-9 for s in achieved.values())
    w = model.blocks[0].attn.qkv.weight
    assert (w == 0).sum().item() == round(0.875 * w.numel())


@pytest.mark.parametrize("path", sorted(BUILTIN_RECIPES.glob("*.yaml")))
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.steps and recipe.name == path.stem
