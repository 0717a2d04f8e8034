"""Run directories: weights + ``config.json`` + ``metrics.json``.

A dense run (a trained model) keeps its weights in ``model.safetensors``; a compressed run in
``model.packed``, the packed file (:mod:`vitcompress.pack`) whose size is its ``bytes_stored``,
so that what a run occupies on disk is what it reports. ``config.json`` holds everything needed
to rebuild the model (``model``, and for a compressed run the structure records of
``compression``), the data and the recipe; ``metrics.json`` is written last, so a directory
with it is complete.

Everything is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file behind. Loading checks every tensor's shape against the model that
``config.json`` describes and fails with one line naming the first mismatch.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.fileio import atomic_write_bytes, file_mode, read_json, write_json
from vitcompress.models import build_model
from vitcompress.pack import load_packed, save_packed, with_model_config
from vitcompress.steps.registry import describe_structure, rebuild_structure_
from vitcompress.train import ResumeState
from vitcompress.zoo import run_path

WEIGHTS = "model.safetensors"
PACKED = "model.packed"
CONFIG = "config.json"
METRICS = "metrics.json"
TRAIN_STATE = "train_state.pt"


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
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_run(out: Path, model: nn.Module, config: dict, metrics: dict | None = None) -> None:
    """Write a run directory: weights first, then config, then metrics (the 'done' marker).

    A compressed model (one with structure records, :func:`describe_structure`) is stored
    packed (``model.packed``), and its config's ``compression`` is set to those records; any
    other model as the dense ``model.safetensors``. The other file is removed, so a directory
    holds one set of weights.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "versions": config.get("versions", versions())}
    records = describe_structure(model)
    if records:
        config["compression"] = records
        save_packed(model, out / PACKED, config)
        (out / WEIGHTS).unlink(missing_ok=True)
    else:
        save_weights(model, out / WEIGHTS)
        (out / PACKED).unlink(missing_ok=True)
    write_json(out / CONFIG, config)
    if metrics is not None:
        write_json(out / METRICS, metrics)


def save_pretrained(
    model: nn.Module, out: str | Path, config: dict | None = None, metrics: dict | None = None
) -> Path:
    """Write ``model`` as a complete run directory (packed when compressed) that
    :func:`load_run`, ``from_pretrained`` and every command take. ``config`` is the run config
    it came with (``from_pretrained`` gives it; our ViTs need none)."""
    config = with_model_config(model, config)
    params = list(model.parameters())
    done = {
        "params_total": sum(p.numel() for p in params),
        "params_nonzero": sum(int(torch.count_nonzero(p.detach())) for p in params),
    }
    save_run(Path(out), model, config, {**done, **(metrics or {})})
    return Path(out)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VitcompressError(f"missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VitcompressError(f"corrupt safetensors file {path}: {msg}") from None


def load_state_checked(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Load ``state`` into ``model`` after checking names and shapes; one line on mismatch.
    ``assign`` takes the tensors themselves (a model built on the meta device)."""
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
    model.load_state_dict(state, strict=True, assign=assign)


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse weights holding NaN or Inf: every result computed from them would be garbage
    (INT8 quantisation would even turn them into plausible finite codes)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise VitcompressError(
                f"{where}: tensor {name!r} holds {bad} NaN or Inf value(s); refused "
                "(--allow-nonfinite loads it anyway, to debug)"
            )


def load_run(
    run_dir: Path,
    map_location: str | torch.device = "cpu",
    *,
    complete: bool = True,
    allow_nonfinite: bool = False,
) -> tuple[nn.Module, dict]:
    """Rebuild the model a run directory describes and load its weights; (model, config).

    The model is built on the meta device and its shapes checked against the file before any
    memory is taken, so a config.json describing a huge model costs nothing. A run without
    ``metrics.json`` (interrupted) is refused unless ``complete=False``, weights with NaN or Inf
    unless ``allow_nonfinite``. ``zoo:NAME`` names a shipped model.
    """
    run_dir = run_path(run_dir)
    if not run_dir.exists():
        raise VitcompressError(f"checkpoint directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise VitcompressError(f"checkpoint must be a run directory, not a file: {run_dir}")
    config = read_json(run_dir / CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise VitcompressError(f"{run_dir / CONFIG} has no 'model' section")
    if complete and not (run_dir / METRICS).is_file():
        how = "--resume finishes it" if (run_dir / TRAIN_STATE).is_file() else "rerun it"
        raise VitcompressError(f"{run_dir} is an incomplete run (no metrics.json): {how}")
    if (run_dir / PACKED).is_file():
        model, _ = load_packed(run_dir / PACKED)
    else:  # a dense run, or a compressed one written before runs stored packed weights
        records = config.get("compression") or []
        # records of before the registry replay a quantize config, which computes on weights
        replay = any(isinstance(r, dict) and "config" in r for r in records)
        with torch.device("cpu" if replay else "meta"):
            model = build_model(config["model"])
            rebuild_structure_(model, records, str(run_dir / CONFIG))
        state = read_weights(run_dir / WEIGHTS)
        load_state_checked(model, state, str(run_dir / WEIGHTS), assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise VitcompressError(f"{run_dir / WEIGHTS}: no value for {left[0]!r}")
    if not allow_nonfinite:
        check_finite(model, str(run_dir))
    model.to(map_location)
    model.eval()
    return model, config


def save_train_state(out: Path, opt: torch.optim.Optimizer, epochs_done: int, progress: dict):
    """Optimizer and RNG state for ``--resume``, in a file torch.load reads with weights_only."""
    state = {
        "optimizer": opt.state_dict(),
        "epochs_done": epochs_done,
        "torch_rng": torch.get_rng_state(),
        "progress": json.dumps(progress),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(out) / TRAIN_STATE, buf.getvalue())


def load_train_state(out: Path, model: nn.Module) -> ResumeState:
    """Load the last epoch's weights of an interrupted run into ``model``; where it stopped."""
    path = Path(out) / TRAIN_STATE
    if not path.is_file():
        if (Path(out) / METRICS).is_file():
            raise VitcompressError(f"{out} is a finished run (no {TRAIN_STATE}); nothing to resume")
        raise VitcompressError(f"cannot resume: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        progress = json.loads(state["progress"])
        resume = ResumeState(
            int(state["epochs_done"]), progress["history"], float(progress["wall_s"]),
            state["optimizer"], state["torch_rng"],
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise VitcompressError(f"corrupt training state {path}: {type(e).__name__}") from None
    load_state_checked(model, read_weights(Path(out) / WEIGHTS), str(Path(out) / WEIGHTS))
    return resume


__all__ = [
    "CONFIG",
    "METRICS",
    "PACKED",
    "TRAIN_STATE",
    "WEIGHTS",
    "check_finite",
    "load_run",
    "load_state_checked",
    "load_train_state",
    "read_json",
    "read_weights",
    "save_pretrained",
    "save_run",
    "save_train_state",
    "save_weights",
    "versions",
    "write_json",
]
