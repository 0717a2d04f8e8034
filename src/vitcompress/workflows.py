"""End-to-end jobs behind the CLI: train a run directory, evaluate one.

Each is one function over plain arguments, so the CLI, the sweep runner and tests share them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.fileio import read_json
from vitcompress.measure import compression_fields, params_nonzero, params_total, speed_fields
from vitcompress.models import build_model, model_config
from vitcompress.runs import (
    CONFIG,
    METRICS,
    PACKED,
    TRAIN_STATE,
    WEIGHTS,
    load_run,
    load_state_checked,
    load_train_state,
    read_weights,
    save_run,
    save_train_state,
    versions,
)
from vitcompress.steps.recipe import Recipe, apply_recipe, as_recipe, check_recipe_names
from vitcompress.steps.registry import StepContext, describe_structure
from vitcompress.train import TrainConfig, evaluate, pick_device, train

# Sizes the built-in sources come in; an image folder has none (its images are resized).
NATIVE_SIZE = {"fashion-mnist": 28, "cifar10": 32}


def data_kind(spec: str) -> str:
    return spec.partition(":")[0]


def resolve_img_size(spec: str, preset_cfg: dict, img_size: int | None) -> int:
    """--img-size if given, else the data's native size, else the preset's own."""
    if img_size:
        return img_size
    return NATIVE_SIZE.get(data_kind(spec), preset_cfg["img_size"])


def loaders(data_cfg: dict, batch_size: int, eval_batch_size: int = 256):
    """(train loader, test loader, info) for a run's data section."""
    from vitcompress.data import load_data, make_loader

    train_ds, test_ds, info = load_data(
        data_cfg["spec"],
        img_size=data_cfg["img_size"],
        seed=data_cfg.get("seed", 0),
        augment=data_cfg.get("augment", True),
        limit=data_cfg.get("limit"),
        channels=data_cfg.get("channels"),
    )
    seed = data_cfg.get("seed", 0)
    train_loader = make_loader(train_ds, batch_size, shuffle=True, seed=seed)
    test_loader = make_loader(test_ds, eval_batch_size, shuffle=False, seed=seed)
    return train_loader, test_loader, info


def load_teacher(path: Path, model_cfg: dict) -> nn.Module:
    teacher, tcfg = load_run(path)
    t = tcfg["model"]
    for key in ("img_size", "in_chans", "num_classes"):
        if t.get(key) != model_cfg.get(key):
            raise VitcompressError(
                f"teacher {path} has {key}={t.get(key)}, the student {model_cfg.get(key)}"
            )
    return teacher


def _check_out(out: Path, resume: bool, force: bool) -> None:
    if resume or not out.exists():
        return
    finished = (out / METRICS).is_file()
    interrupted = (out / TRAIN_STATE).is_file()
    if not (finished or interrupted or (out / WEIGHTS).exists() or (out / PACKED).exists()):
        return
    if force:
        for name in (WEIGHTS, PACKED, CONFIG, METRICS, TRAIN_STATE):
            (out / name).unlink(missing_ok=True)
        return
    what = "a finished run" if finished else "an interrupted run (use --resume to continue)"
    raise VitcompressError(f"{out} already holds {what}; pass --force to start over")


