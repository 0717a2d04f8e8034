import json

import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.runs import CONFIG, WEIGHTS, load_run, save_run


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
