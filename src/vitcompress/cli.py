"""The ``vitcompress`` command. Thin: it parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vitcompress.errors import VitcompressError
from vitcompress.fileio import dumps_strict


def _add_model_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, help="input image size in pixels")
    p.add_argument("--patch", type=int, help="patch size (ViT/DeiT)")
    p.add_argument("--channels", type=int, help="input channels")
    p.add_argument("--classes", type=int, help="number of classes")


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from vitcompress.measure import flops_per_image
    from vitcompress.models import PRESETS, build_model, model_config

    rows = []
    for name in PRESETS:
        cfg = model_config(
            name,
            img_size=args.img_size,
            patch_size=args.patch,
            in_chans=args.channels,
            num_classes=args.classes,
        )
        with torch.device("meta"):  # shapes only: no memory, no random init
            model = build_model(cfg)
        shape = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "gflops": flops_per_image(model, shape) / 1e9,
                "img_size": cfg["img_size"],
                "patch_size": cfg.get("patch_size"),
                "in_chans": cfg["in_chans"],
                "num_classes": cfg["num_classes"],
            }
        )
    from vitcompress.zoo import table

    zoo = table()
    if args.json:
        print(dumps_strict([*rows, *({"model": z["name"], **z} for z in zoo)]))
        return 0
    print(f"{'model':<14}{'params':>12}{'GFLOPs':>10}  input")
    for r in rows:
        patch = f"/{r['patch_size']}" if r["patch_size"] else ""
        size = f"{r['in_chans']}x{r['img_size']}x{r['img_size']}{patch}, {r['num_classes']} classes"
        print(f"{r['model']:<14}{r['params'] / 1e6:>11.2f}M{r['gflops']:>10.3f}  {size}")
    print("GFLOPs: floating-point operations per image, 2 per multiply-add (GMACs = GFLOPs / 2).")
    if zoo:
        print("\nShipped models (use the name wherever a run directory goes):")
        for z in zoo:
            t = f"{z['train_s'] / 60:.0f} min" if z.get("train_s") else "?"
            top1 = f"top-1 {z['top1'] * 100:.2f} % on {z['test_images']:,} test images"
            print(f"  {z['name']:<28}{z['params'] / 1e6:>7.2f}M  {top1}, trained in {t}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vitcompress.train import TrainConfig
    from vitcompress.workflows import train_run

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        img_size=args.img_size,
        patch_size=args.patch,
        distill=args.distill,
        distill_alpha=args.distill_alpha,
        distill_tau=args.distill_tau,
        augment="none" if args.no_augment else args.augment,
        seed=args.seed,
        drop_path=args.drop_path,
        amp=args.amp,
    )
    metrics = train_run(
        args.model,
        args.data,
        Path(args.out),
        config,
        teacher=Path(args.teacher) if args.teacher else None,
        init_from=Path(args.init_from) if args.init_from else None,
        channels=args.channels,
        limit=args.limit,
        resume=args.resume,
        force=args.force,
        device=args.device,
    )
    print(_metrics_line(metrics))
    print(f"run directory: {args.out}")
    return 0


def _metrics_line(m: dict) -> str:
    return (
        f"top-1 {m['top1'] * 100:.2f} %  top-5 {m['top5'] * 100:.2f} %  loss {m['loss']:.4f}  "
        f"params {m['params_total']:,} (non-zero {m['params_nonzero']:,})"
    )


def cmd_import(args: argparse.Namespace) -> int:
    from vitcompress.imports import import_run

    sizes = {"num_heads": args.num_heads} if args.num_heads else {}
    m = import_run(
        args.source, Path(args.out), preset=args.model, data=args.data, limit=args.limit,
        force=args.force, device=args.device, **sizes,
    )  # fmt: skip
    if args.json:
        print(dumps_strict(m))
        return 0
    line = f"imported {args.source}: {m['params_total']:,} parameters"
    if "top1" in m:
        line += f"; top-1 {m['top1'] * 100:.2f} % on {args.data} ({m['samples']:,} images)"
    print(line)
    print(f"run directory: {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vitcompress.workflows import evaluate_run

    m = evaluate_run(
        Path(args.checkpoint), data=args.data, limit=args.limit, device=args.device,
        allow_nonfinite=args.allow_nonfinite,
    )  # fmt: skip
    if args.json:
        print(dumps_strict(m))
    else:
        print(_metrics_line(m))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from vitcompress.workflows import compress_run

    m = compress_run(
        Path(args.checkpoint),
        args.recipe,
        Path(args.out),
        data=args.data,
        limit=args.limit,
        device=args.device,
        force=args.force,
        speed=not args.no_speed,
    )
    if args.json:
        print(dumps_strict(m))
        return 0
    print(_metrics_line(m))
    ratio = m["bytes_fp32"] / m["bytes_stored"] if m.get("bytes_stored") else float("nan")
    lat = m.get("latency_ms_b1")
    if "runtime" not in m:
        speed = "speed not measured (--no-speed)"
    elif lat is None:
        speed = f"latency not measured: {m['runtime']} (no CPU kernel for {m['format']})"
    else:
        speed = f"latency b1 {lat:.2f} ms, {m['throughput_b32']:.1f} img/s at b32 on {m['runtime']}"
    print(
        f"stored {m['bytes_stored']:,} bytes ({ratio:.2f}x smaller than fp32 "
        f"{m['bytes_fp32']:,}); sparsity {m['sparsity'] * 100:.2f} %; {speed}"
    )
    print(f"run directory: {args.out}")
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from vitcompress.workflows import allocate_run

    res = allocate_run(
        Path(args.checkpoint), args.budget, Path(args.out), metric=args.metric,
        layers=args.layers.split(",") if args.layers else "*", rest=args.rest,
        batches=args.batches, data=args.data, limit=args.limit,
    )  # fmt: skip
    if args.json:
        print(dumps_strict(res))
        return 0
    for layer, cand in res["assignment"].items():
        print(f"  {layer:<28} {cand}")
    unit = "bytes" if res["metric"] == "bytes" else "BOPs"
    print(
        f"predicted {res['predicted']:,.0f} {unit} for a budget of {res['budget']:,.0f} "
        f"(dense fp32 {res['dense']:,.0f}: {res['dense'] / res['predicted']:.2f}x), summed "
        f"damage {res['damage']:.4f} nats/image"
    )
    print(f"recipe: {res['recipe']}  (vitcompress compress --checkpoint {args.checkpoint} "
          f"--recipe {res['recipe']} --out RUN)")  # fmt: skip
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from vitcompress.cost import cost_report, format_cost
    from vitcompress.export import input_shape_of
    from vitcompress.runs import load_run

    model, config = load_run(Path(args.checkpoint))
    report = cost_report(model, input_shape_of(config), config)
    print(dumps_strict(report) if args.json else format_cost(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vitcompress.export import export_cli

    path = export_cli(Path(args.checkpoint), args.format, Path(args.out), args.fused_attention)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vitcompress.bench import bench_cli

    if bool(args.checkpoint) == bool(args.model):
        raise VitcompressError("give exactly one of --checkpoint RUN_DIR or --model PRESET")
    bench_cli(
        Path(args.checkpoint) if args.checkpoint else None,
        args.model,
        args.img_size,
        args.threads or os.cpu_count() or 1,
        args.json,
        [Path(c) for c in args.compare],
        [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None,
        args.passes,
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vitcompress.studies import run_sweep

    run_sweep(
        args.study,
        Path(args.out),
        jobs=args.jobs,
        executor=args.executor,
        address=args.address,
        data=args.data,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vitcompress.findings import findings, format_findings
    from vitcompress.report import build_report
    from vitcompress.studies.store import read_results

    path = build_report(Path(args.results))
    print(format_findings(findings(read_results(path.parent))))
    print(f"report: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vitcompress.demo import run_demo

    run_demo(Path(args.out))
    return 0


class _Help(argparse.HelpFormatter):
    """--help with every option's default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == [] or d == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