def train_run(
    model: str,
    data: str,
    out: Path,
    config: TrainConfig | None = None,
    *,
    teacher: Path | None = None,
    init_from: Path | None = None,
    channels: int | None = None,
    limit: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
) -> dict:
    """Train preset ``model`` on data source ``data`` into run directory ``out`` as ``config``
    says; returns its metrics.

    ``teacher``: a run directory to distil from (``config.distill`` defaults to hard then).
    ``init_from``: a run directory of the same model whose weights start this training (a fresh
    schedule and optimizer; for continuing a finished run with more epochs). ``resume``: go on
    with the interrupted run in ``out`` exactly where its last epoch ended.
    """
    from dataclasses import replace

    out = Path(out)
    cfg = config or TrainConfig()
    if cfg.distill and teacher is None:
        raise VitcompressError("--distill needs --teacher RUN_DIR")
    if teacher is not None and not cfg.distill:
        cfg = replace(cfg, distill="hard")
    _check_out(out, resume, force)
    if resume:
        saved = read_json(out / CONFIG)
        model_cfg, data_cfg = saved["model"], saved["data"]
        cfg = TrainConfig.from_dict(saved["train"], f"{out / CONFIG}: train")
        teacher = Path(saved["teacher"]) if saved.get("teacher") else None
        init_from = Path(saved["init_from"]) if saved.get("init_from") else None
    else:
        preset = model_config(model)
        size = resolve_img_size(data, preset, cfg.img_size)
        data_cfg = {
            "spec": data,
            "img_size": size,
            "seed": cfg.seed,
            "augment": cfg.augment,
            "limit": limit,
            "channels": channels,
        }
        model_cfg = None
    torch.manual_seed(cfg.seed)
    train_loader, test_loader, info = loaders(data_cfg, cfg.batch_size)
    if model_cfg is None:
        is_vit = model_config(model)["arch"] == "vit"
        extra = {"drop_path_rate": cfg.drop_path} if cfg.drop_path and is_vit else {}
        model_cfg = model_config(
            model,
            img_size=data_cfg["img_size"],
            patch_size=cfg.patch_size,
            in_chans=info.channels,
            num_classes=len(info.classes),
            **extra,
        )
    torch.manual_seed(cfg.seed)
    net = build_model(model_cfg)
    if init_from is not None and not resume:
        init_w = Path(init_from) / WEIGHTS
        load_state_checked(net, read_weights(init_w), str(init_w))
    teacher_net = load_teacher(teacher, model_cfg) if teacher is not None else None
    run_config = {
        "model": model_cfg,
        "data": {**data_cfg, "classes": list(info.classes), "mean": list(info.mean),
                 "std": list(info.std)},
        "train": cfg.to_dict(),
        "teacher": str(teacher) if teacher is not None else None,
        "init_from": str(init_from) if init_from is not None else None,
        "seed": cfg.seed,
        "command": " ".join(["vitcompress", *sys.argv[1:]]) if sys.argv else None,
        "versions": versions(),
    }  # fmt: skip
    state = load_train_state(out, net) if resume else None

    def checkpoint(epochs_done: int, net_: nn.Module, opt, progress: dict) -> None:
        save_run(out, net_, run_config, None)
        save_train_state(out, opt, epochs_done, {**progress, "epochs_done": epochs_done})

    dev = pick_device(device)
    metrics = train(
        net, train_loader, test_loader, cfg, teacher=teacher_net, resume=state, device=dev,
        on_epoch_end=checkpoint,
    )  # fmt: skip
    net.cpu()
    metrics.update(
        {
            "params_total": params_total(net),
            "params_nonzero": params_nonzero(net),
            "bytes_fp32": 4 * params_total(net),
            "device": str(dev),
            "threads": torch.get_num_threads(),
        }
    )
    save_run(out, net, run_config, metrics)
    (out / TRAIN_STATE).unlink(missing_ok=True)
    return metrics


def evaluate_run(
    checkpoint: Path, data: str | None = None, limit: int | None = None, device: str = "auto"
) -> dict:
    """Evaluate a run directory on its own test split (or another data spec of the same shape)."""
    model, config = load_run(checkpoint)
    data_cfg = dict(config["data"])
    if data:
        data_cfg["spec"] = data
    if limit:
        data_cfg["limit"] = limit
    data_cfg["augment"] = False
    data_cfg["channels"] = config["model"]["in_chans"]
    _, test_loader, info = loaders(data_cfg, 256)
    if len(info.classes) != config["model"]["num_classes"]:
        raise VitcompressError(
            f"data {data_cfg['spec']} has {len(info.classes)} classes, the model "
            f"{config['model']['num_classes']}"
        )
    dev = pick_device(device)
    m = evaluate(model.to(dev), test_loader, dev)
    model.cpu()
    m.update(
        {
            "params_total": params_total(model),
            "params_nonzero": params_nonzero(model),
            "checkpoint": str(checkpoint),
            "data": data_cfg["spec"],
        }
    )
    return m


