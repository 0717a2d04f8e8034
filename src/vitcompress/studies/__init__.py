"""Studies: a grid of models x data x recipes, run into one SQLite file, resumably.

- :mod:`~vitcompress.studies.study`: reading a study (a YAML file, a mapping, or a built-in
  name from ``builtin/``), its settings, models and teachers;
- :mod:`~vitcompress.studies.grid`: recipe templates expanded into runs with stable ids;
- :mod:`~vitcompress.studies.store`: the results file, one row per run;
- :mod:`~vitcompress.studies.executors`: where tasks run (this process, processes, Ray);
- :mod:`~vitcompress.studies.runner`: :func:`run_sweep`, resumable.

The names below are imported on first use, so that reading results (``store``) never imports
torch, the runner or the executors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitcompress.studies.grid import expand_study
    from vitcompress.studies.runner import run_sweep, summary_table
    from vitcompress.studies.store import (
        DB_NAME,
        band_order,
        connect,
        read_results,
        size_band,
        upsert,
    )
    from vitcompress.studies.study import BUILTIN, Baseline, RunSpec, Study, load_study

_EXPORTS = {
    "run_sweep": "runner",
    "summary_table": "runner",
    "expand_study": "grid",
    "load_study": "study",
    "BUILTIN": "study",
    "Study": "study",
    "RunSpec": "study",
    "Baseline": "study",
    "read_results": "store",
    "connect": "store",
    "upsert": "store",
    "DB_NAME": "store",
    "size_band": "store",
    "band_order": "store",
}
__all__ = [
    "run_sweep",
    "summary_table",
    "expand_study",
    "load_study",
    "BUILTIN",
    "Study",
    "RunSpec",
    "Baseline",
    "read_results",
    "connect",
    "upsert",
    "DB_NAME",
    "size_band",
    "band_order",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
