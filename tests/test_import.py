"""Bring your own ViT, through the command line: `import`, then every command on the run.

transformers is the reference: a random-weight model is saved with `save_pretrained`,
imported, exported to ONNX and run in onnxruntime; its logits must equal transformers' own.
"""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vitcompress.cli import main
from vitcompress.ort import ort_session, read_metadata

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             image_size=16, patch_size=4, num_channels=3, num_labels=5)  # fmt: skip
CASES = {
    "vit": ("ViT", {}),
    "vit-gray-no-qkv-bias-tanh": (
        "ViT", dict(num_channels=1, qkv_bias=False, hidden_act="gelu_pytorch_tanh")
    ),
    "deit-with-teacher": ("DeiTWithTeacher", dict(image_size=24, layer_norm_eps=1e-3)),
    "deit-without-teacher": ("DeiT", dict(intermediate_size=72)),
}  # fmt: skip


def _hf(kind, seed=0, **overrides):
    cfg_cls = transformers.ViTConfig if kind == "ViT" else transformers.DeiTConfig
    model_cls = {
        "ViT": transformers.ViTForImageClassification,
        "DeiT": transformers.DeiTForImageClassification,
        "DeiTWithTeacher": transformers.DeiTForImageClassificationWithTeacher,
    }[kind]
    cfg = cfg_cls(**{**SMALL, **overrides})
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor random: a dropped or swapped one shows in the logits
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(
                1 + 0.2 * noise if "layernorm" in name and name.endswith("weight") else noise / 5
            )
    return model


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("case", list(CASES))
def test_import_then_onnx_export_gives_transformers_logits(case, tmp_path, capsys):
    kind, overrides = CASES[case]
    hf = _hf(kind, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    run, onnx_path = tmp_path / "run", tmp_path / "m.onnx"
    assert main(["import", str(tmp_path / "hf"), "--out", str(run)]) == 0
    assert (
        main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(onnx_path)]) == 0
    )
    c = hf.config
    x = torch.randn(5, c.num_channels, c.image_size, c.image_size,
                    generator=torch.Generator().manual_seed(3))  # fmt: skip
    with torch.no_grad():
        ref = hf(pixel_values=x).logits.numpy()
    out = ort_session(onnx_path).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4
    config = json.loads((run / "config.json").read_text())
    assert config["source"]["kind"] == "hf" and config["classes"] == [
        c.id2label[i] for i in range(5)
    ]  # fmt: skip
    assert config["preprocess"]["mean"] == [0.5] * c.num_channels  # transformers' ViT default
    assert json.loads(read_metadata(onnx_path)["classes"]) == config["classes"]


