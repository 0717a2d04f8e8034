import itertools

import pytest
import torch

from vitcompress.allocate import (
    CANDIDATES,
    Choice,
    allocate,
    allocation_recipe,
    choose,
    parse_budget,
)
from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.pack import bytes_stored
from vitcompress.steps.recipe import compress_, parse_recipe


def test_budgets_parse_as_sizes_bops_or_reductions():
    assert parse_budget("8x", "bytes", 800_000) == 100_000
    assert parse_budget("150KB", "bytes", 1) == 150 * 1024
    assert parse_budget("2.5G", "bops", 1) == 2.5e9
    assert parse_budget(1234, "bytes", 1) == 1234.0
    for bad in ("eight", "-3x", "5 parsecs"):
        with pytest.raises(VitcompressError, match="budget"):
            parse_budget(bad, "bytes", 1)


def test_choose_is_the_exact_knapsack_optimum():
    """Against brute force over every assignment of 4 layers x 3 settings."""
    g = torch.Generator().manual_seed(0)
    layers = [f"l{i}" for i in range(4)]
    table = []
    for n in layers:
        for k, cand in enumerate(("a", "b", "c")):
            saving = 0.0 if k == 0 else float(torch.randint(10, 100, (1,), generator=g))
            damage = 0.0 if k == 0 else float(torch.rand(1, generator=g)) * saving / 50
            table.append(Choice(n, cand, damage, -saving))
    by = {(c.layer, c.candidate): c for c in table}
    for budget in (-50.0, -120.0, -200.0):
        got = choose(table, budget, resolution=10_000)
        best = min(
            (sum(by[(n, k)].damage for n, k in zip(layers, combo, strict=True)), combo)
            for combo in itertools.product("abc", repeat=4)
            if sum(by[(n, k)].cost for n, k in zip(layers, combo, strict=True)) <= budget
        )
        got_damage = sum(by[(n, k)].damage for n, k in got.items())
        assert sum(by[(n, k)].cost for n, k in got.items()) <= budget
        assert got_damage == pytest.approx(best[0], abs=1e-9)
    with pytest.raises(VitcompressError, match="cannot be met"):
        choose(table, -10_000.0)


def test_allocation_meets_its_budget_and_writes_a_recipe_that_does(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 1, 16, 16, generator=g) for _ in range(2)]
    config = {"model": tiny_vit_cfg}
    dense = bytes_stored(model, config)
    allocs = {}
    cands = {k: CANDIDATES[k] for k in ("fp32", "int8", "int4", "2:4+int8")}
    for budget in ("4x", "5x"):
        a = allocate(model, calib, config, (1, 16, 16), budget, batches=2, candidates=cands)
        allocs[budget] = a
        recipe = allocation_recipe(a, f"alloc-{budget}", cands)
        parse_recipe(recipe)
        compressed = build_model(tiny_vit_cfg).eval()
        compressed.load_state_dict(model.state_dict())
        compress_(compressed, recipe, calib_data=calib)
        size = bytes_stored(compressed, config)
        assert size <= a.budget, (budget, size, a.budget)  # the recipe keeps the promise
        assert dense / size >= float(budget[:-1])
        assert a.predicted_cost == size  # the allocation measured its recipe's real size
    assert allocs["5x"].predicted_damage >= allocs["4x"].predicted_damage  # tighter: worse
    assert set(allocs["5x"].assignment) == {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def test_several_quantize_steps_give_layers_different_formats(tiny_vit_cfg):
    model = build_model(tiny_vit_cfg).eval()
    recipe = parse_recipe({"name": "mixed", "steps": [
        {"quantize": {"weights": "int4", "activations": None, "layers": "blocks.*.mlp.*"}},
        {"quantize": {"weights": "int8", "activations": None}},
    ]})  # fmt: skip
    compress_(model, recipe)
    assert model.blocks[0].mlp.fc1.weight_format.name == "int4"
    assert model.blocks[0].attn.qkv.weight_format.name == "int8"
    with pytest.raises(VitcompressError, match="quantize must be the last step"):
        parse_recipe({"name": "r", "steps": [{"quantize": {}}, {"prune": {"pattern": "2:4"}}]})


def test_the_run_compress_writes_from_an_allocated_recipe_fits_the_budget(tmp_path):
    """The packed file's header holds the run's config (recipe, base checkpoint, versions): the
    allocator budgets the file compress really writes, not the weights alone."""
    from tests.test_workflows import _folder
    from vitcompress.runs import PACKED
    from vitcompress.train import TrainConfig
    from vitcompress.workflows import allocate_run, compress_run, train_run

    cfg = TrainConfig(epochs=1, batch_size=8, lr=3e-3, warmup_epochs=0.0, augment="none",
                      img_size=16, patch_size=4)  # fmt: skip
    base = tmp_path / "base"
    train_run("vit-nano", _folder(tmp_path / "images"), base, cfg, channels=1)
    for budget in ("5x", "7x"):
        res = allocate_run(base, budget, tmp_path / f"{budget}.yaml", batches=1)
        m = compress_run(base, tmp_path / f"{budget}.yaml", tmp_path / f"run-{budget}", speed=False)
        assert m["bytes_stored"] == (tmp_path / f"run-{budget}" / PACKED).stat().st_size
        assert m["bytes_stored"] <= res["budget"], (budget, m["bytes_stored"], res["budget"])
        assert m["bytes_stored"] == res["predicted"]  # the allocator measured that very file
