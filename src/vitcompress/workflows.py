"""End-to-end jobs behind the CLI: train a run directory, evaluate one.

Each is one function over plain arguments, so the CLI, the sweep runner and tests share them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from vitcompress import step_cache
from vitcompress.cost import model_cost
from vitcompress.errors import VitcompressError
from vitcompress.fileio import read_json
from vitcompress.measure import compression_fields, params_nonzero, params_total, speed_fields
from vitcompress.models import build_model, model_config
from vitcompress.models.transfer import adapt_model
from vitcompress.outputs import (
    building,
    check_output_dir,
    commit_dir,
    output_lock,
    partial_dir,
)
from vitcompress.runs import (
    CONFIG,
    METRICS,
    TRAIN_STATE,
    load_run,
    load_train_state,
    save_run,
    save_train_state,
    versions,
)
from vitcompress.steps.recipe import (
    Recipe,
    apply_recipe,
    as_recipe,
    check_recipe_names,
    parse_recipe,
)
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


def datasets(data_cfg: dict, augment: bool | str | None = None):
    """(train set, test set, info) for a run's data section. A model with its own
    preprocessing (``data_cfg["preprocess"]``: an imported model, or one fine-tuned from it)
    sees its inputs normalised, resized and cropped as it was trained, not by the data's
    statistics."""
    from vitcompress.data import load_data

    prep = data_cfg.get("preprocess") or {}
    return load_data(
        data_cfg["spec"],
        img_size=data_cfg["img_size"],
        seed=data_cfg.get("seed", 0),
        augment=data_cfg.get("augment", True) if augment is None else augment,
        limit=data_cfg.get("limit"),
        channels=data_cfg.get("channels"),
        mean=prep.get("mean"),
        std=prep.get("std"),
        interpolation=prep.get("interpolation", "bilinear"),
        crop_pct=prep.get("crop_pct", 1.0),
        class_order=data_cfg.get("class_order"),
    )


def loaders(data_cfg: dict, batch_size: int, eval_batch_size: int = 256):
    """(train loader, test loader, info) for a run's data section."""
    from vitcompress.data import make_loader

    train_ds, test_ds, info = datasets(data_cfg)
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


def interrupted_dir(out: Path) -> Path:
    """Where the interrupted training for ``out`` waits: ``<out>.partial``, or ``out`` itself
    for a run interrupted before runs were built beside their destination."""
    out = Path(out)
    for d in (partial_dir(out), out):
        if (d / TRAIN_STATE).is_file() and (d / CONFIG).is_file():
            return d
    if (out / METRICS).is_file():
        raise VitcompressError(f"{out} is a finished run (no {TRAIN_STATE}); nothing to resume")
    raise VitcompressError(f"cannot resume: no interrupted training for {out}")


