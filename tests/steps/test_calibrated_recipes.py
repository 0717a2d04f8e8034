"""GPTQ and SparseGPT through recipes: what they store, reload and export, and how a bad option
is refused."""

import copy
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.ort import read_metadata
from vitcompress.pack import bytes_stored, load_packed, save_packed
from vitcompress.quantize import QuantLinear
from vitcompress.sparsity import get_masks, n_pruned
from vitcompress.steps.prune import PruneConfig, prune_
from vitcompress.steps.quantize import QuantizeConfig, quantize_
from vitcompress.steps.recipe import apply_recipe, compress_, parse_recipe
from vitcompress.steps.registry import StepContext, describe_structure

W4 = {"weights": "int4", "activations": None}


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, seed):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


CALIB = [(_images(8, s), torch.zeros(8)) for s in range(3)]


@pytest.fixture(scope="module")
def dense():
    from vitcompress.models import model_config

    torch.manual_seed(0)
    cfg = model_config("vit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4)
    return build_model(cfg).eval()


def _compressed(dense, *steps):
    m = copy.deepcopy(dense)
    compress_(m, {"name": "t", "steps": list(steps)}, calib_data=CALIB)
    return m.eval()


def _rel_error(model, dense, x):
    with torch.no_grad():
        ref = dense(x)
        return ((model(x) - ref).norm() / ref.norm()).item()


def test_gptq_int4_packs_as_small_as_rtn_and_reloads_to_the_same_logits(dense, tmp_path):
    rtn = _compressed(dense, {"quantize": W4})
    gptq = _compressed(dense, {"quantize": {**W4, "algorithm": "gptq"}})
    layers = [m for m in gptq.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * 4 + 1  # every Linear, the head too
    assert all(m.weight_derivation() is not None for m in layers)  # codes + scales, no floats
    assert bytes_stored(gptq) == bytes_stored(rtn)
    x = _images(16, 9)
    assert _rel_error(gptq, dense, x) < 0.7 * _rel_error(rtn, dense, x)
    save_packed(gptq, tmp_path / "m.vcz", {"compression": describe_structure(gptq)})
    loaded, _ = load_packed(tmp_path / "m.vcz")
    with torch.no_grad():
        assert torch.equal(loaded(x), gptq(x))


def test_gptq_per_group_with_static_activations_calibrates_them_afterwards(dense):
    m = _compressed(dense, {"quantize": {"weights": "int4", "activations": "int8",
                    "granularity": "per_group", "group_size": 16, "algorithm": "gptq",
                    "scales": "fp16", "rest": "fp16"}})  # fmt: skip
    for q in (m for m in m.modules() if isinstance(m, QuantLinear)):
        assert q.input_quant is not None and bool(q.input_quant.calibrated)
        assert q.weight_derivation() is not None
    assert _rel_error(m, dense, _images(16, 9)) < 0.2


def test_gptq_int8_exports_to_onnx(dense, tmp_path):
    pytest.importorskip("onnxruntime")
    from vitcompress.export import export_onnx

    m = _compressed(dense, {"quantize": {"weights": "int8", "activations": "int8",
                                         "algorithm": "gptq"}})  # fmt: skip
    path = export_onnx(m, tmp_path / "g.onnx", (1, 16, 16))
    meta = read_metadata(path)
    assert meta["vitcompress.format"] == "int8-qdq"
    assert json.loads(meta["vitcompress.check"])["sqnr_db"] >= 15  # agrees with onnxruntime


def test_sparsegpt_prunes_every_layer_to_exactly_the_asked_sparsity(dense):
    for pattern in ({"sparsity": 0.5}, {"sparsity": 0.75}, {"pattern": "2:4"}):
        m = copy.deepcopy(dense)
        recipe = parse_recipe(
            {"name": "s", "steps": [{"prune": {**pattern, "method": "sparsegpt"}}]}
        )
        reports = apply_recipe(m, recipe, StepContext(calib_loader=CALIB))
        masks = get_masks(m)
        assert sorted(masks) == sorted(reports[0]["sparsity"]) and len(masks) == 16
        for name, mask in masks.items():
            w = m.get_submodule(name).weight
            assert (w[~mask] == 0).all()
            if "sparsity" in pattern:
                assert int((~mask).sum()) == n_pruned(mask.numel(), pattern["sparsity"])
            else:
                assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
    mag = _compressed(dense, {"prune": {"pattern": "2:4"}})
    sgpt = _compressed(dense, {"prune": {"pattern": "2:4", "method": "sparsegpt"}})
    x = _images(16, 9)
    assert _rel_error(sgpt, dense, x) < _rel_error(mag, dense, x)


def test_sparsegpt_then_gptq_keeps_the_pattern_and_its_masks_survive_finetuning(dense):
    both = _compressed(
        dense,
        {"prune": {"pattern": "2:4", "method": "sparsegpt"}},
        {"quantize": {**W4, "algorithm": "gptq"}},
    )
    for blk in both.blocks:  # GPTQ left every pruned weight at zero
        for fc in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            w = fc.weight.detach()
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert bytes_stored(both) < bytes_stored(_compressed(dense, {"quantize": W4}))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 4, (32,)))
    m = copy.deepcopy(dense)
    recipe = parse_recipe({"name": "ft", "steps": [
        {"prune": {"sparsity": 0.5, "method": "sparsegpt"}},
        {"finetune": {"max_steps": 2, "lr": 1e-2}}]})  # fmt: skip
    ctx = StepContext(DataLoader(data, batch_size=16), CALIB)
    apply_recipe(m, recipe, ctx)
    for name, mask in get_masks(m).items():
        assert (m.get_submodule(name).weight[~mask] == 0).all()
        assert int((~mask).sum()) == n_pruned(mask.numel(), 0.5)


