"""Issue 3's table: every compression of the studies applied to one trained baseline.

    python benchmarks/compression_table.py --checkpoint runs/fmnist/vit-micro \
        --out runs/fmnist/table [--finetune-steps 300]

Each row is a real `compress_run` (evaluated on the full test split, bytes as packed on disk,
latency on the runtime that executes the format), written to OUT/<row>/ and resumable: a row
whose run directory is complete is read back, not recomputed. Prints a markdown table and
writes it to OUT/table.md and OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vitcompress.errors import VitcompressError
from vitcompress.fileio import read_json
from vitcompress.runs import METRICS
from vitcompress.workflows import compress_run

SPARSITIES = [0.5, 0.75, 0.875, 0.9375, 0.96875]


def rows(ft_steps: int) -> list[tuple[str, list[dict]]]:
    def q(**kw):
        base = {"calibration": {"method": "percentile", "batches": 16}}
        return {"quantize": {**base, **kw}}

    ft = {"finetune": {"epochs": 1, "lr": 2e-4, "max_steps": ft_steps,
                       "distill": {"teacher": "self", "kind": "soft"}}}  # fmt: skip
    ft2 = {"finetune": {"epochs": 2, "lr": 2e-4, "batch_size": 128,
                        "distill": {"teacher": "self", "kind": "soft"}}}  # fmt: skip
    smallest = q(weights="int8", activations="int8", granularity="per_tensor", scales="fp16",
                 rest="int8")  # fmt: skip
    out: list[tuple[str, list[dict]]] = [
        ("fp32", [q(weights="fp32", activations="fp32")]),
        ("tf32", [q(weights="tf32", activations="tf32")]),
        ("bf16", [q(weights="bf16", activations="bf16")]),
        ("fp16", [q(weights="fp16", activations="fp16")]),
        ("fp8 e4m3", [q(weights="fp8_e4m3", activations="fp8_e4m3")]),
        ("int8 per-tensor", [q(weights="int8", activations="int8", granularity="per_tensor")]),
        ("int8 per-channel", [q(weights="int8", activations="int8")]),
        ("int8 per-tensor, fp16 scales and rest",
         [q(weights="int8", activations="int8", granularity="per_tensor", scales="fp16",
            rest="fp16")]),
        ("int8 per-channel, fp16 scales and rest",
         [q(weights="int8", activations="int8", scales="fp16", rest="fp16")]),
        ("int8 per-tensor, fp16 scales, int8 rest",
         [q(weights="int8", activations="int8", granularity="per_tensor", scales="fp16",
            rest="int8")]),
        ("int8 per-channel, fp16 scales, int8 rest",
         [q(weights="int8", activations="int8", scales="fp16", rest="int8")]),
        ("int8 per-tensor, int8 attention matmuls",
         [q(weights="int8", activations="int8", granularity="per_tensor",
            attention_matmul="int8")]),
        ("int8 per-channel, int8 attention matmuls",
         [q(weights="int8", activations="int8", attention_matmul="int8")]),
        ("int8 dynamic (per token)", [q(weights="int8", activations="int8", dynamic=True)]),
        ("int4 weight-only, groups of 32",
         [q(weights="int4", activations=None, granularity="per_group", group_size=32)]),
    ]  # fmt: skip
    for s in SPARSITIES:
        out.append((f"unstructured {s:.2%} one-shot", [{"prune": {"sparsity": s}}]))
        out.append(
            (f"unstructured {s:.2%} cubic + fine-tune",
             [{"prune": {"sparsity": s, "schedule": "cubic"}}, ft])
        )  # fmt: skip
    out += [
        ("2:4 one-shot", [{"prune": {"pattern": "2:4"}}]),
        ("2:4 + fine-tune", [{"prune": {"pattern": "2:4"}}, ft]),
        ("2:4 + fine-tune + int8", [{"prune": {"pattern": "2:4"}}, ft,
                                    q(weights="int8", activations="int8")]),
        # stacked, with 2 full epochs of fine-tuning and the smallest INT8
        ("2:4 + 2-epoch fine-tune + int8 (int8 rest)",
         [{"prune": {"pattern": "2:4"}}, ft2, smallest]),
        ("unstructured 50% cubic + 2-epoch fine-tune + int8 (int8 rest)",
         [{"prune": {"sparsity": 0.5, "schedule": "cubic"}}, ft2, smallest]),
        ("SVD rank ratio 0.5 (MLP) + 2-epoch fine-tune + int8 (int8 rest)",
         [{"lowrank": {"rank_ratio": 0.5, "layers": "blocks.*.mlp.*"}}, ft2, smallest]),
        # structured: whole MLP neurons and heads removed, the layers get narrower
        ("shrink MLP 50% one-shot (magnitude)", [{"shrink": {"mlp": 0.5}}]),
        ("shrink MLP 50% one-shot (activation, mean folded into bias)",
         [{"shrink": {"mlp": 0.5, "method": "activation"}}]),
        ("shrink MLP 50% + heads 50% one-shot (activation)",
         [{"shrink": {"mlp": 0.5, "heads": 0.5, "method": "activation"}}]),
        ("shrink MLP 50% (activation) + 2-epoch fine-tune + int8 (int8 rest)",
         [{"shrink": {"mlp": 0.5, "method": "activation"}}, ft2, smallest]),
        ("shrink MLP 50% (magnitude) + 2-epoch fine-tune + int8 (int8 rest)",
         [{"shrink": {"mlp": 0.5}}, ft2, smallest]),
        ("shrink MLP 75% one-shot (magnitude)", [{"shrink": {"mlp": 0.75}}]),
        ("shrink MLP 75% one-shot (activation)",
         [{"shrink": {"mlp": 0.75, "method": "activation"}}]),
        ("shrink MLP 75% (activation) + 2-epoch fine-tune + int8 (int8 rest)",
         [{"shrink": {"mlp": 0.75, "method": "activation"}}, ft2, smallest]),
        ("shrink MLP 50% + heads 50% (activation) + 2-epoch fine-tune + int8 (int8 rest)",
         [{"shrink": {"mlp": 0.5, "heads": 0.5, "method": "activation"}}, ft2, smallest]),
    ]  # fmt: skip
    for r in (0.5, 0.25, 0.125):
        out.append((f"SVD rank ratio {r}", [{"lowrank": {"rank_ratio": r}}]))
        out.append((f"SVD rank ratio {r} + fine-tune", [{"lowrank": {"rank_ratio": r}}, ft]))
    return out


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in keep.split("-") if p)


def fmt_row(name: str, m: dict, base_top1: float) -> str:
    lat = m.get("latency_ms_b1")
    thr = m.get("throughput_b32")
    ratio = m["bytes_fp32"] / m["bytes_stored"]
    return (
        f"| {name} | {m['top1'] * 100:.2f} | {(m['top1'] - base_top1) * 100:+.2f} | "
        f"{m['bytes_stored']:,} | {ratio:.2f}x | {m['sparsity'] * 100:.1f} | "
        f"{'' if lat is None else f'{lat:.2f}'} | {'' if thr is None else f'{thr:.0f}'} | "
        f"{m['runtime']} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--only", help="substring: run only rows whose name contains it")
    ap.add_argument("--no-finetune", action="store_true", help="skip rows that fine-tune")
    args = ap.parse_args()
    out = Path(args.out)
    results = []
    for name, steps in rows(args.finetune_steps):
        if args.only and args.only not in name:
            continue
        if args.no_finetune and any("finetune" in s for s in steps):
            continue
        run = out / slug(name)
        if (run / METRICS).is_file():
            m = read_json(run / METRICS)
        else:
            t0 = time.perf_counter()
            try:
                m = compress_run(
                    Path(args.checkpoint), {"name": slug(name), "steps": steps}, run, force=True
                )
            except VitcompressError as e:
                print(f"{name}: error: {e}")
                continue
            print(f"{name}: top-1 {m['top1']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append((name, m))
    if not results:
        return
    base = next((m for n, m in results if n == "fp32"), results[0][1])
    lines = [
        f"Baseline `{args.checkpoint}`; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| variant | top-1 % | Δ pts | bytes stored | vs fp32 | sparsity % | b1 ms | b32 img/s "
        "| runtime |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + [fmt_row(n, m, base["top1"]) for n, m in results]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps([{"variant": n, **m} for n, m in results], indent=1))


if __name__ == "__main__":
    main()
