"""The calibration-aware outlier techniques through recipes on a tiny ViT: whitened low rank,
SmoothQuant, and the log2 / twin activation grids run, pack, reload with identical logits, keep
older recipe hashes, refuse what cannot be exported, and refuse bad options in one line."""

import copy

import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.export import export_onnx
from vitcompress.lowrank import LowRankLinear
from vitcompress.models import build_model
from vitcompress.pack import load_packed, save_packed
from vitcompress.quant_grids import Log2Quantizer, TwinUniformQuantizer
from vitcompress.steps.quantize import QuantizeConfig, quantize_
from vitcompress.steps.recipe import apply_recipe, parse_recipe, runtime_of
from vitcompress.steps.registry import StepContext

CALIB = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
X = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(7))

W6A6 = {"weights": "int6", "activations": "int6"}
W4A8 = {"weights": "int4", "activations": "int8"}
GRIDS = {"gelu_quant": "twin"}
CASES = {
    "w6a6": [{"quantize": W6A6}],
    "w6a6+smooth+grids": [{"smooth": {}}, {"quantize": {**W6A6, **GRIDS,
                          "attention_matmul": "int6", "softmax_quant": "log2"}}],
    "w4a8": [{"quantize": {**W4A8, "attention_matmul": "int8"}}],
    "w4a8+smooth+twin": [{"smooth": {"alpha": 0.7}}, {"quantize": {**W4A8, **GRIDS,
                         "attention_matmul": "int8", "softmax_quant": "twin"}}],
    "whitened+smooth+w8a8": [{"lowrank": {"rank_ratio": 0.5, "method": "whitened",
                                          "layers": "blocks.*.mlp.*"}},
                             {"smooth": {}}, {"quantize": {**GRIDS}}],
}  # fmt: skip


def compressed(cfg: dict, steps: list) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    apply_recipe(
        model, parse_recipe({"name": "r", "steps": steps}), StepContext(calib_loader=CALIB)
    )
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_recipes_run_pack_and_reload_with_identical_logits(case, tiny_vit_cfg, tmp_path):
    model = compressed(tiny_vit_cfg, CASES[case])
    save_packed(model, tmp_path / "m.packed", {"model": tiny_vit_cfg})
    again, _ = load_packed(tmp_path / "m.packed")
    with torch.no_grad():
        y = model(X)
        assert torch.equal(again.eval()(X), y)
    assert bool(torch.isfinite(y).all())
    grids = {type(m) for m in again.modules()} & {Log2Quantizer, TwinUniformQuantizer}
    want = set()
    if "grids" in case or "twin" in case or "whitened" in case:
        want.add(TwinUniformQuantizer)
    if case == "w6a6+smooth+grids":
        want.add(Log2Quantizer)
    assert grids == want
    if "whitened" in case:
        assert isinstance(again.blocks[0].mlp.fc2, LowRankLinear)