def _command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return sub.add_parser(name, formatter_class=_Help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    import vitcompress
    from vitcompress.train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="vitcompress",
        description="Compress Vision Transformers and measure what it costs.",
        formatter_class=_Help,
    )
    parser.add_argument(
        "--version", action="version", version=f"vitcompress {vitcompress.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "models", help="list model presets with parameters and GFLOPs")
    _add_model_size_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    d = TrainConfig()  # the defaults, from their one place
    p = _command(sub, "train", help="train a model (optionally distilled from a teacher)")
    p.add_argument(
        "--model", help="preset, e.g. vit-micro, deit-tiny, resnet18 (not with --init-from)"
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist[:DIR] | imagefolder:PATH | cifar10:PATH",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the data")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="of targets")
    p.add_argument(
        "--drop-path", type=float, default=d.drop_path, help="stochastic depth rate (ViT)"
    )
    p.add_argument(
        "--amp",
        choices=["bf16", "fp16"],
        help="mixed precision: bf16 autocast (faster for the ResNet teacher on a CPU with "
        "native bf16; falls back to fp32 on one without), fp16 on CUDA only",
    )
    p.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        help="start from this run's weights (trained here or imported) with a fresh schedule; "
        "new class heads for data with other classes, position embedding resampled for "
        "another --img-size, patch embedding adapted for other --channels",
    )
    _add_model_size_args(p)
    p.add_argument("--teacher", help="run directory of a trained teacher")
    p.add_argument("--distill", choices=["soft", "hard"], help="distillation kind (with --teacher)")
    p.add_argument(
        "--distill-alpha", type=float, default=d.distill_alpha, help="weight of the teacher"
    )
    p.add_argument("--distill-tau", type=float, default=d.distill_tau, help="soft temperature")
    p.add_argument(
        "--augment",
        choices=["crop+flip", "flip", "crop", "none"],
        default="crop+flip",
        help="training augmentation: random crop with padding and/or horizontal flip",
    )
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--seed", type=int, default=d.seed, help="weights, data order, splits")
    p.add_argument("--limit", type=int, help="use only the first N images of each split")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.set_defaults(func=cmd_train)

    p = _command(
        sub,
        "import",
        help="a Hugging Face or timm ViT/DeiT as a run directory",
        description="Convert a Hugging Face save_pretrained folder (ViTForImageClassification, "
        "DeiTForImageClassification[WithTeacher]), a timm hub folder or a timm state-dict file "
        "to vitcompress's ViT (same logits) and write a run directory that every other command "
        "takes.",
    )
    p.add_argument("source", help="HF folder, timm folder, or timm weight file (.safetensors/.pth)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--model",
        help="for a timm weight file: our preset (vit-small, deit-tiny, ...) or a timm name "
        "(vit_small_patch16_224), which give the number of heads the weights do not",
    )
    p.add_argument("--num-heads", type=int, help="for a timm weight file of no known name")
    p.add_argument("--data", help="evaluate on this data (same classes) and keep it as the run's")
    p.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = _command(sub, "evaluate", help="top-1/top-5/loss and parameter counts of a run")
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--data", help="data spec (default: the run's own)")
    p.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--allow-nonfinite", action="store_true",
        help="load weights holding NaN or Inf (to debug a broken run)",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    p = _command(sub, "compress", help="apply a recipe (YAML) to a trained run, evaluate, measure")
    p.add_argument("--checkpoint", required=True, help="run directory of a trained model")
    p.add_argument("--recipe", required=True, help="recipe YAML file, or a built-in recipe by name")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--data", help="data spec (default: the checkpoint's own)")
    p.add_argument("--limit", type=int, help="use only the first N images of each split")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--no-speed", action="store_true", help="skip latency/throughput measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = _command(
        sub, "allocate",
        help="choose per-layer formats / sparsity under a size or BOPs budget, as a recipe",
        description="Measure how much each layer suffers from each candidate setting (alone, "
        "KL divergence from the dense model on calibration images), then choose the per-layer "
        "assignment with the least summed damage that fits the budget; write it as a recipe.",
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="run directory of a dense model")
    p.add_argument("--budget", required=True, help="8x (vs dense fp32), 150KB, 1.2MB, 2.5G (BOPs)")
    p.add_argument("--metric", choices=["bytes", "bops"], default="bytes")
    p.add_argument("--layers", help="comma-separated layer patterns to allocate (default: all)")
    p.add_argument("--rest", default="int8", help="precision of the other parameters")
    p.add_argument("--batches", type=int, default=4, help="calibration batches of 64 images")
    p.add_argument("--data", help="data spec (default: the run's own)")
    p.add_argument("--limit", type=int, help="use only the first N images of each split")
    p.add_argument("--out", required=True, help="recipe file to write (YAML)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_allocate)

    p = _command(
        sub, "cost",
        help="per layer and in total: MACs, BOPs, weight bits stored, activation memory",
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)

    p = _command(sub, "export", help="export a run as ONNX or as a packed checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument(
        "--format",
        required=True,
        choices=["onnx", "onnx-fp16", "onnx-dynamic", "packed"],
        help="onnx: fp32, or INT8 QDQ for an int8 run; onnx-fp16: half precision; "
        "onnx-dynamic: onnxruntime's quantize_dynamic of the fp32 export; packed: the "
        "compressed checkpoint as stored",
    )
    p.add_argument("--out", required=True, help="file to write (model.onnx / model.packed)")
    p.add_argument(
        "--fused-attention",
        action="store_true",
        help="attention as onnxruntime's MultiHeadAttention kernel (faster in onnxruntime; "
        "a com.microsoft operator that other ONNX tools do not know)",
    )
    p.set_defaults(func=cmd_export)

    p = _command(sub, "bench", help="latency and throughput on torch and onnxruntime")
    p.add_argument("--checkpoint", help="run directory to benchmark")
    p.add_argument("--model", help="a preset with random weights (speed only)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--compare", action="append", default=[], metavar="RUN_DIR",
        help="a compressed run of the same model (compress output) to time on onnxruntime "
        "against its torch fp32 baseline; repeatable",
    )  # fmt: skip
    p.add_argument(
        "--variants", metavar="A,B,...",
        help="comma-separated variants (default: all; e.g. torch-fp32,ort-int8-qdq-mha; any "
        "onnxruntime variant takes -mha for fused attention)",
    )  # fmt: skip
    p.add_argument("--passes", type=int, default=3,
                   help="passes over the variants (more: fairer on a busy machine)")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    p = _command(sub, "sweep", help="run a whole study (grid of recipes) into SQLite, resumably")
    p.add_argument(
        "--study",
        required=True,
        help="study YAML, or a built-in: smoke, seed, seed-scratch, seed-full",
    )
    p.add_argument("--out", required=True, help="directory for runs and results.sqlite")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel on this machine")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address HOST:PORT (with --executor ray)")
    p.add_argument("--data", help="data spec overriding the study's")
    p.set_defaults(func=cmd_sweep)

    p = _command(sub, "report", help="plots and report.html from a sweep's results")
    p.add_argument("results", help="sweep output directory (holding results.sqlite)")
    p.set_defaults(func=cmd_report)

    p = _command(sub, "demo", help="the main job: the seed study on Fashion-MNIST + report")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VitcompressError as e:
        print(f"vitcompress {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitcompress {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