def test_new_options_leave_older_recipe_hashes_alone():
    rtn = parse_recipe({"name": "r", "steps": [{"quantize": W4}]})
    assert "algorithm" not in rtn.to_dict()["steps"][0]["quantize"]
    gptq = parse_recipe({"name": "r", "steps": [{"quantize": {**W4, "algorithm": "gptq"}}]})
    q = gptq.to_dict()["steps"][0]["quantize"]
    assert (q["algorithm"], q["damp"], q["act_order"], q["block_size"]) == ("gptq", 0.01, True, 128)
    assert gptq.hash != rtn.hash and gptq.needs_calibration() and not rtn.needs_calibration()
    mag = parse_recipe({"name": "p", "steps": [{"prune": {"sparsity": 0.5}}]})
    assert "damp" not in mag.to_dict()["steps"][0]["prune"]
    sgpt = parse_recipe({"name": "p", "steps": [{"prune": {"sparsity": 0.5,
                                                           "method": "sparsegpt"}}]})  # fmt: skip
    p = sgpt.to_dict()["steps"][0]["prune"]
    assert (p["damp"], p["block_size"], p["calib_batches"]) == (0.01, 128, 8)
    assert sgpt.needs_calibration()


G = {"algorithm": "gptq"}
SG = {"sparsity": 0.5, "method": "sparsegpt"}


@pytest.mark.parametrize(
    "step,match",
    [
        ({"quantize": {**G, "damp": 0}}, r"quantize.damp = 0: expected a number > 0"),
        ({"quantize": {**G, "damp": -0.1}}, r"quantize.damp = -0.1"),
        ({"quantize": {**G, "block_size": 0}}, r"quantize.block_size = 0"),
        ({"quantize": {**G, "act_order": "yes"}}, r"quantize.act_order"),
        ({"quantize": {"algorithm": "awq"}}, r"quantize.algorithm = 'awq': expected one of rtn"),
        ({"quantize": {"damp": 0.1}}, r"quantize.damp only applies to algorithm: gptq"),
        ({"prune": {**SG, "schedule": "cubic"}}, r"'sparsegpt' prunes one shot; use schedule"),
        ({"prune": {**SG, "scope": "global"}}, r"use scope 'layer'"),
        ({"prune": {**SG, "damp": 0}}, r"prune.damp = 0"),
        ({"prune": {**SG, "calib_batches": 0}}, r"prune.calib_batches must be an integer >= 1"),
        ({"prune": {"sparsity": 0.5, "block_size": 64}}, r"block_size only applies to method"),
        ({"prune": {"sparsity": 0.5, "method": "obs"}}, r"'magnitude', 'wanda' or 'sparsegpt'"),
    ],
)
def test_bad_options_are_one_line_errors(step, match):
    with pytest.raises(VitcompressError, match=match) as e:
        parse_recipe({"name": "bad", "steps": [step]})
    assert "\n" not in str(e.value)


def test_calibrated_methods_without_calibration_data_are_refused_before_any_work(dense):
    m = copy.deepcopy(dense)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(VitcompressError, match="calibrates: pass calib_data"):
        compress_(m, {"name": "g", "steps": [{"quantize": {**W4, "algorithm": "gptq"}}]})
    with pytest.raises(VitcompressError, match="algorithm gptq needs calib_data") as e:
        quantize_(m, QuantizeConfig(**W4, algorithm="gptq"))
    assert "\n" not in str(e.value)
    with pytest.raises(VitcompressError, match="'sparsegpt' needs calibration data"):
        prune_(m, PruneConfig(sparsity=0.5, method="sparsegpt"))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_gptq_with_static_activations_reads_a_one_shot_iterator_once(dense):
    m = copy.deepcopy(dense)
    config = QuantizeConfig(weights="int4", activations="int8", algorithm="gptq")
    quantize_(m, config, iter(CALIB))  # Hessians and activation ranges from the same batches
    ref = copy.deepcopy(dense)
    quantize_(ref, config, CALIB)
    x = _images(4, 9)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
