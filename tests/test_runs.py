import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.pack import bytes_stored, load_packed
from vitcompress.runs import CONFIG, PACKED, WEIGHTS, load_run, save_run, save_weights
from vitcompress.steps.prune import PruneConfig, prune_
from vitcompress.steps.quantize import QuantizeConfig, quantize_
from vitcompress.steps.registry import describe_structure


def _saved(tmp_path, cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_run(tmp_path, model, {"model": cfg}, {"top1": 0.5})
    return model


def test_round_trip_gives_identical_logits(tmp_path, tiny_vit_cfg):
    model = _saved(tmp_path, tiny_vit_cfg)
    loaded, config = load_run(tmp_path)
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(model(x), loaded(x))
    assert config["model"] == tiny_vit_cfg
    assert "torch" in config["versions"]
    assert not list(tmp_path.glob("*.tmp")), "no temporary files are left behind"


def test_missing_directory_and_missing_weights(tmp_path, tiny_vit_cfg):
    with pytest.raises(VitcompressError, match="not found"):
        load_run(tmp_path / "nope")
    _saved(tmp_path, tiny_vit_cfg)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(VitcompressError, match="missing file: .*model.safetensors"):
        load_run(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_is_one_line(tmp_path, tiny_vit_cfg, damage):
    _saved(tmp_path, tiny_vit_cfg)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64 + data[64:])
    else:
        path.write_bytes(b"")
    with pytest.raises(VitcompressError, match="corrupt safetensors file") as e:
        load_run(tmp_path)
    assert "\n" not in str(e.value)


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_vit_cfg):
    _saved(tmp_path, tiny_vit_cfg)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    cfg["model"]["num_classes"] = 7  # config now disagrees with the stored head
    (tmp_path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(VitcompressError, match=r"shape mismatch for 'head.weight'.*\(4, 64\)"):
        load_run(tmp_path)


def test_corrupt_config_json(tmp_path, tiny_vit_cfg):
    _saved(tmp_path, tiny_vit_cfg)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(VitcompressError, match="corrupt JSON"):
        load_run(tmp_path)


DATA = Path(__file__).parent / "data"


def test_a_compressed_run_is_stored_packed_and_occupies_its_bytes_stored(tmp_path, tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    quantize_(model, QuantizeConfig(rest="int8", scales="fp16"), [torch.randn(4, 1, 16, 16)])
    save_run(tmp_path, model, {"model": tiny_vit_cfg}, {"top1": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, "metrics.json", PACKED]
    weights = (tmp_path / PACKED).stat().st_size
    config = json.loads((tmp_path / CONFIG).read_text())
    assert weights == bytes_stored(model, config)
    json_bytes = (tmp_path / CONFIG).stat().st_size + (tmp_path / "metrics.json").stat().st_size
    du = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert (
        du == weights + json_bytes and weights < 4 * sum(p.numel() for p in model.parameters()) / 3
    )
    assert config["compression"] == describe_structure(model)  # the packed file's records
    loaded, _ = load_run(tmp_path)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # saved again as a dense model, the packed file goes: one set of weights per directory
    save_run(tmp_path, build_model(tiny_vit_cfg), {"model": tiny_vit_cfg}, {})
    assert (tmp_path / WEIGHTS).is_file() and not (tmp_path / PACKED).exists()


@pytest.mark.parametrize("kind", ["shrink-lowrank-2of4-int8", "masks-fp8-int8matmul"])
def test_packed_files_of_format_2_still_load(kind):
    """Files written before the step registry (vitcompress 0.1.0, format 2: a structure dict
    beside the config) rebuild the same model: identical logits to the ones saved with them."""
    model, config = load_packed(DATA / f"v2-{kind}.packed")
    ref = load_file(DATA / "v2-logits.safetensors")
    with torch.no_grad():
        assert torch.equal(model(ref["input"]), ref[kind])
    assert "0.1.0" in config["note"]


def test_a_compressed_run_from_before_the_registry_still_loads(tmp_path, tiny_vit_cfg):
    """Its config.json lists what each step did ({"kind": "quantize", "config": ...}) and its
    weights are a plain safetensors file: the quantize step replays the config."""
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    prune_(model, PruneConfig(pattern="2:4"))
    qcfg = {"weights": "int8", "activations": "int8", "ignore": ["head"]}
    quantize_(model, QuantizeConfig(**qcfg), [torch.randn(4, 1, 16, 16)])
    legacy = [
        {"kind": "prune", "layers": ["blocks.0.attn.qkv"]},
        {"kind": "quantize", "config": qcfg},
    ]
    tmp_path.mkdir(exist_ok=True)
    save_weights(model, tmp_path / WEIGHTS)
    (tmp_path / CONFIG).write_text(json.dumps({"model": tiny_vit_cfg, "compression": legacy}))
    (tmp_path / "metrics.json").write_text("{}")
    loaded, _ = load_run(tmp_path)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
