"""onnxruntime's side of an export: sessions, agreement with torch, op counts, metadata, and
onnxruntime's own ``quantize_dynamic`` (the peer a user would reach for without us)."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.fileio import atomic_path
from vitcompress.optional import need

INPUT, OUTPUT = "input", "logits"
ORT_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators


def one_line(e: BaseException) -> str:
    """An exception as one line of at most 300 characters (type and first line)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def ort_session(
    model: str | Path | bytes,
    threads: int | None = None,
    optimized_path: str | Path | None = None,
    spinning: bool = True,
):
    """An onnxruntime CPU session (``threads`` intra-op threads, sequential execution).

    ``spinning=False`` stops its idle threads from busy-waiting after each run: on a shared
    machine, or next to torch in one process, spinning threads steal the cores others need.
    """
    ort = need("onnxruntime", "running an ONNX model")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise VitcompressError(f"onnxruntime cannot load the model ({one_line(e)})") from None


def agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    """max |difference|, SQNR in dB (``20 log10 ||ref|| / ||ref - out||``) and argmax agreement."""
    diff = np.asarray(out, np.float64) - np.asarray(ref, np.float64)
    err = float(np.linalg.norm(diff))
    sqnr = math.inf if err == 0 else 20 * math.log10(float(np.linalg.norm(ref)) / err)
    return {
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
        "sqnr_db": sqnr,
        "argmax_agree": float((np.argmax(ref, -1) == np.argmax(out, -1)).mean()),
    }


def check_onnx(
    path: str | Path | bytes,
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch: int = 2,
    x: torch.Tensor | None = None,
) -> dict:
    """Run the ONNX file and ``model`` on the same input; :func:`agreement` of their logits."""
    if x is None:
        x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    model = model.eval()
    with torch.no_grad():
        dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        ref = model(x.to(dt)).float().numpy()
    sess = ort_session(path)
    try:
        out = sess.run(None, {INPUT: x.numpy().astype(np.float32)})[0]
    except Exception as e:
        raise VitcompressError(f"onnxruntime cannot run the model ({one_line(e)})") from None
    return agreement(ref, out)


def set_metadata(model_proto: Any, metadata: dict) -> None:
    keep = {p.key: p.value for p in model_proto.metadata_props}
    for k, v in metadata.items():
        keep[str(k)] = v if isinstance(v, str) else json.dumps(v)
    del model_proto.metadata_props[:]
    for k, v in keep.items():
        p = model_proto.metadata_props.add()
        p.key, p.value = k, v


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def quantize_dynamic_onnx(src: str | Path, dst: str | Path) -> Path:
    """The peer: onnxruntime's ``quantize_dynamic`` (int8 weights, per-tensor defaults) of an
    fp32 ONNX file, metadata carried over."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with atomic_path(dst) as tmp:
        logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
        except Exception as e:
            raise VitcompressError(f"onnxruntime quantize_dynamic failed ({one_line(e)})") from None
        finally:
            logging.disable(logging.NOTSET)
        src_meta = read_metadata(src)
        proto = onnx.load(str(tmp))
        set_metadata(proto, {**src_meta, "vitcompress.format": "ort-quantize-dynamic"})
        onnx.save(proto, str(tmp))
    return dst


def onnx_ops(path: str | Path, optimized: bool = True) -> dict[str, int]:
    """How many nodes of each op type the model has, after onnxruntime's graph optimisations
    when ``optimized`` (what it really runs: e.g. ``MatMulIntegerToFloat`` for int8 QDQ)."""
    import tempfile

    import onnx

    if not optimized:
        proto = onnx.load(str(path))
    else:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "optimized.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ort_session(path, optimized_path=out)
            proto = onnx.load(str(out))
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


__all__ = [
    "INPUT",
    "ORT_DOMAIN",
    "OUTPUT",
    "agreement",
    "check_onnx",
    "one_line",
    "onnx_ops",
    "ort_session",
    "quantize_dynamic_onnx",
    "read_metadata",
    "set_metadata",
]
