"""The command line as a user meets it: real data, real runs, one-line errors."""

import argparse
import json
from pathlib import Path

import pytest

from vitcompress.cli import build_parser, main
from vitcompress.export import EXPORT_FORMATS
from vitcompress.ort import read_metadata

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_file(), reason="dataset-fashion-mnist missing")


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_models_json_lists_study_counts(capsys):
    assert main(["models", "--img-size", "224", "--patch", "16", "--classes", "45", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert round(rows["vit-small"]["params"] / 1e6, 1) == 21.7
    assert rows["deit-base"]["gflops"] > rows["deit-small"]["gflops"] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """vit-nano trained for two epochs on 6,000 real Fashion-MNIST images."""
    if not FMNIST.is_file():
        pytest.skip("dataset-fashion-mnist missing")
    out = tmp_path_factory.mktemp("runs") / "nano"
    args = ["train", "--model", "vit-nano", "--epochs", "2", "--limit", "6000", "--out", str(out)]
    assert main(args + ["--lr", "3e-3", "--warmup-epochs", "0.2", "--no-augment"]) == 0
    return out


@needs_fmnist
def test_trained_model_learns_real_data(trained, capsys):
    metrics = json.loads((trained / "metrics.json").read_text())
    # 10 classes: chance is 10 %; two short epochs on 6k images already give far more
    assert metrics["top1"] > 0.4, metrics["top1"]
    assert metrics["params_total"] == metrics["params_nonzero"]
    config = json.loads((trained / "config.json").read_text())
    assert config["data"]["classes"][0] == "T-shirt/top"
    assert config["model"]["in_chans"] == 1 and config["model"]["img_size"] == 28
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["top1"] == pytest.approx(metrics["top1"])


@needs_fmnist
def test_init_from_starts_at_the_trained_weights(trained, tmp_path, capsys):
    # at lr 1e-6 one epoch barely moves the weights: the accuracy is the starting point's
    common = ["--epochs", "1", "--limit", "1000", "--lr", "1e-6", "--no-augment"]
    out = tmp_path / "cont"
    assert main(["train", "--model", "vit-nano", "--out", str(out), *common,
                 "--init-from", str(trained)]) == 0  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["top1"] > 0.4
    assert json.loads((out / "config.json").read_text())["init_from"] == str(trained)
    fresh = tmp_path / "fresh"
    assert main(["train", "--model", "vit-nano", "--out", str(fresh), *common]) == 0
    assert json.loads((fresh / "metrics.json").read_text())["top1"] < 0.3
    capsys.readouterr()
    bad = ["train", "--model", "vit-micro", "--out", str(tmp_path / "bad"), "--init-from"]
    assert main([*bad, str(trained), *common]) == 2
    line = _err_line(capsys)  # the architecture is the run's: another preset is a contradiction
    assert "--model vit-micro, but --init-from" in line and "holds a vit-nano" in line


@needs_fmnist
def test_training_refuses_to_overwrite_a_finished_run(trained, capsys):
    assert main(["train", "--model", "vit-nano", "--out", str(trained)]) == 2
    assert "already holds a finished run" in _err_line(capsys)
    assert main(["train", "--model", "vit-nano", "--out", str(trained), "--resume"]) == 2
    assert "finished run" in _err_line(capsys)


def test_evaluate_missing_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not found" in _err_line(capsys)


@needs_fmnist
def test_evaluate_corrupt_weights(trained, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file at all")
    assert main(["evaluate", "--checkpoint", str(broken)]) == 2
    assert "corrupt safetensors file" in _err_line(capsys)


def test_unknown_model_and_data(tmp_path, capsys):
    assert main(["train", "--model", "vit-huge", "--out", str(tmp_path / "a")]) == 2
    assert "unknown model" in _err_line(capsys)
    args = ["train", "--model", "vit-nano", "--data", "mnist", "--out", str(tmp_path / "b")]
    assert main(args) == 2
    assert "unknown data spec" in _err_line(capsys)
    assert not (tmp_path / "b").exists()


@needs_fmnist
def test_compress_rejects_a_bad_recipe_before_any_work(trained, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: bad\nsteps:\n  - prune: {sparsity: 0.5, layers: 'blocks.*.mlp.fc9'}\n")
    out = tmp_path / "out"
    args = ["compress", "--checkpoint", str(trained), "--recipe", str(recipe), "--out", str(out)]
    assert main(args) == 2
    assert "fc9" in _err_line(capsys)
    assert not out.exists()


@needs_fmnist
def test_compress_2of4_int8_end_to_end(trained, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: 2of4-int8\nsteps:\n"
        "  - prune: {pattern: '2:4', layers: 'blocks.*'}\n"
        "  - finetune: {epochs: 1, lr: 1.0e-4, max_steps: 10, distill: {teacher: self}}\n"
        "  - quantize: {weights: int8, activations: int8, calibration: {batches: 2}}\n"
    )
    out = tmp_path / "c"
    args = ["compress", "--checkpoint", str(trained), "--recipe", str(recipe), "--out", str(out)]
    assert main(args + ["--limit", "1000", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    # half the pruned weights are zero; int8 rounding may zero a few tiny survivors too
    assert 0.5 <= m["sparsity"] < 0.51 and m["pattern"] == "2:4" and m["format"] == "int8"
    assert m["runtime"] == "torch-int8" and m["latency_ms_b1"] > 0
    assert m["bytes_stored"] < m["bytes_fp32"] / 3
    assert m["params_nonzero"] < 0.6 * m["params_total"]
    # the run directory reloads into the same model: same accuracy on the same images
    assert main(["evaluate", "--checkpoint", str(out), "--limit", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(m["top1"])
    # ... and exports for onnxruntime with its fused attention kernel
    onnx_path = tmp_path / "c.onnx"
    assert main(["export", "--checkpoint", str(out), "--format", "onnx", "--fused-attention",
                 "--out", str(onnx_path)]) == 0  # fmt: skip
    meta = read_metadata(onnx_path)
    assert meta["vitcompress.format"] == "int8-qdq"
    assert meta["vitcompress.attention"] == "com.microsoft.MultiHeadAttention"


def test_export_offers_every_export_format():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    fmt = next(a for a in sub.choices["export"]._actions if a.dest == "format")
    assert tuple(fmt.choices) == EXPORT_FORMATS
