"""The standard deployment benchmark (``make bench``): writes benchmarks/RESULTS.md and
benchmarks/results.json.

    python benchmarks/run.py                                  # vit-tiny and vit-small, 224x224
    python benchmarks/run.py --run runs/fmnist-base           # plus a trained run (with top-1)
    python benchmarks/run.py --models vit-tiny --rounds-b1 10 --rounds-b32 3
    python benchmarks/run.py --models --run runs/base --compare runs/2of4-int8 --append

Every variant of one model is timed in the same process, in passes over all variants (see
``vitcompress.measure.time_rounds``), so the ratios within a table come from one run under the
same conditions.
Random weights are fine for speed; a run directory (``--run``) is also evaluated for top-1 on
its test set, with int8 calibration on its training images.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    """CPU model, cores, memory, load: what the numbers were measured on."""
    from vitcompress.int8 import VNNI_FLAGS, cpu_flags

    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        info["cpus"] = fields.get("CPU(s)", "?").strip()
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor() or "?"
    info["int8_isa"] = [f for f in ("avx2", *VNNI_FLAGS) if f in cpu_flags()]
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_gb"] = round(int(meminfo[1]) / 1e6, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime

    import vitcompress

    return {
        "vitcompress": vitcompress.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
    }


def _fmt(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def table(rows: list[dict], batch: int) -> str:
    tp, tpb = f"throughput_b{batch}", f"throughput_best_b{batch}"
    acc = "top1" in rows[0]
    head = ["variant", "runtime / format", "b1 median ms", "b1 p90 ms", "b1 best ms",
            f"b{batch} img/s", f"b{batch} best img/s", "MB on disk", "x b1", f"x b{batch}",
            "x b1 best", f"x b{batch} best", "x smaller"]  # fmt: skip
    if acc:
        head.insert(2, "top-1 %")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"`{r['variant']}`",
            f"{r['runtime']}: {r['format']}",
            _fmt(r["latency_ms_b1"]),
            _fmt(r["latency_p90_ms_b1"]),
            _fmt(r["latency_min_ms_b1"]),
            _fmt(r[tp]),
            _fmt(r[tpb]),
            _fmt(r["bytes_stored"] / 1e6, 2),
            _fmt(r.get("speedup_b1", float("nan")), 2),
            _fmt(r.get(f"speedup_b{batch}", float("nan")), 2),
            _fmt(r.get("speedup_best_b1", float("nan")), 2),
            _fmt(r.get(f"speedup_best_b{batch}", float("nan")), 2),
            _fmt(r.get("size_ratio", float("nan")), 2),
        ]
        if acc:
            cells.insert(2, _fmt(r["top1"], 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peer_ratios(rows: list[dict], batch: int) -> str:
    """Our INT8 exports against the peer, onnxruntime's quantize_dynamic of the plain export."""
    by = {r["variant"]: r for r in rows}
    peer = by.get("ort-int8-dynamic")
    tp, tpb = f"throughput_b{batch}", f"throughput_best_b{batch}"
    lines = []
    for name, what in (("ort-int8-qdq", "Our INT8 QDQ"),
                       ("ort-int8-qdq-mha", "Our INT8 QDQ with fused attention")):  # fmt: skip
        ours = by.get(name)
        if not (ours and peer):
            continue
        lines.append(
            f"{what} vs onnxruntime quantize_dynamic: batch 1 "
            f"{peer['latency_ms_b1'] / ours['latency_ms_b1']:.2f}x (median), "
            f"{peer['latency_min_ms_b1'] / ours['latency_min_ms_b1']:.2f}x (best); batch "
            f"{batch} {ours[tp] / peer[tp]:.2f}x (median), {ours[tpb] / peer[tpb]:.2f}x (best)."
        )
    return "\n\n".join(lines)


def compare_lines(rows: list[dict], batch: int) -> list[str]:
    """One line per ``--compare`` run: accuracy next to speed and size, against torch fp32."""
    by = {r["variant"]: r for r in rows}
    base = by.get("torch-fp32")
    out = []
    for r in rows:
        if base is None or "packed_bytes" not in r["notes"]:
            continue
        acc = ""
        if "top1" in r:
            acc = f"top-1 {r['top1']:.2f} % ({r['top1'] - base['top1']:+.2f} pts), "
        out.append(
            f"- `{r['variant']}`: {acc}{r['speedup_b1']:.2f}x torch fp32 at batch 1 "
            f"({r['speedup_best_b1']:.2f}x best), {r[f'speedup_b{batch}']:.2f}x at batch "
            f"{batch}; packed {r['notes']['packed_bytes']:,} bytes, "
            f"{base['bytes_stored'] / r['notes']['packed_bytes']:.2f}x smaller than fp32."
        )
    return out


