"""The Python API as the README shows it: its code block runs as written."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitcompress as vc

transformers = pytest.importorskip("transformers")
README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python block"
    return blocks[0]


def test_the_readme_example_runs_on_a_users_hf_model_and_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    classes = ["dark", "grey", "light"]
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, image_size=16, patch_size=4,
                                 num_labels=3, id2label=dict(enumerate(classes)))  # fmt: skip
    transformers.ViTForImageClassification(cfg).save_pretrained("my-vit")
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        Path("my-images", name).mkdir(parents=True)
        for i in range(8):
            arr = np.clip(50 + 70 * c + rng.normal(0, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(f"my-images/{name}/{i}.png")
    exec(compile(_readme_python(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"fp32 top-1 [\d.]+\nint8 top-1 [\d.]+ \d+ bytes", out), out
    model, config = vc.from_pretrained("runs/my-vit-int8")
    assert Path("runs/my-vit-int8/model.packed").is_file() and config["classes"] == classes
    assert config["compression"][0]["kind"] == "quantize"
    assert Path("my-vit-int8.onnx").stat().st_size > 0
    from vitcompress.steps.quantize import quantize_

    assert vc.quantize_ is quantize_  # the API's names are the modules' own
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vc.nothing  # noqa: B018


def test_import_vitcompress_stays_light():
    import subprocess
    import sys

    code = "import sys, vitcompress; print('torch' in sys.modules, vitcompress.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", vc.__version__]
    assert torch.__version__  # the API itself loads torch on first use