def train_run(
    model: str | None,
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
    ``init_from``: a dense run directory (trained here, or imported) whose weights start this
    training with a fresh schedule: to train longer, or to transfer it to new data. The model
    is the run's (``model`` may be None); it gets new class heads when the data has another
    number of classes, its position embedding resampled (bicubic, as timm) when
    ``config.img_size`` differs from its input size, and its patch embedding adapted when
    ``channels`` differs from its input channels (as timm's ``adapt_input_conv``). Without
    ``img_size`` / ``channels`` it keeps its own (images are resized, gray shown as RGB).
    ``resume``: go on with the interrupted run in ``out`` exactly where its last epoch ended.
    """
    from dataclasses import replace

    out = Path(out)
    cfg = config or TrainConfig()
    if cfg.distill and teacher is None:
        raise VitcompressError("--distill needs --teacher RUN_DIR")
    if teacher is not None and not cfg.distill:
        cfg = replace(cfg, distill="hard")
    check_output_dir(out, force=force, inputs=[teacher, init_from], resume=resume)
    with output_lock(out):
        if resume:
            work = interrupted_dir(out)
            metrics = _train_in(work, model, data, cfg, teacher, init_from, channels, limit,
                                True, device)  # fmt: skip
            if work != out:
                commit_dir(work, out)
            return metrics
        with building(out, keep_resumable=True) as work:
            return _train_in(work, model, data, cfg, teacher, init_from, channels, limit, False,
                             device)  # fmt: skip


def _train_in(
    out: Path,
    model: str | None,
    data: str,
    cfg: TrainConfig,
    teacher: Path | None,
    init_from: Path | None,
    channels: int | None,
    limit: int | None,
    resume: bool,
    device: str,
) -> dict:
    """:func:`train_run`'s work, in run directory ``out`` (the partial one being built)."""
    base = base_cfg = None
    if resume:
        saved = read_json(out / CONFIG)
        model_cfg, data_cfg = saved["model"], saved["data"]
        cfg = TrainConfig.from_dict(saved["train"], f"{out / CONFIG}: train")
        teacher = Path(saved["teacher"]) if saved.get("teacher") else None
        init_from = Path(saved["init_from"]) if saved.get("init_from") else None
    elif init_from is not None:
        base, base_cfg = _init_model(init_from, model)
        m = base_cfg["model"]
        data_cfg = {
            "spec": data,
            "img_size": cfg.img_size or m["img_size"],
            "seed": cfg.seed,
            "augment": cfg.augment,
            "limit": limit,
            "channels": channels or m["in_chans"],
        }
        prep = base_cfg.get("preprocess") or (base_cfg.get("data") or {}).get("preprocess")
        if prep:
            data_cfg["preprocess"] = _prep_for_channels(prep, data_cfg["channels"])
        if base_cfg.get("classes"):  # keep an imported head's label order when it still fits
            data_cfg["class_order"] = base_cfg["classes"]
        model_cfg = None
    else:
        if model is None:
            raise VitcompressError("give a model preset (--model), or --init-from RUN")
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
    if base is not None:
        net, model_cfg = adapt_model(
            base, base_cfg["model"], img_size=data_cfg["img_size"],
            in_chans=data_cfg["channels"], num_classes=len(info.classes),
        )  # fmt: skip
    elif model_cfg is None:
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
    if base is None:
        torch.manual_seed(cfg.seed)
        net = build_model(model_cfg)
    teacher_net = load_teacher(teacher, model_cfg) if teacher is not None else None
    run_config = {
        "model": model_cfg,
        "data": {**data_cfg, "classes": list(info.classes), "mean": list(info.mean),
                 "std": list(info.std)},
        "train": cfg.to_dict(),
        "teacher": str(teacher) if teacher is not None else None,
        "init_from": str(init_from) if init_from is not None else None,
        **{k: base_cfg[k] for k in ("source", "preprocess") if base_cfg and base_cfg.get(k)},
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


def run_data(config: dict, where: Path, data: str | None, limit: int | None) -> dict:
    """The data section a job on a run reads: the run's own, ``data`` instead of its source, at
    the model's input size and channels, with the model's own preprocessing."""
    data_cfg = dict(config.get("data") or {})
    if data:
        data_cfg["spec"] = data
    if not data_cfg.get("spec"):
        raise VitcompressError(
            f"{where} has no data of its own (an imported model): pass --data, e.g. "
            "imagefolder:PATH"
        )
    if limit:
        data_cfg["limit"] = limit
    model = config["model"]
    data_cfg.update(img_size=model["img_size"], channels=model["in_chans"])
    if config.get("preprocess") and not data_cfg.get("preprocess"):
        data_cfg["preprocess"] = config["preprocess"]
    if config.get("classes"):  # an imported model's labels: a folder of them is read in order
        data_cfg["class_order"] = config["classes"]
    return data_cfg


def check_classes(info, model_cfg: dict, spec: str) -> None:
    if len(info.classes) != model_cfg["num_classes"]:
        raise VitcompressError(
            f"data {spec} has {len(info.classes)} classes, the model {model_cfg['num_classes']}"
            " (fine-tune it on this data first: train --init-from RUN --data ...)"
        )


def _init_model(init_from: Path, preset: str | None) -> tuple[nn.Module, dict]:
    """The dense model a training starts from, and its run config."""
    base, base_cfg = load_run(init_from)
    if base_cfg.get("compression"):
        raise VitcompressError(
            f"--init-from {init_from} is a compressed run; start from a dense one (a recipe's "
            "finetune step trains a compressed model)"
        )
    have = base_cfg["model"].get("preset")
    if preset is not None and have is not None and preset != have:
        raise VitcompressError(
            f"--model {preset}, but --init-from {init_from} holds a {have}: leave out --model"
        )
    if preset is not None and have is None:
        raise VitcompressError(
            f"--init-from {init_from} holds an imported model of no preset; leave out --model"
        )
    base.train()
    return base, base_cfg


def _prep_for_channels(prep: dict, channels: int) -> dict:
    """A model's preprocessing for ``channels`` input channels: one mean/std per channel (the
    average repeated when the patch embedding was adapted to another count)."""
    mean, std = list(prep["mean"]), list(prep["std"])
    if len(mean) != channels:
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return {**prep, "mean": mean, "std": std}


def evaluate_run(
    checkpoint: Path,
    data: str | None = None,
    limit: int | None = None,
    device: str = "auto",
    allow_nonfinite: bool = False,
) -> dict:
    """Evaluate a run directory on its own test split (or another data spec of the same shape)."""
    model, config = load_run(checkpoint, allow_nonfinite=allow_nonfinite)
    data_cfg = {**run_data(config, Path(checkpoint), data, limit), "augment": False}
    _, test_loader, info = loaders(data_cfg, 256)
    check_classes(info, config["model"], data_cfg["spec"])
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
    from vitcompress.data import make_loader

    train_ds, _, _ = datasets(data_cfg, augment=False)
    return make_loader(train_ds, batch_size, shuffle=True, seed=data_cfg.get("seed", 0) + 1)


def compressed_config(base_cfg: dict, checkpoint: Path | str, recipe: Recipe,
                      model: nn.Module | None = None) -> dict:  # fmt: skip
    """The config a compressed run stores (and its packed file's header holds, so its size
    counts in ``bytes_stored``): the base run's, the recipe, where it came from, versions."""
    return {
        **base_cfg,
        "compression": describe_structure(model) if model is not None else None,
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe.hash,
        "base_checkpoint": str(checkpoint),
        "versions": versions(),
    }


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
    import time

    t0 = time.perf_counter()
    out = Path(out)
    recipe = as_recipe(recipe)
    check_output_dir(out, force=force, inputs=[checkpoint])
    model, base_cfg = load_run(checkpoint)
    if base_cfg.get("compression"):
        raise VitcompressError(
            f"{checkpoint} is already compressed; apply recipes to a dense trained run"
        )
    check_recipe_names(recipe, model)
    with output_lock(out), building(out) as partial:
        return _compress_into(partial, checkpoint, model, base_cfg, recipe, data, limit, device,
                              speed, t0)  # fmt: skip


def _compress_into(
    out: Path,
    checkpoint: Path,
    model: nn.Module,
    base_cfg: dict,
    recipe: Recipe,
    data: str | None,
    limit: int | None,
    device: str,
    speed: bool,
    t0: float,
) -> dict:
    """:func:`compress_run`'s work, written to run directory ``out`` (the partial one)."""
    import copy
    import time

    data_cfg = run_data(base_cfg, Path(checkpoint), data, limit)
    seed = int(data_cfg.get("seed", 0))
    dev = pick_device(device)
    torch.manual_seed(seed)
    train_loader, test_loader, info = loaders({**data_cfg, "augment": True}, recipe.batch_size())
    check_classes(info, base_cfg["model"], data_cfg["spec"])
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
    # a run with the same fine-tuned prefix just before (a grid's formats) continues from it
    cache_context = {
        "checkpoint": step_cache.checkpoint_identity(checkpoint), "data": data_cfg, "seed": seed,
        "batch_size": recipe.batch_size(), "device": str(dev),
    }  # fmt: skip
    reused, cached, cached_reports = step_cache.lookup(cache_context, recipe)
    if cached is not None:
        model = cached
        ctx.reports.update(cached_reports)
    n_prefix = step_cache.prefix_len(recipe)

    def keep_prefix(i: int) -> None:
        if i + 1 == n_prefix and not ctx.deferred:
            step_cache.store(cache_context, recipe, n_prefix, model, ctx.reports)

    reports = apply_recipe(model, recipe, ctx, start=reused, after_step=keep_prefix)
    model.to(dev)
    metrics = evaluate(model, test_loader, dev)  # top1, top5, loss and the images they used
    model.cpu()
    config = compressed_config(base_cfg, checkpoint, recipe, model)
    shape = (config["model"]["in_chans"], config["model"]["img_size"], config["model"]["img_size"])
    metrics.update(compression_fields(model, dense, recipe, reports, config))
    metrics.update(model_cost(model, shape, config))
    if speed:
        metrics.update(speed_fields(model, recipe, shape))
    metrics.update(
        {
            "recipe": recipe.name,
            "recipe_hash": recipe.hash,
            "seed": seed,
            "steps": reports,
            "steps_reused": reused,
            "wall_s": time.perf_counter() - t0,
        }
    )
    save_run(out, model, config, metrics)
    return metrics


def allocate_run(
    checkpoint: Path,
    budget: str,
    out: Path,
    *,
    metric: str = "bytes",
    layers: str | list[str] = "*",
    rest: str = "int8",
    batches: int = 4,
    data: str | None = None,
    limit: int | None = None,
) -> dict:
    """Choose per-layer settings of a dense run that fit ``budget`` (``vitcompress.allocate``)
    and write them as recipe ``out`` (YAML); returns the allocation as plain data."""
    import yaml

    from vitcompress.allocate import allocate, allocation_recipe
    from vitcompress.data import make_loader
    from vitcompress.export import input_shape_of
    from vitcompress.fileio import atomic_write_bytes
    from vitcompress.outputs import check_output_file

    out = Path(out)
    check_output_file(out)
    model, config = load_run(checkpoint)
    if config.get("compression"):
        raise VitcompressError(f"{checkpoint} is already compressed; allocate on a dense run")
    data_cfg = run_data(config, Path(checkpoint), data, limit)
    train_ds, _, _ = datasets(data_cfg, augment=False)
    calib = make_loader(train_ds, 64, shuffle=True, seed=data_cfg.get("seed", 0) + 1)
    name = f"alloc-{metric}-{budget}"

    def run_config(recipe: dict) -> dict:  # what `compress --checkpoint CHECKPOINT` will pack
        return compressed_config(config, checkpoint, parse_recipe(recipe))

    alloc = allocate(model, calib, config, input_shape_of(config), budget, metric,
                     layers=layers, batches=batches, rest=rest, name=name,
                     config_for=run_config)  # fmt: skip
    recipe = allocation_recipe(alloc, name)
    parse_recipe(recipe)  # what is written must be a recipe compress takes
    with output_lock(out):
        text = yaml.safe_dump(recipe, sort_keys=False, width=100)
        atomic_write_bytes(out, f"# vitcompress allocate {budget} ({metric})\n{text}".encode())
    return {
        "metric": alloc.metric, "budget": alloc.budget, "dense": alloc.dense_cost,
        "predicted": alloc.predicted_cost, "damage": alloc.predicted_damage,
        "assignment": alloc.assignment, "recipe": str(out),
    }  # fmt: skip
