"""Where real INT8 departs from the exact integer result, on this CPU: writes
benchmarks/INT8_EXACTNESS.md.

    python benchmarks/int8_exactness.py

1. The kernel: onnxruntime's ``MatMulInteger`` (uint8 x int8, the GEMM under its
   ``MatMulIntegerToFloat``) against the exact int64 product, with 8-bit and 7-bit weights, on
   random codes and on the worst case (every pair 255 x 127).
2. The model: our QDQ export of a quantised ViT on onnxruntime, with its graph optimisations
   off (QuantizeLinear / DequantizeLinear / float MatMul: no integer kernel), basic, and all
   (integer kernels), against torch's emulation of the same model.

Without VNNI, x86 integer GEMMs multiply uint8 by int8 with ``vpmaddubsw``, which adds each
pair of products in saturating int16: 255 x 127 x 2 = 64,770 does not fit, 255 x 63 x 2 = 32,130
does. With VNNI (``vpdpbusd``) the sums are int32 and exact.
"""

from __future__ import annotations

import copy
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent


def matmul_integer(a: np.ndarray, b: np.ndarray, a_zero: int) -> np.ndarray:
    """``(a - a_zero) @ b`` by onnxruntime's MatMulInteger (uint8 x int8 -> int32), 1 thread."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "azp"], ["Y"])],
        "mmi",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, list(a.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
        [helper.make_tensor("B", TensorProto.INT8, b.shape, b.flatten().tolist()),
         helper.make_tensor("azp", TensorProto.UINT8, [], [a_zero])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def kernel_rows(m: int = 197, k: int = 192, n: int = 96) -> list[str]:
    rng = np.random.default_rng(0)
    rows = []
    for bits in (8, 7):
        hi = 2 ** (bits - 1) - 1
        for case in ("random codes", "worst case (255 x qmax)"):
            a = rng.integers(0, 256, (m, k), dtype=np.uint8)
            b = rng.integers(-hi, hi + 1, (k, n), dtype=np.int8)
            if case.startswith("worst"):
                a[:] = 255
                b[:] = hi
            exact = (a.astype(np.int64) - 128) @ b.astype(np.int64)
            got = matmul_integer(a, b, 128)
            wrong = got != exact
            rows.append(
                f"| int{bits} weights | {case} | {wrong.mean() * 100:.2f} % | "
                f"{int(np.abs(got - exact).max()):,} |"
            )
    return rows


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    err = np.linalg.norm(ref - out)
    return float("inf") if err == 0 else float(20 * np.log10(np.linalg.norm(ref) / err))


def model_rows(tmp: Path) -> list[str]:
    from vitcompress.export import export_onnx
    from vitcompress.models import build_model, model_config
    from vitcompress.ort import INPUT
    from vitcompress.steps.quantize import QuantizeConfig, quantize_

    torch.manual_seed(0)
    cfg = model_config("vit-nano", img_size=32, patch_size=4, in_chans=3, num_classes=10)
    model = build_model(cfg).eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    x = torch.randn(16, 3, 32, 32)
    levels = [
        ("off: QDQ in float", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        ("all: integer kernels", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ]
    rows = []
    for w in ("int8", "int7"):
        q = copy.deepcopy(model)
        quantize_(q, QuantizeConfig(weights=w, ignore=["head"]), calib)
        with torch.no_grad():
            ref = q(x).numpy()
        path = export_onnx(q, tmp / f"{w}.onnx", (3, 32, 32), check=False)
        for label, level in levels:
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            y = sess.run(None, {INPUT: x.numpy()})[0]
            rows.append(f"| {w} weights | {label} | {sqnr(ref, y):.1f} dB |")
    return rows


def main() -> int:
    import tempfile

    from vitcompress.int8 import cpu_has_vnni

    with tempfile.TemporaryDirectory() as tmp:
        mrows = model_rows(Path(tmp))
    text = "\n".join(
        [
            "# Real INT8 against the exact integer result",
            "",
            f"Written by `benchmarks/int8_exactness.py` on {platform.machine()}, VNNI: "
            f"{'yes' if cpu_has_vnni() else 'no'}, onnxruntime {ort.__version__}, "
            f"torch {torch.__version__}.",
            "",
            "## The kernel: onnxruntime MatMulInteger, 197 x 192 x 96, uint8 x int8",
            "",
            "| weights | inputs | outputs that differ from the exact product | max abs error |",
            "|---|---|---|---|",
            *kernel_rows(),
            "",
            "## The model: our QDQ export (vit-nano, 32x32, random weights) against torch",
            "",
            "SQNR of onnxruntime's logits against torch's emulation of the same quantised "
            "model (higher is closer; identical would be infinite).",
            "",
            "| weights | onnxruntime graph optimisations | SQNR |",
            "|---|---|---|",
            *mrows,
            "",
            "Reading it: where the kernel rows show errors for int8 but none for int7, the "
            "integer GEMM saturates (no VNNI) and 7-bit weights (`quantize: {weights: int7}`) "
            "make it exact. What is left with int7, and with the integer kernels off, is "
            "onnxruntime's float arithmetic (LayerNorm, GELU, softmax, summation order) "
            "differing from torch's in the last bits, which moves a few activations across an "
            "int8 rounding boundary: the same size with and without integer kernels.",
            "",
        ]
    )
    (HERE / "INT8_EXACTNESS.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
