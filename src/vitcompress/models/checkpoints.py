"""Run directories: ``model.safetensors`` + ``config.json`` + ``metrics.json``.

Everything is written to a temporary name and renamed into place, so an interrupted run
never leaves a half-written file behind. Loading checks every tensor's shape against the
model that ``config.json`` describes and fails with one line naming the first mismatch.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
TRAIN_STATE = "train_state.pt"

# Hooks that turn a freshly built model into the compressed structure described in
# config["compression"] (factorised layers, quantised layers, masks) before weights load.
# recipe.py registers them; keeping them here avoids an import cycle.
STRUCTURE_REBUILDERS: dict[str, Callable[[nn.Module, dict], None]] = {}


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    import vitcompress

    return {
        "vitcompress": vitcompress.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VitcompressError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitcompressError(f"corrupt JSON in {path}: {e}") from None


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous, de-aliased copy of the state dict (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state_dict_for_save(model), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_run(out: Path, model: nn.Module, config: dict, metrics: dict | None = None) -> None:
    """Write a run directory: weights first, then config, then metrics (the 'done' marker)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "versions": config.get("versions", versions())}
    save_weights(model, out / WEIGHTS)
    write_json(out / CONFIG, config)
    if metrics is not None:
        write_json(out / METRICS, metrics)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VitcompressError(f"missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VitcompressError(f"corrupt safetensors file {path}: {msg}") from None


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after checking names and shapes; one line on mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise VitcompressError(
            f"{source}: {len(missing)} tensor(s) missing for this model, first {missing[0]!r}"
        )
    if unexpected:
        raise VitcompressError(
            f"{source}: {len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise VitcompressError(
                f"{source}: shape mismatch for {k!r}: file has {tuple(state[k].shape)}, "
                f"config.json describes {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True)


def load_run(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a run directory describes and load its weights; (model, config)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise VitcompressError(f"checkpoint directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise VitcompressError(f"checkpoint must be a run directory, not a file: {run_dir}")
    config = read_json(run_dir / CONFIG)
    if "model" not in config:
        raise VitcompressError(f"{run_dir / CONFIG} has no 'model' section")
    model = build_model(config["model"])
    for step in config.get("compression", []):
        kind = step.get("kind")
        if kind not in STRUCTURE_REBUILDERS:
            # compression steps register themselves on import
            import vitcompress.recipe  # noqa: F401
        if kind not in STRUCTURE_REBUILDERS:
            raise VitcompressError(f"{run_dir / CONFIG}: unknown compression step {kind!r}")
        STRUCTURE_REBUILDERS[kind](model, step)
    state = read_weights(run_dir / WEIGHTS)
    load_state_checked(model, state, str(run_dir / WEIGHTS))
    model.to(map_location)
    model.eval()
    return model, config


def load_metrics(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / METRICS)
