"""vitcompress: make Vision Transformers small and fast for edge CPUs and FPGAs.

The Python API, in the shapes users know (torchao's ``quantize_(model, config)``, Hugging
Face's ``from_pretrained`` / ``save_pretrained``)::

    import vitcompress as vc

    model, config = vc.from_pretrained("my-hf-vit/")     # a run, an HF folder or a timm file
    train, test, info = vc.data_loaders(config, "imagefolder:/data/RESISC45")
    vc.compress_(model, "int8-smallest", calib_data=train)   # a recipe: file, mapping or name
    print(vc.evaluate(model, test)["top1"])
    vc.save_pretrained(model, "runs/mine-int8", config)     # packed: its bytes are its size
    vc.export_onnx(model, "mine-int8.onnx", (3, 224, 224))

Names are loaded on first use, so ``import vitcompress`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

from vitcompress.errors import VitcompressError

# public name -> the module that defines it
_API = {
    # models in and out
    "from_pretrained": "vitcompress.imports",
    "import_model": "vitcompress.imports",
    "data_loaders": "vitcompress.imports",
    "load_run": "vitcompress.runs",
    "save_run": "vitcompress.runs",
    "save_pretrained": "vitcompress.runs",
    "create_model": "vitcompress.models",
    "build_model": "vitcompress.models",
    # compression: one verb per technique, one for a whole recipe
    "compress_": "vitcompress.steps.recipe",
    "load_recipe": "vitcompress.steps.recipe",
    "parse_recipe": "vitcompress.steps.recipe",
    "Recipe": "vitcompress.steps.recipe",
    "quantize_": "vitcompress.steps.quantize",
    "QuantizeConfig": "vitcompress.steps.quantize",
    "prune_": "vitcompress.steps.prune",
    "PruneConfig": "vitcompress.steps.prune",
    "shrink_": "vitcompress.steps.shrink",
    "ShrinkConfig": "vitcompress.steps.shrink",
    "factorize_": "vitcompress.steps.lowrank",
    "LowRankConfig": "vitcompress.steps.lowrank",
    "smooth_": "vitcompress.steps.smooth",
    "SmoothConfig": "vitcompress.steps.smooth",
    "to_int8_": "vitcompress.int8",
    # data, training, measuring
    "load_data": "vitcompress.data",
    "make_loader": "vitcompress.data",
    "TrainConfig": "vitcompress.train",
    "train": "vitcompress.train",
    "evaluate": "vitcompress.train",
    "bytes_stored": "vitcompress.pack",
    # files to deploy
    "export_onnx": "vitcompress.export",
    "save_packed": "vitcompress.pack",
    "load_packed": "vitcompress.pack",
    # the jobs behind the CLI
    "train_run": "vitcompress.workflows",
    "evaluate_run": "vitcompress.workflows",
    "compress_run": "vitcompress.workflows",
    "import_run": "vitcompress.imports",
    "run_sweep": "vitcompress.studies",
}

__all__ = ["VitcompressError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'vitcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
