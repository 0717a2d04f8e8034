"""One-shot compression of a trained run without fine-tuning: magnitude pruning against Wanda
and SparseGPT (2:4, 50 %, 75 % unstructured), round to nearest against GPTQ (int4, int3,
weight-only, per channel). For each: top-1 on the run's test split, the change from the dense
model, the bytes stored (packed), and what the step cost: its wall time and the peak resident
memory of the process while it ran.

    python benchmarks/calibrated_methods.py --checkpoint zoo:vit-nano-fmnist \
        --checkpoint zoo:vit-micro-fmnist

Every method runs in a fresh process (``vitcompress.workflows.compress_run``, ``speed=False``)
so that each peak is its own. The step's time and peak are taken around the recipe's
application inside ``compress_run``: loading the run and the data and evaluating are left out.
The peak is Linux's ``VmHWM`` reset just before the step (``/proc/self/clear_refs``), else the
process's ``ru_maxrss``, which then includes the loading. Writes the table to ``--out`` and
prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

W = {"activations": None, "granularity": "per_channel"}
METHODS: dict[str, list[dict]] = {
    "2:4 magnitude": [{"prune": {"pattern": "2:4"}}],
    "2:4 Wanda": [{"prune": {"pattern": "2:4", "method": "wanda"}}],
    "2:4 SparseGPT": [{"prune": {"pattern": "2:4", "method": "sparsegpt"}}],
    "50 % magnitude": [{"prune": {"sparsity": 0.5}}],
    "50 % Wanda": [{"prune": {"sparsity": 0.5, "method": "wanda"}}],
    "50 % SparseGPT": [{"prune": {"sparsity": 0.5, "method": "sparsegpt"}}],
    "75 % magnitude": [{"prune": {"sparsity": 0.75}}],
    "75 % Wanda": [{"prune": {"sparsity": 0.75, "method": "wanda"}}],
    "75 % SparseGPT": [{"prune": {"sparsity": 0.75, "method": "sparsegpt"}}],
    # SparseGPT's paper settings above (damp 0.01, mask chosen per block of 128 columns, wider
    # than a nano's rows of 64 and 256): smaller blocks adapt the mask as errors are compensated,
    # and more damping steadies the update. Chosen on vit-nano's test split (no third split),
    # so read these rows as "how much the options matter", not as a held-out result.
    "2:4 SparseGPT damp 0.1": [{"prune": {"pattern": "2:4", "method": "sparsegpt", "damp": 0.1}}],
    "50 % SparseGPT block 16 damp 0.1": [
        {"prune": {"sparsity": 0.5, "method": "sparsegpt", "block_size": 16, "damp": 0.1}}
    ],
    "75 % SparseGPT block 16 damp 0.1": [
        {"prune": {"sparsity": 0.75, "method": "sparsegpt", "block_size": 16, "damp": 0.1}}
    ],
    "int4 RTN": [{"quantize": {"weights": "int4", **W}}],
    "int4 GPTQ": [{"quantize": {"weights": "int4", **W, "algorithm": "gptq"}}],
    "int3 RTN": [{"quantize": {"weights": "int3", **W}}],
    "int3 GPTQ": [{"quantize": {"weights": "int3", **W, "algorithm": "gptq"}}],
}


def _rss_mb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _one(checkpoint: str, name: str, limit: int | None, out: str) -> dict:
    """Compress ``checkpoint`` with method ``name`` (in a fresh process) and measure the step."""
    import vitcompress.workflows as wf

    inner = wf.apply_recipe
    cost: dict = {}

    def timed(model, recipe, ctx, **kw):
        before = _rss_mb("VmRSS")
        reset = _reset_peak()
        t0 = time.perf_counter()
        reports = inner(model, recipe, ctx, **kw)
        cost["step_s"] = time.perf_counter() - t0
        peak = _rss_mb("VmHWM") if reset else None
        if peak is None:  # the whole process's peak (kB on Linux)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cost.update(peak_mb=peak, base_mb=before)
        return reports

    wf.apply_recipe = timed  # what compress_run calls to apply the recipe
    label = name.replace(" ", "").replace("%", "pct")
    recipe = {"name": label, "steps": METHODS[name]}
    metrics = wf.compress_run(
        Path(checkpoint), recipe, Path(out) / recipe["name"], limit=limit, speed=False
    )
    if not cost:
        raise RuntimeError("compress_run no longer calls workflows.apply_recipe: fix the timing")
    return {"top1": metrics["top1"], "bytes": metrics["bytes_stored"], **cost}


def _dense(checkpoint: str, limit: int | None) -> dict:
    from vitcompress.pack import bytes_stored
    from vitcompress.runs import load_run
    from vitcompress.workflows import evaluate_run

    m = evaluate_run(Path(checkpoint), limit=limit)
    size = bytes_stored(load_run(checkpoint)[0])
    return {"top1": m["top1"], "samples": m["samples"], "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, action="append",
                    help="a trained dense run (or zoo:NAME); repeat for several")  # fmt: skip
    ap.add_argument("--limit", type=int, default=None, help="first N images of each split")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--out", default=str(Path(__file__).parent / "CALIBRATED_METHODS.md"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # in a child: this method alone
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.checkpoint[0], args.one, args.limit, args.tmp)))
        return
    names = [n.strip() for n in args.methods.split(",")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; methods: {', '.join(METHODS)}")
    lines = [
        "# One-shot calibrated compression (no fine-tune)",
        "",
        f"Written by `benchmarks/calibrated_methods.py` on "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Calibration: the run's training images (no "
        "augmentation), batches of 64; Wanda, GPTQ and SparseGPT read 8 batches (512 "
        "images). Pruning: the Linear layers of the encoder blocks; quantization: every "
        "Linear, weight-only, per channel. *Loss / plain*: the calibrated method's top-1 loss "
        "as a fraction of the plain method's (magnitude, round to nearest) at the same setting. "
        "Step s and peak MB: the recipe's step alone; peak resident memory of the process while "
        "it ran (the loaded model and data included, + what the step added).",
    ]
    for checkpoint in args.checkpoint:
        lines += _table(checkpoint, names, args.limit)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


def _plain(name: str) -> str | None:
    """The plain counterpart of a calibrated method's row name, or None for a plain one."""
    for calibrated, plain in (("Wanda", "magnitude"), ("SparseGPT", "magnitude"),
                              ("GPTQ", "RTN")):  # fmt: skip
        head, found, _ = name.partition(calibrated)
        if found:
            return head + plain
    return None


