"""A grid's runs that share a fine-tuned prefix reuse it, and give the bytes a fresh run gives."""

import json

import pytest

from tests.test_workflows import _folder
from vitcompress import step_cache
from vitcompress.runs import METRICS, PACKED
from vitcompress.train import TrainConfig
from vitcompress.workflows import compress_run, train_run

PRUNE = {"prune": {"sparsity": 0.5, "schedule": "cubic"}}
TUNE = {"finetune": {"max_steps": 6, "lr": 1.0e-3, "batch_size": 8}}
INT8 = {"quantize": {"weights": "int8", "activations": "int8"}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    cfg = TrainConfig(epochs=1, batch_size=8, lr=3e-3, warmup_epochs=0.0, augment="flip",
                      img_size=16, patch_size=4)  # fmt: skip
    train_run("vit-nano", _folder(root / "images"), root / "base", cfg, channels=1)
    return root / "base"


def _run(base, steps, out):
    m = compress_run(base, {"name": "r", "steps": steps}, out, speed=False)
    return m, (out / PACKED).read_bytes()


def _untimed(reports):
    return [{k: v for k, v in r.items() if not k.endswith("wall_s")} for r in reports]


def test_a_reused_prefix_gives_the_bytes_of_a_fresh_run(base, tmp_path):
    step_cache.clear()
    fresh, fresh_bytes = _run(base, [PRUNE, TUNE, INT8], tmp_path / "fresh")
    assert fresh["steps_reused"] == 0
    step_cache.clear()
    sparse, sparse_bytes = _run(base, [PRUNE, TUNE], tmp_path / "sparse")  # fills the cache
    assert sparse["steps_reused"] == 0
    again, again_bytes = _run(base, [PRUNE, TUNE, INT8], tmp_path / "again")
    assert again["steps_reused"] == 2
    assert again_bytes == fresh_bytes and again["top1"] == fresh["top1"]
    assert _untimed(again["steps"]) == _untimed(fresh["steps"])  # the reports travel too
    # the int8 step did not touch the cached model: the fp32 run repeats from it exactly
    repeat, repeat_bytes = _run(base, [PRUNE, TUNE], tmp_path / "repeat")
    assert repeat["steps_reused"] == 2 and repeat_bytes == sparse_bytes
    assert json.loads((tmp_path / "again" / METRICS).read_text())["steps_reused"] == 2


def test_a_different_prefix_or_checkpoint_is_not_reused(base, tmp_path):
    step_cache.clear()
    _run(base, [PRUNE, TUNE], tmp_path / "a")
    other_lr = {"finetune": {**TUNE["finetune"], "lr": 5.0e-4}}
    assert _run(base, [PRUNE, other_lr, INT8], tmp_path / "b")[0]["steps_reused"] == 0
    other_sparsity = {"prune": {**PRUNE["prune"], "sparsity": 0.75}}
    assert _run(base, [other_sparsity, other_lr], tmp_path / "c")[0]["steps_reused"] == 0
    assert _run(base, [INT8], tmp_path / "d")[0]["steps_reused"] == 0  # no fine-tune, no prefix
    # the same recipe from a checkpoint whose files changed starts afresh
    _run(base, [PRUNE, TUNE], tmp_path / "e")
    (base / METRICS).write_text((base / METRICS).read_text() + " ")
    assert _run(base, [PRUNE, TUNE, INT8], tmp_path / "f")[0]["steps_reused"] == 0
