"""Where onnxruntime spends a batch-1 forward pass of vit-tiny (224x224): fp32 export against
our INT8 QDQ export, per operator type, from onnxruntime's own profiler. Writes
benchmarks/ORT_PROFILE.md.

    python benchmarks/ort_profile.py [--model vit-tiny] [--threads 2] [--runs 20]

It answers "how fast can INT8 be here": the integer GEMMs' speed over the float ones, the
share of the time that INT8 does not touch (attention products, LayerNorm, GELU, softmax,
layout ops), what fusing attention into onnxruntime's MultiHeadAttention kernel takes off that
share, and the ceiling the integer GEMMs alone put on any INT8 model's speed-up over torch fp32
eager (timed in the same process, before any onnxruntime session exists).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

HERE = Path(__file__).resolve().parent


def profile(path: Path, x: np.ndarray, threads: int, runs: int, prefix: str) -> dict[str, float]:
    """Mean milliseconds per run spent in each operator type."""
    from vitcompress.ort import INPUT

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, {INPUT: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    # the first run warms up: only node events after it ends count
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    after = first["ts"] + first["dur"]
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            per_op[e["args"]["op_name"]] += e["dur"]
    return {k: v / 1e3 / runs for k, v in per_op.most_common()}


def torch_median_ms(model: torch.nn.Module, x: np.ndarray, threads: int, runs: int) -> float:
    """Median batch-1 latency of torch fp32 eager (its default threading), timed as `bench`
    times its ``torch-fp32`` variant."""
    import statistics

    from vitcompress.bench import Variant, time_rounds, torch_runner

    torch.set_num_threads(threads)
    v = Variant("torch-fp32", "torch", "fp32", torch_runner(model), 0)
    ts = time_rounds([v], x, runs, warmup=3, passes=1, pause=0.0)[v.name]
    return statistics.median(ts) * 1e3


def linear_macs(model: torch.nn.Module, tokens: int) -> int:
    return tokens * sum(m.in_features * m.out_features for m in model.modules()
                        if isinstance(m, torch.nn.Linear))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from vitcompress.export import export_onnx
    from vitcompress.models import build_model, model_config
    from vitcompress.steps.quantize import QuantizeConfig, quantize_

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = model_config(args.model, img_size=args.img_size)
    model = build_model(cfg).eval()
    shape = (3, args.img_size, args.img_size)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    tokens = (args.img_size // cfg["patch_size"]) ** 2 + 1
    torch_ms = torch_median_ms(model, x, args.threads, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", shape, check=False)
        q = copy.deepcopy(model)
        quantize_(q, QuantizeConfig(ignore=["head"]), [torch.randn(8, *shape) for _ in range(2)])
        qdq = export_onnx(q, Path(tmp) / "qdq.onnx", shape, check=False)
        mha = export_onnx(q, Path(tmp) / "mha.onnx", shape, check=False, fused_attention=True)
        prof = {
            "fp32": profile(fp32, x, args.threads, args.runs, f"{tmp}/fp32"),
            "int8 QDQ": profile(qdq, x, args.threads, args.runs, f"{tmp}/qdq"),
            "int8 QDQ, fused attention": profile(mha, x, args.threads, args.runs, f"{tmp}/mha"),
        }
    ops = sorted(set().union(*prof.values()), key=lambda k: -sum(p.get(k, 0) for p in
                 prof.values()))  # fmt: skip
    tot = {k: sum(v.values()) for k, v in prof.items()}
    mha_rest = tot["int8 QDQ, fused attention"] - prof["int8 QDQ, fused attention"].get(
        "MatMulIntegerToFloat", 0.0
    )
    gop = 2 * linear_macs(model, tokens) / 1e9  # the Linear layers' work, GOP per image
    int_ms = prof["int8 QDQ"].get("MatMulIntegerToFloat", float("nan"))
    rest_ms = tot["int8 QDQ"] - int_ms
    # fp32 MatMul = Linear layers + attention products; the INT8 model's MatMul = the latter
    fp32_linear_ms = prof["fp32"].get("MatMul", 0) - prof["int8 QDQ"].get("MatMul", 0)
    lines = [
        f"# Where onnxruntime spends a batch-1 forward pass: {args.model} {args.img_size}x"
        f"{args.img_size}",
        "",
        f"Written by `benchmarks/ort_profile.py`: {platform.machine()}, {args.threads} threads, "
        f"onnxruntime {ort.__version__}; mean of {args.runs} profiled runs after a warm-up run, "
        "kernel time per operator type (onnxruntime's profiler; fused operators as it ran "
        "them). Random weights and inputs.",
        "",
        "| operator | " + " | ".join(f"{k} ms" for k in prof) + " |",
        "|---|" + "---|" * len(prof),
        *[f"| {k} | " + " | ".join(f"{p.get(k, 0):.2f}" for p in prof.values()) + " |"
          for k in ops[:18]],
        "| **total** | " + " | ".join(f"**{t:.2f}**" for t in tot.values()) + " |",
        "",
        f"- The Linear layers are {gop:.2f} GOP per image. In the INT8 model they run as "
        f"`MatMulIntegerToFloat`: {int_ms:.2f} ms, {gop / int_ms * 1e3:.0f} GOP/s; in fp32 "
        f"(`MatMul` less the attention products) about {fp32_linear_ms:.2f} ms, "
        f"{gop / fp32_linear_ms * 1e3:.0f} GFLOP/s: integer GEMMs are "
        f"{fp32_linear_ms / int_ms:.2f}x faster than float ones here.",
        f"- Everything else in the INT8 model takes {rest_ms:.2f} ms "
        f"({100 * rest_ms / tot['int8 QDQ']:.0f} %): attention products in fp32 (`MatMul`), "
        "LayerNorm, GELU, softmax, residual adds, the activation `QuantizeLinear`s and layout "
        "ops. Even integer GEMMs of zero cost would leave that much.",
        f"- With fused attention (`--fused-attention`) that part falls to {mha_rest:.2f} ms "
        f"({100 * mha_rest / tot['int8 QDQ, fused attention']:.0f} % of "
        f"{tot['int8 QDQ, fused attention']:.2f} ms): one `MultiHeadAttention` per block "
        "replaces the attention products, softmax and the layout ops around them.",
        f"- torch fp32 eager, timed in this process before onnxruntime started: {torch_ms:.2f} "
        f"ms per image (median of {args.runs}). The integer GEMMs alone take {int_ms:.2f} ms, "
        f"so on this CPU no INT8 model of these Linear layers can run more than "
        f"**{torch_ms / int_ms:.2f}x** faster than torch fp32 at batch 1, even if everything "
        "else cost nothing; with fused attention as it runs now, "
        f"{torch_ms / tot['int8 QDQ, fused attention']:.2f}x (profiled kernel time).",
        "",
    ]  # fmt: skip
    text = "\n".join(lines)
    (HERE / "ORT_PROFILE.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
