"""A foreign model in: a Hugging Face or timm ViT/DeiT becomes an ordinary run directory
(``vitcompress import``), or a model and its run config in Python (``from_pretrained``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.fileio import read_json
from vitcompress.measure import params_nonzero, params_total
from vitcompress.models.imported import ImportedModel
from vitcompress.outputs import building, check_output_dir, output_lock
from vitcompress.runs import CONFIG, load_run, save_run, versions
from vitcompress.train import evaluate, pick_device
from vitcompress.workflows import check_classes, loaders, run_data


def import_model(source: str | Path, preset: str | None = None, **overrides: Any) -> ImportedModel:
    """A Hugging Face ``save_pretrained`` folder, a timm hub folder or a timm state-dict file,
    converted to our ViT (logits equal to the source's). ``preset`` and ``overrides``
    (:class:`~vitcompress.models.vit.ViTConfig` fields such as ``num_heads``) are for timm files,
    which do not say every size."""
    from vitcompress.models.hf import load_hf
    from vitcompress.models.timm import load_timm

    path = Path(source)
    if not path.exists():
        raise VitcompressError(f"import: {path} not found")
    if path.is_dir() and (path / "config.json").is_file():
        cfg = read_json(path / "config.json")
        if "architecture" in cfg or "pretrained_cfg" in cfg:  # timm's hub layout
            return load_timm(path, preset, **overrides)
        if preset is not None or overrides:
            raise VitcompressError(
                f"import: {path} is a Hugging Face folder; its config.json gives every size "
                "(leave out --model and the sizes)"
            )
        return load_hf(path)
    if path.is_dir():
        raise VitcompressError(
            f"import: {path} has no config.json (a Hugging Face save_pretrained folder or a timm "
            "hub folder); for a bare timm weight file give the file and --model PRESET"
        )
    return load_timm(path, preset, **overrides)


def imported_config(imported: ImportedModel, limit: int | None = None) -> dict:
    """The run config of an imported model: model, source, classes, its own preprocessing, and
    a data section without a source (a job on it names its data)."""
    from vitcompress.data.transforms import INTERPOLATIONS

    model_cfg = imported.model_config
    prep = {k: imported.preprocess[k] for k in ("mean", "std", "interpolation", "crop_pct")}
    if prep["interpolation"] not in INTERPOLATIONS:
        raise VitcompressError(
            f"import: the model's preprocessing resizes with {prep['interpolation']!r}, which "
            f"vitcompress does not do ({', '.join(INTERPOLATIONS)}); its evaluation would differ"
        )
    if imported.preprocess["img_size"] != model_cfg["img_size"]:
        raise VitcompressError(
            f"import: the preprocessing gives {imported.preprocess['img_size']}px images, the "
            f"model takes {model_cfg['img_size']}px"
        )
    return {
        "model": model_cfg,
        "source": imported.source,
        "preprocess": {**imported.preprocess, **prep},
        "classes": imported.classes,
        "data": {
            "spec": None,
            "img_size": model_cfg["img_size"],
            "seed": 0,
            "augment": True,
            "limit": limit,
            "channels": model_cfg["in_chans"],
            "classes": imported.classes,
            "preprocess": prep,
        },  # fmt: skip
        "command": " ".join(["vitcompress", *sys.argv[1:]]) if sys.argv else None,
        "versions": versions(),
    }


def from_pretrained(source: str | Path, **kwargs: Any) -> tuple[nn.Module, dict]:
    """``(model in eval mode, run config)`` from a run directory, a Hugging Face
    ``save_pretrained`` folder, a timm hub folder, a timm weight file (``preset=...`` for a
    bare one) or a shipped model (``zoo:vit-nano-fmnist``): one entry point for every model
    vitcompress takes."""
    from vitcompress.zoo import run_path

    path = run_path(source)
    if path.is_dir() and (path / CONFIG).is_file() and "model" in read_json(path / CONFIG):
        return load_run(path)
    imported = import_model(path, **kwargs)
    return imported.model, imported_config(imported)


def data_loaders(
    config: dict, data: str | None = None, batch_size: int = 64, limit: int | None = None
):
    """``(train loader, test loader, info)`` for a model's run config, on its own data or
    ``data``, prepared as the model expects (its input size, channels, preprocessing and label
    order): what ``evaluate``, ``compress`` and fine-tuning read."""
    data_cfg = run_data(config, Path("<model>"), data, limit)
    return loaders(data_cfg, batch_size)


def import_run(
    source: str | Path,
    out: Path,
    *,
    preset: str | None = None,
    data: str | None = None,
    limit: int | None = None,
    force: bool = False,
    device: str = "auto",
    **overrides: Any,
) -> dict:
    """Import a foreign ViT/DeiT (:func:`import_model`) as run directory ``out``: ordinary for
    ``evaluate``, ``compress``, ``export``, ``bench``, studies and ``train --init-from``.

    Its config.json records where it came from (``source``), its class names and its own
    preprocessing (``preprocess``: mean, std, input size, interpolation, crop), which every
    later job on it uses. With ``data`` (of the same classes) the run is evaluated on its test
    split and the data becomes the run's own.
    """
    out = Path(out)
    check_output_dir(out, force=force, inputs=[Path(source)])
    with output_lock(out), building(out) as partial:
        return _import_into(partial, source, preset, data, limit, device, overrides)


def _import_into(
    out: Path,
    source: str | Path,
    preset: str | None,
    data: str | None,
    limit: int | None,
    device: str,
    overrides: dict,
) -> dict:
    """:func:`import_run`'s work, written to run directory ``out`` (the partial one)."""
    imported = import_model(source, preset, **overrides)
    model, config = imported.model, imported_config(imported, limit)
    model_cfg = config["model"]
    metrics: dict = {"imported": True, "params_total": params_total(model),
                     "params_nonzero": params_nonzero(model),
                     "bytes_fp32": 4 * params_total(model)}  # fmt: skip
    if data:
        data_cfg = {**run_data(config, out, data, limit), "augment": False}
        _, test_loader, info = loaders(data_cfg, 256)
        check_classes(info, model_cfg, data)
        dev = pick_device(device)
        ev = evaluate(model.to(dev), test_loader, dev)
        model.cpu()
        metrics.update({k: ev[k] for k in ("top1", "top5", "loss")}, samples=ev["samples"])
        config["data"] = {**data_cfg, "augment": True, "classes": list(info.classes)}
    save_run(out, model, config, metrics)
    return metrics