def layer_sqnr(cfg: dict, steps: list, layer: str) -> float:
    """SQNR (dB) of ``layer``'s output after ``steps`` against the float model, on a ViT with
    LayerNorm outlier channels; only ``layer`` is quantised, in block 0, so both see the same
    input up to the layer's own quantizers."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.norm1.weight[[3, 17]] *= 30.0
            block.norm2.weight[[5, 40]] *= 30.0
    dense = copy.deepcopy(model)
    steps = [{k: {**v, "targets": layer} if k == "quantize" else v for k, v in s.items()}
             for s in steps]  # fmt: skip
    apply_recipe(
        model, parse_recipe({"name": "r", "steps": steps}), StepContext(calib_loader=CALIB)
    )
    outs = []
    for m in (dense, model):
        h = m.get_submodule(layer).register_forward_hook(lambda mod, i, o: outs.append(o))
        with torch.no_grad():
            m(X)
        h.remove()
    return float(20 * torch.log10(outs[0].norm() / (outs[1] - outs[0]).norm()))


# dB gained at least by smoothing qkv and by a twin grid on fc2's input: with 4-bit weights
# the weights dominate fc2's error, so there the twin grid must only not hurt
@pytest.mark.parametrize("quantize,smooth_gain,twin_gain", [(W6A6, 6, 3), (W4A8, 3, 0)])
def test_smooth_and_twin_lower_the_quantisation_error_where_they_act(
    quantize, smooth_gain, twin_gain, tiny_vit_cfg
):
    qkv = "blocks.0.attn.qkv"
    plain = layer_sqnr(tiny_vit_cfg, [{"quantize": quantize}], qkv)
    smooth = layer_sqnr(tiny_vit_cfg, [{"smooth": {}}, {"quantize": quantize}], qkv)
    assert smooth > plain + smooth_gain  # the outlier channels no longer set the scale
    fc2 = "blocks.0.mlp.fc2"
    plain = layer_sqnr(tiny_vit_cfg, [{"quantize": quantize}], fc2)
    twin = layer_sqnr(tiny_vit_cfg, [{"quantize": {**quantize, **GRIDS}}], fc2)
    assert twin > plain + twin_gain


def test_whitened_lowrank_exports_like_plain_svd(tiny_vit_cfg, tmp_path):
    model = compressed(tiny_vit_cfg, [{"lowrank": {"rank_ratio": 0.5, "method": "whitened"}}])
    path = export_onnx(model, tmp_path / "w.onnx", (1, 16, 16))  # checked with onnxruntime
    assert path.exists()


@pytest.mark.parametrize("grid", ["softmax_quant", "gelu_quant"])
def test_grids_are_emulated_export_refuses_them_in_one_line(grid, tiny_vit_cfg, tmp_path):
    q = {"weights": "int8", "activations": "int8", grid: "twin"}
    if grid == "softmax_quant":
        q["attention_matmul"] = "int8"
    recipe = parse_recipe({"name": "r", "steps": [{"quantize": q}]})
    model = compressed(tiny_vit_cfg, [{"quantize": q}])
    with pytest.raises(VitcompressError, match="twin grid, which has no ONNX QDQ form") as e:
        export_onnx(model, tmp_path / "x.onnx", (1, 16, 16))
    assert "\n" not in str(e.value)
    assert runtime_of(model, recipe)[1] == "emulated"  # no integer kernel for a twin grid


# Resolved recipes hash as before while the new options hold their defaults
def test_new_options_at_their_defaults_keep_recipe_hashes():
    lowrank = {"name": "lowrank", "steps": [{"lowrank": {"rank_ratio": 0.5}}]}
    int8 = {"name": "int8", "steps": [{"quantize": {"weights": "int8", "activations": "int8",
            "granularity": "per_channel",
            "calibration": {"method": "percentile", "batches": 4}}}]}  # fmt: skip
    assert parse_recipe(lowrank).hash == "0ef252d0b1a9"  # pinned in test_registry
    assert parse_recipe(int8).hash == "440b88253d4e"
    explicit = copy.deepcopy(lowrank)
    explicit["steps"][0]["lowrank"].update(method="svd", batches=8)
    assert parse_recipe(explicit).hash == "0ef252d0b1a9"
    explicit = copy.deepcopy(int8)
    explicit["steps"][0]["quantize"].update(softmax_quant="uniform", gelu_quant="uniform")
    assert parse_recipe(explicit).hash == "440b88253d4e"
    whitened = copy.deepcopy(lowrank)
    whitened["steps"][0]["lowrank"]["method"] = "whitened"
    recipe = parse_recipe(whitened)
    assert recipe.hash != "0ef252d0b1a9" and recipe.needs_calibration()
    assert recipe.to_dict()["steps"][0]["lowrank"]["method"] == "whitened"


@pytest.mark.parametrize(
    "quantize,match",
    [
        ({"softmax_quant": "log3"}, "quantize.softmax_quant = 'log3': expected one of uniform"),
        ({"gelu_quant": "log2"}, "quantize.gelu_quant = 'log2': expected one of uniform, twin"),
        ({"softmax_quant": "log2"}, "needs an integer attention_matmul format .* got 'fp32'"),
        ({"softmax_quant": "twin", "attention_matmul": "fp8_e4m3"}, "integer attention_matmul"),
        ({"gelu_quant": "twin", "activations": None}, "needs an integer activations format"),
        ({"gelu_quant": "twin", "dynamic": True}, "calibrated grid; it needs dynamic: false"),
        ({"gelu_quant": "twin", "activations": "int9x"}, "quantize.activations"),
    ],
)
def test_bad_grid_options_are_one_line_errors(quantize, match):
    with pytest.raises(VitcompressError, match=match) as e:
        parse_recipe({"name": "r", "steps": [{"quantize": quantize}]})
    assert "\n" not in str(e.value) and str(e.value).startswith("step 1 (quantize): ")


def test_a_grid_with_nothing_to_replace_is_an_error_before_any_change(tiny_vit_cfg):
    model = build_model(tiny_vit_cfg).eval()
    before = copy.deepcopy(model)
    q = QuantizeConfig(gelu_quant="twin", ignore="*.fc2")
    with pytest.raises(VitcompressError, match="no quantised mlp.fc2 Linear matches the targets"):
        quantize_(model, q, CALIB)
    q = QuantizeConfig(softmax_quant="log2", attention_matmul="int8", ignore="*.av_matmul")
    with pytest.raises(VitcompressError, match="no quantised attention A.V MatMul matches"):
        quantize_(model, q, CALIB)
    assert str(model) == str(before)  # nothing was replaced
    with pytest.raises(VitcompressError, match="lowrank.method must be one of"):
        parse_recipe({"name": "r", "steps": [{"lowrank": {"rank": 2, "method": "asvd"}}]})
