"""The budget allocator against uniform recipes, one-shot (no fine-tune), on trained runs.

    python benchmarks/allocator.py --checkpoint zoo:vit-nano-fmnist \
        [--checkpoint zoo:vit-micro-fmnist] [--budgets 6x,8x,10x] [--out benchmarks/ALLOCATOR.md]

Uniform: every Linear layer gets the same candidate of ``vitcompress.allocate.CANDIDATES``
(int8, int6, int4, int3 and int2 weight-only, 2:4 / 50 % / 75 % sparse + int8, 75 % + int4),
the other parameters int8, written by the allocator's own ``allocation_recipe`` so both sides
are packed alike.
Allocated: the per-layer choice at the fixed budgets (6x, 8x, 10x fewer bytes than fp32) and,
for the comparison at equal bytes, at each uniform recipe's own bytes. Sensitivity is measured
once per model (its time is reported). Every row is a ``compress_run`` evaluated on the run's
whole test split (``--limit`` takes the first N images).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from vitcompress.allocate import (
    CANDIDATES,
    Allocation,
    allocate,
    allocation_recipe,
    parse_budget,
    sensitivity,
)
from vitcompress.errors import VitcompressError
from vitcompress.export import input_shape_of
from vitcompress.runs import load_run
from vitcompress.steps.recipe import parse_recipe
from vitcompress.workflows import (
    _calib_loader,
    compress_run,
    compressed_config,
    evaluate_run,
    run_data,
)

UNIFORM = ("int8", "int6", "int4", "int3", "int2", "2:4+int8", "50%+int8", "75%+int8", "75%+int4")


def table(checkpoint: str, budgets: list[str], limit: int | None, work: Path) -> list[str]:
    model, cfg = load_run(checkpoint)
    calib = _calib_loader(run_data(cfg, Path(checkpoint), None, limit))
    shape = input_shape_of(cfg)
    dense = evaluate_run(Path(checkpoint), limit=limit)
    t0 = time.perf_counter()
    measured = sensitivity(model, calib, cfg, shape)
    sens_s = time.perf_counter() - t0
    choices, dense_bytes, _ = measured
    layers = sorted({c.layer for c in choices})
    print(
        f"{checkpoint}: dense {dense['top1']:.4f}, {dense_bytes:,.0f} B; sensitivity of "
        f"{len(layers)} layers x {len(CANDIDATES)} candidates in {sens_s:.0f} s",
        flush=True,
    )

    def run(name: str, recipe: dict) -> dict:
        out = work / f"{Path(checkpoint).name}-{name}".replace(":", "-").replace("%", "pct")
        m = compress_run(Path(checkpoint), recipe, out, limit=limit, speed=False, force=True)
        print(f"  {name}: top-1 {m['top1']:.4f}, {m['bytes_stored']:,} B", flush=True)
        return m

    rows = []  # (kind, name, budget or None, metrics, assignment summary)
    for cand in UNIFORM:
        alloc = Allocation("bytes", 0.0, dense_bytes, 0.0, dict.fromkeys(layers, cand), "int8",
                           0.0, 0.0, [])  # fmt: skip
        rows.append(("uniform", cand, None, run(f"u-{cand}", allocation_recipe(alloc, f"u-{cand}")),
                     ""))  # fmt: skip
    targets = [(b, parse_budget(b, "bytes", dense_bytes)) for b in budgets]
    targets += [(f"= {r[1]}", r[3]["bytes_stored"]) for r in rows]
    for label, target in targets:
        t1 = time.perf_counter()
        name = f"a-{label.removeprefix('= ')}"  # as long as the uniform's name: same header
        try:
            alloc = allocate(model, calib, cfg, shape, target, measured=measured, name=name,
                             config_for=lambda r: compressed_config(cfg, checkpoint,
                                                                    parse_recipe(r)))  # fmt: skip
        except VitcompressError as e:
            print(f"  {name}: {e}", flush=True)
            rows.append(("allocated", label, target, None, str(e)))
            continue
        choose_s = time.perf_counter() - t1
        counts: dict[str, int] = {}
        for c in alloc.assignment.values():
            counts[c] = counts.get(c, 0) + 1
        mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        m = run(name, allocation_recipe(alloc, name))
        rows.append(("allocated", label, target, m, f"{mix} ({choose_s:.1f} s)"))

    uniform = {r[1]: r[3] for r in rows if r[0] == "uniform"}
    lines = [
        f"Dense fp32: top-1 {dense['top1'] * 100:.2f} % on {dense['samples']:,} test images, "
        f"{dense_bytes:,.0f} bytes stored. Sensitivity: {len(layers)} Linear layers x "
        f"{len(CANDIDATES)} candidates, KL on 4 calibration batches of 64, {sens_s:.0f} s.",
        "",
        "| recipe | budget (bytes) | bytes stored | fewer bytes | top-1 % | vs dense | "
        "vs uniform at equal bytes | per-layer choice (choose s) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def size(r: tuple) -> float:
        return r[3]["bytes_stored"] if r[3] is not None else r[2]

    for kind, label, target, m, mix in sorted(rows, key=lambda r: -size(r)):
        if m is None:  # the allocator could not meet this budget with its candidates
            lines.append(f"| {kind} {label} | {target:,.0f} (not met) | | | | | | {mix} |")
            continue
        met = "" if target is None else "met" if m["bytes_stored"] <= target else "MISSED"
        fits = "" if target is None else f"{target:,.0f} ({met})"
        versus = ""
        if kind == "allocated" and label.startswith("= "):
            u = uniform[label[2:]]
            versus = f"{100 * (m['top1'] - u['top1']):+.2f} pt vs {label[2:]}"
        lines.append(
            f"| {kind} {label} | {fits} | {m['bytes_stored']:,} | "
            f"{dense_bytes / m['bytes_stored']:.2f}x | {m['top1'] * 100:.2f} | "
            f"{100 * (m['top1'] - dense['top1']):+.2f} | {versus} | {mix} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, action="append",
                    help="a trained dense run (or zoo:NAME); repeat for several")  # fmt: skip
    ap.add_argument("--budgets", default="6x,8x,10x", help="comma-separated budgets")
    ap.add_argument("--limit", type=int, help="first N images of each split")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "ALLOCATOR.md")
    args = ap.parse_args()
    lines = [
        "# The budget allocator against uniform recipes (one-shot)",
        "",
        f"Written by `benchmarks/allocator.py` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. No fine-tune anywhere. "
        "*vs uniform at equal bytes*: the allocation given that uniform recipe's bytes as its "
        "budget, against it.",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in args.checkpoint:
            lines += ["", f"## `{checkpoint}`", ""]
            lines += table(checkpoint, [b.strip() for b in args.budgets.split(",")], args.limit,
                           Path(tmp))  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