def _calib_loader(data_cfg: dict, batch_size: int = 64):
    """Training images without augmentation, in a fixed shuffled order, for calibration."""
    from vitcompress.data import load_data, make_loader

    train_ds, _, _ = load_data(
        data_cfg["spec"],
        img_size=data_cfg["img_size"],
        seed=data_cfg.get("seed", 0),
        augment=False,
        limit=data_cfg.get("limit"),
        channels=data_cfg.get("channels"),
    )
    return make_loader(train_ds, batch_size, shuffle=True, seed=data_cfg.get("seed", 0) + 1)


def compress_run(
    checkpoint: Path,
    recipe: Recipe | dict | str | Path,
    out: Path,
    data: str | None = None,
    limit: int | None = None,
    device: str = "auto",
    force: bool = False,
    speed: bool = True,
) -> dict:
    """Apply a recipe (a :class:`Recipe`, a mapping, a YAML file or a built-in name) to a trained
    run directory, evaluate, measure, and write run directory ``out`` (its weights packed).

    Everything about the recipe (keys, values, layer patterns, teacher paths) is checked before
    any work starts. ``metrics.json`` is written last, so a run directory with it is complete.
    """
    import copy
    import time

    t0 = time.perf_counter()
    out = Path(out)
    recipe = as_recipe(recipe)
    model, base_cfg = load_run(checkpoint)
    if base_cfg.get("compression"):
        raise VitcompressError(
            f"{checkpoint} is already compressed; apply recipes to a dense trained run"
        )
    check_recipe_names(recipe, model)
    _check_out(out, False, force)

    data_cfg = dict(base_cfg["data"])
    if data:
        data_cfg["spec"] = data
    if limit:
        data_cfg["limit"] = limit
    data_cfg["channels"] = base_cfg["model"]["in_chans"]
    seed = int(data_cfg.get("seed", 0))
    dev = pick_device(device)
    torch.manual_seed(seed)
    train_loader, test_loader, info = loaders({**data_cfg, "augment": True}, recipe.batch_size())
    if len(info.classes) != base_cfg["model"]["num_classes"]:
        raise VitcompressError(
            f"data {data_cfg['spec']} has {len(info.classes)} classes, the model "
            f"{base_cfg['model']['num_classes']}"
        )
    calib = _calib_loader(data_cfg) if recipe.needs_calibration() else None
    dense = copy.deepcopy(model)

    def teacher_for(spec: str) -> nn.Module:
        if spec == "self":
            return dense
        return load_teacher(Path(spec), base_cfg["model"])

    ctx = StepContext(
        train_loader=train_loader if recipe.needs_training() else None,
        calib_loader=calib,
        device=dev,
        seed=seed,
        teacher_for=teacher_for,
    )
    reports = apply_recipe(model, recipe, ctx)
    model.to(dev)
    metrics = {k: v for k, v in evaluate(model, test_loader, dev).items() if k != "samples"}
    model.cpu()
    config = {
        **base_cfg,
        "compression": describe_structure(model),
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe.hash,
        "base_checkpoint": str(checkpoint),
        "versions": versions(),
    }
    shape = (config["model"]["in_chans"], config["model"]["img_size"], config["model"]["img_size"])
    metrics.update(compression_fields(model, dense, recipe, reports, config))
    if speed:
        metrics.update(speed_fields(model, recipe, shape))
    metrics.update(
        {
            "recipe": recipe.name,
            "recipe_hash": recipe.hash,
            "seed": seed,
            "steps": reports,
            "wall_s": time.perf_counter() - t0,
        }
    )
    save_run(out, model, config, metrics)
    return metrics
