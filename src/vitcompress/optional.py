"""Optional dependencies: imported when a feature needs them, with a one-line error naming the
extra that installs them (``pip install 'vitcompress[deploy]'``) when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from vitcompress.errors import VitcompressError

EXTRAS = {"onnx": "deploy", "onnxruntime": "deploy", "matplotlib": "report", "ray": "ray"}


def need(module: str, what: str) -> ModuleType:
    """``import module`` for ``what`` (an export, a report), or a one-line error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.partition(".")[0]
        raise VitcompressError(
            f"{what} needs {top}: pip install 'vitcompress[{EXTRAS.get(top, 'all')}]'"
        ) from None