SHOWN = (
    "mlp",
    "heads",
    "method",
    "pattern",
    "sparsity",
    "schedule",
    "targets",
    "epochs",
    "lr",
    "distill",
    "weights",
    "activations",
    "granularity",
    "scales",
    "rest",
    "rank_ratio",
    "energy",
    "rank",
)


def _short_step(step: dict) -> str:
    """``prune(pattern=2:4, targets=blocks.*)``: a resolved recipe step, its telling keys."""
    ((kind, opts),) = step.items()
    shown = []
    for k in SHOWN:
        v = (opts or {}).get(k)
        if v is None or (k == "sparsity" and opts.get("pattern", "unstructured") != "unstructured"):
            continue
        if k in ("mlp", "heads") and not v:  # shrink: a part it leaves whole
            continue
        if isinstance(v, dict):  # distill: {teacher: self, kind: soft, ...}
            v = f"{v.get('kind', '')} from {v.get('teacher', '?')}"
        shown.append(f"{k}={v}")
    return f"{kind}({', '.join(shown)})"


def describe_run(run_dir: Path, compare: list[Path]) -> str:
    """How a benchmarked run (and the runs compared with it) were made, from their configs."""
    from vitcompress.fileio import read_json

    def one(path: Path) -> str:
        cfg = read_json(path / "config.json")
        metrics = path / "metrics.json"
        top1 = read_json(metrics).get("top1") if metrics.is_file() else None
        acc = "" if top1 is None else f", {top1 * 100:.2f} % top-1"
        recipe = cfg.get("recipe")
        if recipe:
            steps = " -> ".join(_short_step(s) for s in recipe["steps"])
            return f"`{path.name}`: recipe `{recipe['name']}` on the baseline ({steps}){acc}"
        return f"`{path.name}`: `{cfg.get('command', '?')}`{acc}"

    text = f"Baseline {one(run_dir)}; INT8 variants calibrated on 8 training batches."
    if compare:
        text += (
            " Compared runs (`--compare`, timed as `ort-<name>`): "
            + "; ".join(one(c) for c in compare)
            + "."
        )
    return text


def run_loaders(run_dir: Path, calib_batches: int):
    """(calibration batches from the training images, test loader) of a run directory."""
    from vitcompress.fileio import read_json
    from vitcompress.workflows import loaders

    config = read_json(run_dir / "config.json")
    data = dict(config["data"])
    data["augment"] = False  # calibrate on plain training images
    train_loader, test_loader, _ = loaders(data, batch_size=64)
    calib = []
    for x, _ in train_loader:
        calib.append(x)
        if len(calib) >= calib_batches:
            break
    return calib, test_loader