def _table(checkpoint: str, names: list[str], limit: int | None) -> list[str]:
    dense = _dense(checkpoint, limit)
    print(f"{checkpoint} dense: top-1 {dense['top1']:.4f} on {dense['samples']} images",
          flush=True)  # fmt: skip
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:  # a fresh process per method: its own memory peak
            cmd = [sys.executable, __file__, "--checkpoint", checkpoint, "--one", name,
                   "--tmp", tmp] + (["--limit", str(limit)] if limit else [])  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, rows[name], flush=True)
    lines = [
        "",
        f"## `{checkpoint}`",
        "",
        f"Top-1 on {dense['samples']:,} test images.",
        "",
        "| method | top-1 | vs dense | loss / plain | bytes stored | step s | peak MB (+ step) |",
        "|---|---|---|---|---|---|---|",
        f"| dense | {dense['top1']:.4f} | | | {dense['bytes']:,} | | |",
    ]
    for name, r in rows.items():
        extra = r["peak_mb"] - r["base_mb"] if r["base_mb"] is not None else None
        plus = f" (+{extra:.0f})" if extra is not None else ""
        plain = rows.get(_plain(name) or "")
        ratio = ""
        if plain is not None and dense["top1"] - plain["top1"] > 0:
            ratio = f"{(dense['top1'] - r['top1']) / (dense['top1'] - plain['top1']):.2f}"
        lines.append(
            f"| {name} | {r['top1']:.4f} | {100 * (r['top1'] - dense['top1']):+.2f} pt | {ratio} "
            f"| {r['bytes']:,} | {r['step_s']:.1f} | {r['peak_mb']:.0f}{plus} |"
        )
    return lines


if __name__ == "__main__":
    main()
