"""The shipped models: converged Fashion-MNIST runs trained by vitcompress itself.

``zoo:NAME`` names one wherever a run directory is accepted (``evaluate``, ``compress``,
``export``, ``bench``, ``train --init-from``, a study's ``from:``, a distillation teacher).
``make zoo`` retrains them all from scratch with the commands their ``config.json`` records
(``scripts/train-zoo.sh``).
"""

from __future__ import annotations

import json
from pathlib import Path

from vitcompress.errors import VitcompressError

PREFIX = "zoo:"
ZOO_DIR = Path(__file__).resolve().parent / "zoo"


def names() -> list[str]:
    """The shipped models, by name."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "metrics.json").is_file())


def run_path(spec: str | Path) -> Path:
    """The run directory ``spec`` names: ``zoo:NAME`` a shipped model, anything else a path."""
    text = str(spec)
    if not text.startswith(PREFIX):
        return Path(spec)
    name = text[len(PREFIX) :]
    path = ZOO_DIR / name
    if not name or "/" in name or not (path / "metrics.json").is_file():
        shipped = ", ".join(names()) or "none"
        raise VitcompressError(f"no shipped model {text!r}; the zoo holds: {shipped}")
    return path


def table() -> list[dict]:
    """Each shipped model with its preset, parameters, top-1 on its test split and the
    command that trained it."""
    rows = []
    for name in names():
        d = ZOO_DIR / name
        cfg = json.loads((d / "config.json").read_text())
        m = json.loads((d / "metrics.json").read_text())
        rows.append({
            "name": f"{PREFIX}{name}", "preset": cfg["model"].get("preset"),
            "params": m.get("params_total"), "top1": m.get("top1"),
            "test_images": m.get("samples") or 10_000, "train_s": m.get("train_wall_s"),
            "command": cfg.get("command"),
        })  # fmt: skip
    return rows


__all__ = ["PREFIX", "ZOO_DIR", "names", "run_path", "table"]