def main(argv: list[str] | None = None) -> int:
    from vitcompress.bench import bench
    from vitcompress.ort import onnx_ops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["vit-tiny", "vit-small"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--run", action="append", default=[], help="a trained run directory")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        type=Path,
        help="a compressed run of the --run model, timed next to it (repeatable)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds-b1", type=int, default=12)
    p.add_argument("--rounds-b32", type=int, default=3)
    p.add_argument("--passes", type=int, default=3, help="passes over the variants")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument(
        "--append", action="store_true",
        help="keep the models already in results.json (each section says the machine it ran on "
        "when that is not this one); re-measured ones are replaced",
    )  # fmt: skip
    p.add_argument(
        "--render-only", action="store_true",
        help="rewrite RESULTS.md from results.json (after editing this script's text)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.render_only:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "RESULTS.md").write_text(render(results))
        return 0

    results: dict = {"machine": machine(), "versions": versions(), "models": {}}
    old = args.out / "results.json"
    if args.append and old.is_file():
        results["models"] = json.loads(old.read_text()).get("models", {})
    jobs = [("preset", m) for m in args.models] + [("run", r) for r in args.run]
    for kind, name in jobs:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        load_start = os.getloadavg()
        with tempfile.TemporaryDirectory() as wd:
            if kind == "preset":
                rows = bench(
                    model=name,
                    img_size=args.img_size,
                    threads=args.threads,
                    rounds_b1=args.rounds_b1,
                    rounds_b32=args.rounds_b32,
                    passes=args.passes,
                    work_dir=wd,
                )
            else:
                calib, test_loader = run_loaders(Path(name), calib_batches=8)
                rows = bench(checkpoint=name, threads=args.threads, rounds_b1=args.rounds_b1,
                             rounds_b32=args.rounds_b32, calib=calib, work_dir=wd,
                             passes=args.passes,
                             eval_loader=test_loader, compare=args.compare)  # fmt: skip
            graphs = {  # what onnxruntime runs for our INT8 exports of this model
                key: onnx_ops(Path(wd) / f"{key}.onnx")
                for key in ("int8-qdq", "int8-qdq-mha")
                if (Path(wd) / f"{key}.onnx").is_file()
            }
        results["models"][name] = {
            "rows": rows,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.time() - t0,
            "threads": args.threads,
            "rounds": {"b1": args.rounds_b1, "b32": args.rounds_b32},
            "passes": args.passes,
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
            "machine": results["machine"],
            "ort_ops": graphs,
        }
        if kind == "run":
            results["models"][name]["about"] = describe_run(Path(name), args.compare)
        print(table(rows, 32), file=sys.stderr, flush=True)
        write(results, args.out)  # after every model: a long run keeps what it measured
    return 0


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(render(results))
    print(f"wrote {out / 'RESULTS.md'} and results.json", file=sys.stderr)


def render(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    out = [
        "# Deployment benchmarks",
        "",
        "Written by `benchmarks/run.py` (`make bench`). Each table comes from one process: its "
        "variants were timed in passes (every pass runs every variant), so the ratios within a "
        "table were measured in one run under the same conditions.",
        "",
        f"- Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('mem_gb', '?')} GB, "
        f"int8 ISA: {', '.join(m.get('int8_isa', [])) or '?'}; {m.get('platform')}",
        "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        "- Threads pinned per table (torch.set_num_threads, onnxruntime intra_op_num_threads); "
        "each runtime with its default thread behaviour (torch's OpenMP threads and "
        "onnxruntime's pool spin after a call, which is what makes them fast at batch 1). "
        "Variants run in blocks of back-to-back calls, in passes over the variants (each "
        "section says how many), with a "
        "warm-up call and a 0.2 s pause before each block, so that no runtime's spinning "
        "threads steal the cores of the next (`vitcompress.measure.time_rounds`). An earlier "
        "version of this file timed torch under `OMP_WAIT_POLICY=PASSIVE`, which made torch "
        "fp32 1.6-4x slower at batch 1 and its ratios over torch too high.",
        "- Load: the 1-minute load average is printed under each table, next to the number of "
        "threads the benchmark keeps busy: a load near that number is a quiet machine, more "
        "means other jobs shared the CPUs (absolute "
        "times then slow and noisy; the *best* columns, the fastest call of each variant, are "
        "the least disturbed estimate).",
        "",
        "Columns: latency at batch 1 (median, p90, best) in ms; throughput at batch 32 in "
        "images/s (from the median and from the best batch time); size of the artifact the "
        "variant runs from (ONNX file, or the packed checkpoint for torch variants); `x` = ratio "
        "over `torch-fp32` (speed-up, or how many times smaller).",
        "",
    ]
    for name, entry in res["models"].items():
        rows = entry["rows"]
        img = rows[0]["img_size"]
        ls, le = entry["load_avg_start"], entry["load_avg_end"]
        out += [f"## {name} ({img}x{img})", ""]
        if entry.get("about"):
            out += [entry["about"], ""]
        here = entry.get("machine", m)
        if (here.get("cpu"), here.get("int8_isa")) != (m.get("cpu"), m.get("int8_isa")):
            out += [f"**Measured on another machine**: {here.get('cpu')}, int8 ISA: "
                    f"{', '.join(here.get('int8_isa', [])) or '?'}.", ""]  # fmt: skip
        out += [
            f"{entry['date']}, {entry['threads']} threads, {entry['rounds']['b1']} timed calls "
            f"per variant at batch 1 and {entry['rounds']['b32']} at batch 32 in "
            f"{entry.get('passes', 3)} passes, {entry['wall_s'] / 60:.0f} min; "
            f"load average {ls[0]:.1f} at the start, {le[0]:.1f} at the end.",
            "",
            table(rows, 32),
            "",
        ]
        pr = peer_ratios(rows, 32)
        if pr:
            out += [pr, ""]
        cl = compare_lines(rows, 32)
        if cl:
            out += cl + [""]
        notes = [
            f"`{r['variant']}`: {r['notes']['sparse']}" for r in rows if "sparse" in r["notes"]
        ]
        if notes:
            out += ["CSR conversion (layers measured on their real input, converted if > 1.1x): "
                    + "; ".join(notes) + ".", ""]  # fmt: skip
    # the graphs of the first model measured with both exports (vit-tiny in `make bench`)
    name, graphs = next(((n, e["ort_ops"]) for n, e in res["models"].items()
                         if len(e.get("ort_ops") or {}) == 2), (None, None))  # fmt: skip
    if graphs:
        plain, fused = graphs["int8-qdq"], graphs["int8-qdq-mha"]

        def top(ops: dict) -> str:
            return ", ".join(f"{k} {n}" for k, n in list(ops.items())[:12])

        out += [
            "## What onnxruntime ran for our INT8 QDQ model",
            "",
            f"Node counts after onnxruntime's graph optimisations ({name}): "
            f"{sum(plain.values())} nodes, {top(plain)}. Each int8 Linear became one "
            "`MatMulIntegerToFloat` (integer GEMM, int32 accumulation, rescale to fp32) fed by "
            "one `QuantizeLinear` (uint8 codes; symmetric activations also get a `Max`, the "
            "clip to -127 that keeps the ONNX model equal to torch); the attention products "
            "(`MatMul`), LayerNorm, softmax and GELU stay fp32.",
            "",
            f"With fused attention (`ort-int8-qdq-mha`), {sum(fused.values())} nodes: "
            f"{top(fused)}. Per block, the qkv output is split in three with constant sizes "
            "and one `MultiHeadAttention` does the head split, both attention products, the "
            "softmax and the head merge; the `Shape`/`Gather`/`Unsqueeze`/`Squeeze`/"
            "`Transpose`/`Reshape` nodes that rearranged heads for a dynamic batch are gone.",
            "",
        ]
    out += [
        "## Reading the numbers",
        "",
        "- `torch-int8-dynamic` is torch.ao `quantize_dynamic` (study B's method); `torch-int8` "
        "is ours (`quantize_` with calibrated static int8 activations, then `to_int8_`: "
        "fbgemm's quantized linear for static activations, `torch._int_mm` for dynamic ones); "
        "`ort-int8-dynamic` is onnxruntime's own `quantize_dynamic` of the "
        "fp32 export (the peer); `ort-int8-qdq` is our QDQ export of the same quantised model "
        "as `torch-int8` (the classifier head stays fp32 in both).",
        "- On a CPU without VNNI (the machine's int8 ISA line lists none of avx512_vnni, "
        "avx_vnni, amx_int8) fbgemm's and onnxruntime's uint8 x int8 kernels add pairs of "
        "products in saturating int16, so `torch-int8` and `ort-int8-*` top-1 can sit a little "
        "below the exact integer result; 7-bit weights make both exact "
        "(`INT8_EXACTNESS.md`). `torch._int_mm` is exact but ~10x slower there.",
        "- How fast INT8 can be on this CPU: `ORT_PROFILE.md` splits a batch-1 vit-tiny pass "
        "by operator. Without VNNI the integer GEMMs run ~1.5-1.75x faster than onnxruntime's "
        "fp32 ones (about 3.5x with VNNI), and the part INT8 does not touch (attention products, "
        "LayerNorm, GELU, softmax, layout ops) is over half of the INT8 model's time.",
        "- `*-mha` variants are the same ONNX models with each attention block as onnxruntime's "
        "`com.microsoft.MultiHeadAttention` contrib kernel (`vitcompress export "
        "--fused-attention`): the same fp32 maths in one kernel, with logits equal to the "
        "plain export's to float rounding. onnxruntime only: other ONNX consumers (FPGA tool "
        "flows) need the plain export, and onnxruntime does not fuse a ViT's attention by "
        "itself (its transformer optimizer finds no BERT pattern in it).",
        "- `ort-shrink-*`: half of every block's attention heads and MLP neurons removed "
        "(`shrink`, magnitude, one shot, random weights here: speed and size only). The "
        "layers really are narrower, so the dense runtime runs them faster; on a trained "
        "model, fine-tuning recovers the accuracy (the compared `shrink-*` runs).",
        "- Low rank: MLP and patch projection factorised at rank ratio 0.25, one shot, random "
        "weights (speed and size only; accuracy needs a fine-tuned run).",
        "- Unstructured sparsity runs dense in onnxruntime (`ort-sparse-*`: no sparse kernel, "
        "no speed-up, and the ONNX file stores the zeros). In torch, `torch-sparse-csr-*` runs "
        "layers whose measured CSR time beats dense; CSR only wins above about 90 % sparsity "
        "and its speed-up falls as the token count grows (tiles of 128 tokens help), so at "
        "batch 32 it may lose. What would make it faster: a sparse x dense kernel with "
        "register blocking over several tokens (e.g. a block-sparse 1x4 or 4x1 format), or "
        "structured N:M sparsity on hardware that executes it.",
        "",
        "## Accuracy benchmarks beside this file",
        "",
        "Compression quality is measured by its own scripts, each on the shipped models "
        "(`zoo:NAME`), every row a real run on all 10,000 Fashion-MNIST test images: "
        "`CALIBRATED_METHODS.md` (magnitude / Wanda / SparseGPT, round to nearest / GPTQ, one "
        "shot), `OUTLIERS.md` (W8A8 / W6A6 / W4A8 with SmoothQuant, twin and log2 grids; plain "
        "vs whitened SVD), `ALLOCATOR.md` (per-layer allocation against uniform recipes at 6x / "
        "8x / 10x and at equal bytes), `compression_fmnist.md` (the compression table with "
        "fine-tunes), `BAD_INPUTS.md`.",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