def _folder(root, classes, n=10, size=20):
    """Classes a small ViT can tell apart: flat images of one brightness each, noisy."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            base = 40 + 170 * c / max(1, len(classes) - 1)
            arr = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return f"imagefolder:{root}"


def test_an_imported_model_transfers_to_new_data_then_compresses_exports_and_benches(
    tmp_path, capsys
):
    """A 5-class, 16 px, 3-channel HF ViT fine-tuned on a 3-class folder at 32 px: new head,
    resampled position embedding; then int8 and 2:4, export and bench on the result."""
    hf = _hf("ViT")
    hf.save_pretrained(tmp_path / "hf")
    run = tmp_path / "imported"
    assert main(["import", str(tmp_path / "hf"), "--out", str(run)]) == 0
    data = _folder(tmp_path / "images", ["dark", "grey", "light"])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run)]) == 2
    assert "has no data of its own" in _err(capsys)
    assert main(["evaluate", "--checkpoint", str(run), "--data", data]) == 2
    assert "3 classes, the model 5" in _err(capsys)
    ft = tmp_path / "ft"
    args = ["train", "--init-from", str(run), "--data", data, "--img-size", "32", "--epochs",
            "6", "--lr", "3e-3", "--batch-size", "8", "--warmup-epochs", "0",
            "--out", str(ft)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    metrics = json.loads((ft / "metrics.json").read_text())
    config = json.loads((ft / "config.json").read_text())
    assert config["model"]["num_classes"] == 3 and config["model"]["img_size"] == 32
    assert config["source"]["kind"] == "hf" and config["preprocess"]["mean"] == [0.5] * 3
    assert metrics["top1"] == 1.0  # three brightness levels, learnt
    for recipe, smaller in (("int8-smallest", 3.5), ("2of4-int8", 2.5)):
        out = tmp_path / recipe
        args = ["compress", "--checkpoint", str(ft), "--recipe", recipe, "--out", str(out)]
        assert main([*args, "--no-speed", "--json"]) == 0
        m = json.loads(capsys.readouterr().out)
        assert m["top1"] >= 0.8 and m["bytes_stored"] < m["bytes_fp32"] / smaller
        assert (out / "model.packed").is_file()
    onnx_path = tmp_path / "q.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "int8-smallest"), "--format", "onnx",
                 "--out", str(onnx_path)]) == 0  # fmt: skip
    assert read_metadata(onnx_path)["vitcompress.format"] == "int8-qdq"
    capsys.readouterr()
    assert main(["bench", "--checkpoint", str(ft), "--variants", "torch-fp32,ort-int8-qdq",
                 "--passes", "1", "--threads", "1", "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in rows] == ["torch-fp32", "ort-int8-qdq"]


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_bad_imports_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf = _hf("ViT")
    hf.save_pretrained(tmp_path / "hf")
    cases = {}
    # an architecture we do not model
    (tmp_path / "swin").mkdir()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "swin" / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["SwinForImageClassification"], "model_type": "swin"})
    )
    cases["swin"] = "SwinForImageClassification"
    # a weight missing, and a weight of the wrong shape
    from safetensors.torch import load_file, save_file

    for name, edit in (("missing", "drop"), ("shape", "grow")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        state = load_file(tmp_path / "hf" / "model.safetensors")
        key = next(k for k in state if k.endswith("intermediate.dense.weight"))
        if edit == "drop":
            del state[key]
        else:
            state[key] = torch.zeros(65, 32)
        save_file(state, d / "model.safetensors")
        cases[name] = "missing" if edit == "drop" else "shape"
    # a pickle that would run code when loaded
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": _Boom()}))
    cases["evil.pth"] = "a pickle of more than tensors, which is refused"
    torch.save({"model": _Boom()}, tmp_path / "evil2.pth")
    cases["evil2.pth"] = "refused to unpickle posix.system"
    cases["nowhere"] = "not found"
    capsys.readouterr()  # transformers' progress bars
    for src, match in cases.items():
        out = tmp_path / f"out-{src}"
        argv = ["import", str(tmp_path / src), "--out", str(out)]
        if src.startswith("evil"):
            argv += ["--model", "vit-nano"]
        assert main(argv) == 2, src
        assert match in _err(capsys), src
        assert not out.exists(), src
    assert not (tmp_path / "pwned").exists()


def test_a_study_on_an_imported_model_fine_tunes_it_once_then_compresses(tmp_path, capsys):
    """Study A on the user's own ViT and image folder is one command: `models: {from: RUN,
    finetune: {...}}` fine-tunes the imported model on the study's data, then every recipe runs
    on that baseline; `{from: RUN}` alone uses a run as it is."""
    import yaml

    from vitcompress.studies import expand_study, read_results

    hf = _hf("ViT")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "mine")]) == 0
    data = _folder(tmp_path / "images", ["dark", "grey", "light"])
    study = {
        "name": "mine",
        "data": data,
        "speed": False,
        "models": {
            "mine": {
                "from": str(tmp_path / "mine"),
                "finetune": {"epochs": 4, "lr": 3e-3, "img_size": 32, "batch_size": 8},
            },
        },  # fmt: skip
        "recipes": [
            {
                "name": "$fmt",
                "grid": {"fmt": ["fp16", "int8"]},
                "steps": [{"quantize": {"weights": "$fmt", "activations": "$fmt"}}],
            },
        ],  # fmt: skip
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    st = expand_study(str(path))
    (base,) = st.baselines.values()
    assert base.init_from == str(tmp_path / "mine") and base.train["img_size"] == 32
    capsys.readouterr()
    assert main(["sweep", "--study", str(path), "--out", str(tmp_path / "out")]) == 0
    rows = {r["recipe"]: r for r in read_results(tmp_path / "out")}
    assert set(rows) == {"fp16", "int8"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["fp16"]["top1"] == 1.0 and rows["int8"]["top1"] >= 0.8
    ft_config = json.loads((base.directory(tmp_path / "out") / "config.json").read_text())
    assert ft_config["init_from"] == str(tmp_path / "mine")
    assert ft_config["model"]["num_classes"] == 3 and ft_config["model"]["img_size"] == 32
    # the same model used as it is: no fine-tune, so its 5 classes do not fit this data
    study["models"] = {"as-is": {"from": str(tmp_path / "mine")}}
    path.write_text(yaml.safe_dump(study))
    assert main(["sweep", "--study", str(path), "--out", str(tmp_path / "out2")]) == 0
    failed = read_results(tmp_path / "out2")
    assert all(r["status"] == "failed" and "3 classes, the model 5" in r["error"] for r in failed)
