"""The shipped models: each reproduces its recorded top-1 on Fashion-MNIST's test split, and
was trained by the command `make zoo` runs."""

import json
import re
import shlex
from pathlib import Path

import pytest

from vitcompress.errors import VitcompressError
from vitcompress.studies import expand_study, load_study
from vitcompress.workflows import evaluate_run
from vitcompress.zoo import ZOO_DIR, names, run_path

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train-zoo.sh"


def test_the_zoo_ships_every_model_the_seed_study_starts_from():
    doc, _ = load_study("seed")
    starts = [m["run"] for m in [*doc["models"].values(), *doc.get("teachers", {}).values()]]
    assert starts and all(s.startswith("zoo:") for s in starts)  # the demo trains nothing
    assert {s.removeprefix("zoo:") for s in starts} <= set(names())
    assert "resnet-micro-fmnist" in names()  # DeiT's CNN teacher
    st = expand_study("seed")
    assert len(set(st.run_ids())) == len(st.runs) >= 19
    assert {r.model for r in st.runs} == set(doc["models"])


@pytest.mark.skipif(not FMNIST.is_file(), reason="dataset-fashion-mnist missing")
@pytest.mark.parametrize("name", names())
def test_a_shipped_model_reproduces_its_recorded_top1(name):
    recorded = json.loads((ZOO_DIR / name / "metrics.json").read_text())
    got = evaluate_run(f"zoo:{name}", device="cpu")
    assert got["samples"] == 10_000  # the whole test split
    assert got["top1"] == pytest.approx(recorded["top1"], abs=2e-4)  # 2 images of 10,000


@pytest.mark.parametrize("name", names())
def test_a_shipped_model_was_trained_by_the_zoo_script(name):
    config = json.loads((ZOO_DIR / name / "config.json").read_text())
    argv = shlex.split(config["command"])
    assert argv[:2] == ["vitcompress", "train"]
    # the script writes to $OUT/<name>; the recorded command wrote to wherever OUT was
    out = argv[argv.index("--out") + 1]
    assert Path(out).name == name
    script = SCRIPT.read_text().replace("\\\n", " ")
    # --resume: an interrupted training continued exactly where it stopped (test_train checks
    # that a resumed run equals an uninterrupted one); it is how it ran, not what it trained
    flags = " ".join(a for a in argv[2:] if a not in (out, "--force", "--resume") and "/" not in a)
    lines = [re.sub(r'"\$OUT/[^"]*"', "", ln) for ln in script.splitlines()]
    assert any(all(tok in ln.split() for tok in flags.split()) for ln in lines), flags


def test_unknown_zoo_names_are_one_line_errors():
    with pytest.raises(VitcompressError, match="no shipped model 'zoo:vit-giant'; the zoo holds"):
        run_path("zoo:vit-giant")
    assert run_path("runs/mine") == Path("runs/mine")


def test_the_python_api_takes_a_zoo_name():
    import vitcompress as vc

    model, config = vc.from_pretrained("zoo:resnet-micro-fmnist")
    assert config["model"]["preset"] == "resnet-micro" and not model.training
    with pytest.raises(VitcompressError, match="no shipped model 'zoo:nope'"):
        vc.from_pretrained("zoo:nope")
