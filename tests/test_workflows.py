"""train_run -> evaluate_run -> compress_run: the jobs behind the CLI, on a small image folder."""

import json

import pytest
from PIL import Image

from vitcompress.errors import VitcompressError
from vitcompress.runs import CONFIG, METRICS, PACKED, WEIGHTS
from vitcompress.train import TrainConfig
from vitcompress.workflows import compress_run, evaluate_run, train_run


def _folder(root, n=16):
    """Three classes a model can tell apart: dark, bright, and striped 16x16 images."""
    for c, name in enumerate(("dark", "bright", "striped")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = Image.new("L", (16, 16), 30 + i if c == 0 else 220 - i)
            if c == 2:
                for x in range(0, 16, 2):
                    for y in range(16):
                        img.putpixel((x, y), 0)
            img.save(root / name / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    data = _folder(root / "images")
    cfg = TrainConfig(epochs=3, batch_size=8, lr=3e-3, warmup_epochs=0.0, augment="none",
                      img_size=16, patch_size=4)  # fmt: skip
    metrics = train_run("vit-nano", data, root / "base", cfg, channels=1)
    return root / "base", metrics


def test_train_run_writes_a_complete_run_with_its_config(trained):
    run, metrics = trained
    assert sorted(p.name for p in run.iterdir()) == [CONFIG, METRICS, WEIGHTS]
    config = json.loads((run / CONFIG).read_text())
    assert config["train"] == TrainConfig(**config["train"]).to_dict()  # one config, stored whole
    assert config["train"]["epochs"] == 3 and config["data"]["classes"] == [
        "bright", "dark", "striped",
    ]  # fmt: skip
    assert metrics["top1"] == 1.0  # three easy classes, evaluated on the held-out split
    assert evaluate_run(run)["top1"] == metrics["top1"]


def test_compress_run_with_a_built_in_recipe_writes_a_small_packed_run(trained, tmp_path):
    run, base = trained
    m = compress_run(run, "int8-smallest", tmp_path / "q", speed=False)
    files = {p.name: p.stat().st_size for p in (tmp_path / "q").iterdir()}
    assert sorted(files) == [CONFIG, METRICS, PACKED]
    assert files[PACKED] == m["bytes_stored"] < m["bytes_fp32"] / 3.5
    assert m["format"] == "int8" and m["recipe"] == "int8-smallest"
    assert abs(m["top1"] - base["top1"]) <= 0.1
    assert evaluate_run(tmp_path / "q")["top1"] == m["top1"]
    assert m["samples"] == base["samples"] > 0  # the report says how many images each number used
    with pytest.raises(VitcompressError, match="already compressed"):
        compress_run(tmp_path / "q", "int8-smallest", tmp_path / "qq", speed=False)


def test_train_run_refuses_what_it_cannot_do(trained, tmp_path):
    run, _ = trained
    with pytest.raises(VitcompressError, match="already holds a finished run"):
        train_run("vit-nano", "fashion-mnist", run, TrainConfig(epochs=1))
    with pytest.raises(VitcompressError, match="--distill needs --teacher"):
        train_run("vit-nano", "fashion-mnist", tmp_path / "x", TrainConfig(distill="hard"))
    with pytest.raises(VitcompressError, match="epochs must be an integer >= 1, got 0"):
        TrainConfig(epochs=0)
