"""Outlier handling, one-shot on a trained run: W8A8 / W6A6 / W4A8 with plain calibration,
SmoothQuant, the log2 / twin activation grids and both; plain against whitened SVD.

    python benchmarks/outliers.py --checkpoint zoo:vit-nano-fmnist \
        [--checkpoint zoo:vit-micro-fmnist] [--limit N] [--out benchmarks/OUTLIERS.md] \
        [--work DIR] [--only W6A6]

Weights per output channel, activations per tensor with static (calibrated) scales; each format
once with the attention dot products in float and once with them quantised too (same format as
the activations). Every row is a real ``compress_run`` on the run's full test split (``--limit``
takes the first N images of each split), with its bytes as packed. "apply s" is the time the
recipe itself takes on the CPU (calibration passes, searches, factorisations), measured on a
copy of the model apart from evaluation and packing. Rows already complete in ``--work`` are
read back, not recomputed. Writes the markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from vitcompress.fileio import read_json
from vitcompress.runs import METRICS, load_run
from vitcompress.steps.recipe import compress_, parse_recipe
from vitcompress.workflows import _calib_loader, compress_run, evaluate_run, run_data

FORMATS = {"W8A8": ("int8", "int8"), "W6A6": ("int6", "int6"), "W4A8": ("int4", "int8")}


def rows(alpha: float, calibration: str) -> list[tuple[str, str, str, list[dict]]]:
    """``(format, attention, method, steps)`` of every row."""

    def q(w: str, a: str, attn: bool, **kw) -> dict:
        opts = {"weights": w, "activations": a, "granularity": "per_channel",
                "calibration": {"method": calibration}, **kw}  # fmt: skip
        if attn:
            opts["attention_matmul"] = a
        return {"quantize": opts}

    smooth = {"smooth": {"alpha": alpha}}
    out = []
    for name, (w, a) in FORMATS.items():
        for attn in (False, True):
            where = "quantised" if attn else "float"
            twin = {"gelu_quant": "twin", **({"softmax_quant": "twin"} if attn else {})}
            methods = [
                ("plain", [q(w, a, attn)]),
                ("+smooth", [smooth, q(w, a, attn)]),
                ("+twin" if attn else "+twin (fc2)", [q(w, a, attn, **twin)]),
            ]
            if attn:
                log2 = {"gelu_quant": "twin", "softmax_quant": "log2"}
                methods.append(("+log2 (A) / twin (fc2)", [q(w, a, attn, **log2)]))
            methods.append(("+smooth +twin", [smooth, q(w, a, attn, **twin)]))
            out += [(name, where, m, steps) for m, steps in methods]
    for method in ("svd", "whitened"):
        lr = {"lowrank": {"rank_ratio": 0.5, "layers": "blocks.*.mlp.*", "method": method}}
        out.append(("fp32", "float", f"lowrank 0.5 MLP, {method}", [lr]))
    return out


def slug(*parts: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in " ".join(parts).lower())
    return "-".join(p for p in keep.split("-") if p)


def apply_seconds(model: torch.nn.Module, steps: list[dict], calib) -> float:
    """Wall time of the recipe applied to a copy of ``model`` (nothing evaluated or stored)."""
    m = copy.deepcopy(model)
    recipe = parse_recipe({"name": "t", "steps": steps})
    t0 = time.perf_counter()
    compress_(m, recipe, calib_data=calib if recipe.needs_calibration() else None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, action="append",
                    help="a trained dense run (or zoo:NAME); repeat for several")  # fmt: skip
    ap.add_argument("--limit", type=int, help="first N images of each split")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "OUTLIERS.md")
    ap.add_argument("--work", type=Path, help="run directories (default: a temporary one)")
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant alpha")
    ap.add_argument("--calibration", default="minmax", help="activation ranges: minmax|mse|...")
    ap.add_argument("--only", help="substring: only rows whose format/method contains it")
    ap.add_argument("--threads", type=int, help="torch threads (1 on a busy shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)  # type: ignore[union-attr]
    lines = ["# Outlier handling for W8A8 and lower, and data-aware SVD (one-shot)"]
    for checkpoint in args.checkpoint:
        lines += ["", f"## `{checkpoint}`", ""]
        lines += table(checkpoint, work / slug(checkpoint), args)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    if tmp is not None:
        tmp.cleanup()


def table(checkpoint: str, work: Path, args: argparse.Namespace) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    dense, cfg = load_run(checkpoint)
    calib = _calib_loader(run_data(cfg, Path(checkpoint), None, args.limit))
    base = evaluate_run(Path(checkpoint), limit=args.limit)
    print(f"dense: top-1 {base['top1']:.4f} on {base['samples']} test images", flush=True)
    results = []
    for fmt, attn, method, steps in rows(args.alpha, args.calibration):
        if args.only and args.only not in f"{fmt} {method}":
            continue
        run = work / slug(fmt, attn, method)
        if (run / METRICS).is_file():
            m = read_json(run / METRICS)
        else:
            m = compress_run(Path(checkpoint), {"name": slug(fmt, attn, method), "steps": steps},
                             run, limit=args.limit, speed=False, force=True)  # fmt: skip
            m["apply_s"] = apply_seconds(dense, steps, calib)
            (run / METRICS).write_text(json.dumps(m, indent=1))
        print(f"{fmt} attention {attn} {method}: top-1 {m['top1']:.4f}", flush=True)
        results.append((fmt, attn, method, m))
    bytes_fp32 = results[0][3]["bytes_fp32"] if results else 0
    lines = [
        f"Baseline `{checkpoint}` ({cfg['model'].get('preset', 'vit')}), one-shot, "
        f"{base['samples']} test images; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Weights per channel, "
        f"activations per tensor, static ({args.calibration}); SmoothQuant alpha {args.alpha}.",
        "",
        "| format | attention A.V, Q.K | method | top-1 % | Δ vs dense | bytes stored | apply s |",
        "|---|---|---|---|---|---|---|",
        f"| fp32 (dense) | float | - | {base['top1'] * 100:.2f} | | {bytes_fp32:,} | |",
    ]
    for fmt, attn, method, m in results:
        lines.append(
            f"| {fmt} | {attn} | {method} | {m['top1'] * 100:.2f} | "
            f"{(m['top1'] - base['top1']) * 100:+.2f} | {m['bytes_stored']:,} | "
            f"{m['apply_s']:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
