"""How long a compressed run takes to load: packed (model.packed, what runs store now) against
the dense safetensors of dequantised weights that compressed runs stored before. Writes
benchmarks/LOAD_TIME.md. Random weights: loading time does not depend on their values."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitcompress.models import build_model, model_config
from vitcompress.runs import CONFIG, METRICS, WEIGHTS, load_run, save_run, save_weights
from vitcompress.steps.recipe import apply_recipe, parse_recipe
from vitcompress.steps.registry import StepContext, describe_structure

RECIPES = {
    "int8": [{"quantize": {"weights": "int8", "activations": "int8"}}],
    "2:4 + int8": [{"prune": {"pattern": "2:4"}}, {"quantize": {"weights": "int8"}}],
    "int4 per-group": [{"quantize": {"weights": "int4", "granularity": "per_group",
                                     "group_size": 64, "activations": None}}],
    "lowrank 0.5": [{"lowrank": {"rank_ratio": 0.5}}],
}  # fmt: skip


def _median_load(run: Path, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        load_run(run)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="vit-tiny,vit-small")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "LOAD_TIME.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for preset in args.models.split(","):
        cfg = model_config(preset, img_size=224, num_classes=45)
        torch.manual_seed(0)
        calib = [torch.randn(2, 3, 224, 224)]
        for name, steps in RECIPES.items():
            model = build_model(cfg).eval()
            apply_recipe(model, parse_recipe({"name": "r", "steps": steps}),
                         StepContext(calib_loader=calib))  # fmt: skip
            with tempfile.TemporaryDirectory() as d:
                packed, legacy = Path(d) / "packed", Path(d) / "legacy"
                save_run(packed, model, {"model": cfg}, {})
                # what a compressed run held before: dequantised weights + structure records
                legacy.mkdir()
                save_weights(model, legacy / WEIGHTS)
                config = {"model": cfg, "compression": describe_structure(model)}
                (legacy / CONFIG).write_text(json.dumps(config))
                (legacy / METRICS).write_text("{}")
                size = {p: sum(f.stat().st_size for f in p.iterdir()) for p in (packed, legacy)}
                t_packed = _median_load(packed, args.repeats)
                t_legacy = _median_load(legacy, args.repeats)
            rows.append((preset, name, size[legacy], size[packed], t_legacy, t_packed))
            print(rows[-1], flush=True)
    lines = [
        "# Loading a compressed run: packed against dense safetensors",
        "",
        f"Written by `benchmarks/load_time.py` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 2 threads; median of {args.repeats} `load_run` calls, "
        "random weights at 224x224, 45 classes.",
        "",
        "| model | recipe | run on disk before (safetensors) | run on disk now (packed) | "
        "load before ms | load now ms |",
        "|---|---|---|---|---|---|",
    ]
    for preset, name, sb, sp, tb, tp in rows:
        lines.append(f"| {preset} | {name} | {sb:,} | {sp:,} | {tb:.0f} | {tp:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
