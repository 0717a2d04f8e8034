"""Reuse a recipe's fine-tuned prefix within one process.

A sweep's grid often crosses one pruning schedule with several formats: ``prune, finetune``
then ``quantize: int8``, ``quantize: fp16``, or nothing. The fine-tune is by far the most
expensive step and identical across them, so the model as it was right after the last
``finetune`` step is kept (one entry, in memory) and the next run whose recipe starts with the
same steps, from the same checkpoint, data, seed, batch size and device, continues from it.

The result is bit for bit the one a fresh run gives: the entry holds a copy of the model, the
step reports, and the random generators' states at that point (augmentation draws from torch's
global generator; the calibration loader has its own, untouched by fine-tuning). A run records
how many of its steps it reused in ``metrics["steps_reused"]``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress.steps.recipe import Recipe
from vitcompress.zoo import run_path


@dataclass
class _Entry:
    key: str
    n_steps: int
    model: nn.Module
    reports: dict[int, dict]
    rng: dict[str, Any]


_LAST: _Entry | None = None


def prefix_len(recipe: Recipe) -> int:
    """How many leading steps can be reused: up to and including the last one that trains."""
    ft = [i for i, s in enumerate(recipe.steps) if s.impl.needs_training(s.config)]
    return ft[-1] + 1 if ft else 0


def prefix_key(context: dict, recipe: Recipe, n_steps: int) -> str:
    """What a prefix's result depends on: ``context`` (checkpoint, data, seed, batch size,
    device) and the first ``n_steps`` steps as the recipe stores them."""
    steps = recipe.to_dict()["steps"][:n_steps]
    text = json.dumps({"context": context, "steps": steps}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_identity(run_dir: Path) -> dict:
    """The checkpoint's path and its files' sizes and modification times: a run replaced in
    place (``--force``) is another checkpoint."""
    run_dir = run_path(run_dir).resolve()
    files = sorted(p for p in run_dir.iterdir() if p.is_file())
    return {"dir": str(run_dir),
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}  # fmt: skip


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def lookup(context: dict, recipe: Recipe) -> tuple[int, nn.Module | None, dict[int, dict]]:
    """``(n_steps, model, reports)`` to continue ``recipe`` from: a copy of the cached model
    after its first ``n_steps`` steps, with the random generators restored to their state at
    that point; ``(0, None, {})`` when nothing cached fits."""
    n = prefix_len(recipe)
    if _LAST is None or n == 0 or _LAST.n_steps != n or _LAST.key != prefix_key(context, recipe, n):
        return 0, None, {}
    _set_rng_state(_LAST.rng)
    return n, copy.deepcopy(_LAST.model), copy.deepcopy(_LAST.reports)


def store(context: dict, recipe: Recipe, n_steps: int, model: nn.Module,
          reports: dict[int, dict]) -> None:  # fmt: skip
    """Keep ``model`` as it is after the first ``n_steps`` steps (replacing the entry before)."""
    global _LAST
    _LAST = None  # free the old copy before making the new one
    _LAST = _Entry(prefix_key(context, recipe, n_steps), n_steps, copy.deepcopy(model),
                   copy.deepcopy(reports), _rng_state())  # fmt: skip


def clear() -> None:
    """Forget the cached prefix."""
    global _LAST
    _LAST = None
