"""The tiny study, swept once per session and shared by the runner and executor tests."""

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from vitcompress.studies import run_sweep

# Tiny: one baseline (shared by every test below through its content hash), few runs.
TINY = {
    "name": "tiny",
    "data": "fashion-mnist",
    "limit": 128,
    "models": {"vit-nano": {"preset": "vit-nano", "epochs": 1, "batch_size": 64}},
    "recipes": [
        {
            "name": "$fmt",
            "grid": {
                "fmt": {
                    "fp32": {"weights": "fp32", "activations": None},
                    "int8": {"weights": "int8", "activations": "int8",
                             "calibration": {"batches": 1}},
                }
            },
            "steps": [{"quantize": "$fmt"}],
        },
        {
            "name": "prune50",
            "steps": [
                {"prune": {"sparsity": 0.5}},
                {"finetune": {"max_steps": 2, "batch_size": 32}},
            ],
        },
    ],
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_out(tmp_path_factory) -> Path:
    """The tiny study swept once, in this process (real training and compress_run)."""
    out = tmp_path_factory.mktemp("tiny")
    run_sweep(TINY, out, threads=1, progress=False)
    return out


@pytest.fixture
def tiny() -> dict:
    """A copy of the tiny study, as swept into ``tiny_out``."""
    return copy.deepcopy(TINY)


@pytest.fixture
def quick() -> Callable[..., dict]:
    """``quick(name, recipes=slice(None))``: a copy of the tiny study under another name, some
    of its recipes, no speed measurement."""

    def make(name: str, recipes: slice = slice(None)) -> dict:
        doc = copy.deepcopy(TINY)
        return {**doc, "name": name, "speed": False, "recipes": doc["recipes"][recipes]}

    return make


@pytest.fixture
def with_baselines(tiny_out: Path, tmp_path: Path) -> Callable[[str], Path]:
    """``with_baselines(name)``: a new output directory holding the tiny study's baselines, so
    that a sweep into it trains nothing."""

    def make(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(tiny_out / "baselines", out / "baselines", dirs_exist_ok=True)
        return out

    return make
