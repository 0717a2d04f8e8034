"""Speed and size of the deployment variants of one model, on torch and onnxruntime.

``bench(checkpoint=... | model=..., img_size=224)`` builds the variants of one model, pins the
threads (``torch.set_num_threads``, onnxruntime ``intra_op_num_threads``) and times them in
passes (:func:`time_rounds`): every pass runs each variant in a block of back-to-back calls
after a warm-up call and a pause, so that load from other processes on a shared machine falls
on all variants alike and the ratios stay meaningful. It reports per
variant the median and p90 latency at batch 1, the throughput at batch 32 (images / median
batch time), the bytes of the artifact it runs from, and the speed-up over torch fp32 eager.

Variants (names as in the results):

- ``torch-fp32``: eager fp32, the baseline.
- ``torch-int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` of the Linears (what study B
  used).
- ``torch-int8``: ours, :func:`~vitcompress.quantize.quantize_` (int8 per-channel weights,
  calibrated static int8 activations) made real by :func:`~vitcompress.quantize.to_int8_`.
- ``ort-fp32``: the fp32 ONNX export on onnxruntime.
- ``ort-int8-dynamic``: the peer, onnxruntime's ``quantize_dynamic`` of that export.
- ``ort-int8-qdq``: ours, the INT8 QDQ export of the quantised model.
- ``ort-lowrank-fp32`` / ``ort-lowrank-int8-qdq``: MLP and patch projection factorised at
  ``rank_ratio`` (study B's layers), then fp32 / INT8 QDQ.
- ``ort-shrink-fp32`` / ``ort-shrink-int8-qdq``: ``shrink`` of each block's MLP neurons and
  attention heads (:mod:`vitcompress.shrink`, magnitude, one shot): structured sparsity that
  makes the dense layers narrower, then fp32 / INT8 QDQ.
- ``torch-sparse-csr-<s>`` / ``ort-sparse-<s>``: encoder Linears pruned to ``s`` unstructured,
  run through :mod:`vitcompress.sparse_exec` (CSR) in torch, and dense in onnxruntime (which has
  no sparse kernel: same speed as fp32, listed to show it).
- ``<ort variant>-mha``: the same ONNX model with each attention block as onnxruntime's fused
  ``MultiHeadAttention`` kernel (:func:`~vitcompress.export.export_onnx`,
  ``fused_attention=True``): same maths, about 20 fewer nodes per block.
- ``ort-<run>``: ``compare`` runs, compressed run directories of the same model (``vitcompress
  compress`` output: fine-tuned, pruned, factorised, quantised as its recipe said), exported as
  they are (INT8 as QDQ) and timed on onnxruntime against this model's ``torch-fp32``. The
  low-rank and sparse variants above are one-shot and only measure speed; a ``compare`` run is
  how a stacked recipe gets its accuracy next to its speed. Each also runs as
  ``ort-<run>-mha`` unless its attention products are quantised.

Each runtime runs as a user gets it: torch's OpenMP threads and onnxruntime's thread pool both
busy-wait (spin) for a while after a call, which is what makes them fast at batch 1. Switching
that off (``OMP_WAIT_POLICY=PASSIVE``) is no fair baseline: it makes both much slower at batch
1. But spinning threads starve whatever runs next on the same cores. Hence the blocks: a
variant's calls follow each other, and the pause before each block lets the previous runtime's
threads stop spinning. Each row records the
``OMP_WAIT_POLICY`` it ran under.

Random inputs (and random calibration batches unless ``calib`` is given): speed does not depend
on the values, but accuracy does, so accuracy is measured elsewhere (``benchmarks/run.py``).
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.measure import p90, time_rounds

DEFAULT_VARIANTS = (
    "torch-fp32",
    "torch-int8-dynamic",
    "torch-int8",
    "ort-fp32",
    "ort-fp32-mha",
    "ort-int8-dynamic",
    "ort-int8-qdq",
    "ort-int8-qdq-mha",
    "ort-lowrank-fp32",
    "ort-lowrank-int8-qdq",
    "ort-lowrank-int8-qdq-mha",
    "ort-shrink-fp32",
    "ort-shrink-int8-qdq",
    "ort-shrink-int8-qdq-mha",
    "torch-sparse-csr-0.9375",
    "torch-sparse-csr-0.96875",
    "ort-sparse-0.9375",
)
# a checkpoint that is already compressed runs as it is stored
COMPRESSED_VARIANTS = ("torch-model", "torch-model-int8", "ort-model", "ort-model-mha")
FUSED_SUFFIX = "-mha"  # an ort-* variant exported with fused attention
BASELINE = "torch-fp32"


def is_compressed(model: nn.Module) -> bool:
    """True when ``model`` holds layers or masks that a compression step left."""
    from vitcompress.steps.registry import describe_structure

    return bool(describe_structure(model))


@dataclass
class Variant:
    """One way to run the model: ``run(x)`` on a float32 numpy batch."""

    name: str
    runtime: str
    fmt: str
    run: Callable[[np.ndarray], object]
    bytes: int
    notes: dict = field(default_factory=dict)


def _pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once per process, before any parallel work
        pass


def torch_runner(model: nn.Module) -> Callable[[np.ndarray], object]:
    model.eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    from vitcompress.ort import INPUT, ort_session

    sess = ort_session(path, threads)  # spinning, onnxruntime's default (module docstring)
    return lambda x: sess.run(None, {INPUT: x})


def _torch_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _quantized_copy(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    from vitcompress.steps.quantize import QuantizeConfig, quantize_

    q = copy.deepcopy(model)
    # the classifier head stays fp32 (tiny, and the layer most sensitive to int8)
    quantize_(q, QuantizeConfig(weights="int8", activations="int8", ignore=["head", "head_dist"]),
              calib)  # fmt: skip
    return q


def _lowrank_copy(model: nn.Module, ratio: float) -> nn.Module:
    from vitcompress.steps.lowrank import LowRankConfig, factorize_

    m = copy.deepcopy(model)
    factorize_(m, LowRankConfig(rank_ratio=ratio))
    return m


def _shrunk_copy(model: nn.Module, fraction: float) -> nn.Module:
    from vitcompress.steps.shrink import ShrinkConfig, shrink_

    m = copy.deepcopy(model)
    shrink_(m, ShrinkConfig(mlp=fraction, heads=fraction))
    return m


def _pruned_copy(model: nn.Module, sparsity: float) -> nn.Module:
    from vitcompress.steps.prune import PruneConfig, prune_

    m = copy.deepcopy(model)
    prune_(m, PruneConfig(sparsity=sparsity, targets="blocks.*"))
    return m


def build_variants(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    names: Iterable[str],
    work_dir: Path,
    threads: int,
    calib: list[torch.Tensor],
    config: dict | None = None,
    rank_ratio: float = 0.25,
    compare: Iterable[tuple[str, nn.Module, dict]] = (),
    shrink: float = 0.5,
) -> list[Variant]:
    """The requested variants of ``model`` (module docstring), with their artifacts in
    ``work_dir``; then one ``ort-<label>`` variant per ``(label, model, config)`` of
    ``compare``."""
    from vitcompress.export import export_onnx
    from vitcompress.ort import quantize_dynamic_onnx, read_metadata
    from vitcompress.pack import bytes_stored

    cfg = dict(config or {})
    model = model.eval()
    out: list[Variant] = []
    cache: dict[str, object] = {}

    fused = False  # the variant being built has fused attention

    def onnx(key: str, m: nn.Module) -> Path:
        key += FUSED_SUFFIX if fused else ""
        p = work_dir / f"{key}.onnx"
        if key not in cache:
            cache[key] = export_onnx(m, p, input_shape, {"variant": key}, check=False,
                                     fused_attention=fused)  # fmt: skip
        return p

    def ort_as_stored(name: str, key: str, m: nn.Module, suffix: str = "") -> Variant:
        """``m`` exported as it is (the format its metadata names) on onnxruntime."""
        p = onnx(key, m)
        fmt = read_metadata(p).get("vitcompress.format", "?") + suffix
        return Variant(name, "onnxruntime", fmt, ort_runner(p, threads), p.stat().st_size)

    def restructured(name: str, key: str, make: Callable[[], nn.Module], what: str) -> Variant:
        """A one-shot restructured copy (made once), as fp32 or INT8 QDQ per ``name``."""
        if key not in cache:
            cache[key] = make()
        m = cache[key]
        if name.endswith("fp32"):
            p, fmt = onnx(f"{key}-fp32", m), f"fp32, {what}"
        else:
            if key + "-q" not in cache:
                cache[key + "-q"] = _quantized_copy(m, calib)
            p, fmt = onnx(f"{key}-int8-qdq", cache[key + "-q"]), f"int8 QDQ, {what}"
        return Variant(name, "onnxruntime", fmt, ort_runner(p, threads), p.stat().st_size)

    def quantized() -> nn.Module:
        if "q" not in cache:
            cache["q"] = _quantized_copy(model, calib)
        return cache["q"]  # type: ignore[return-value]

    for full_name in names:
        fused = full_name.startswith("ort-") and full_name.endswith(FUSED_SUFFIX)
        name = full_name.removesuffix(FUSED_SUFFIX) if fused else full_name
        if name == "torch-model":
            v = Variant(name, "torch", "as stored", torch_runner(model), bytes_stored(model, cfg))
        elif name == "torch-model-int8":
            from vitcompress.int8 import to_int8_
            from vitcompress.quantize import QuantLinear

            q = copy.deepcopy(model)
            if not any(isinstance(m, QuantLinear) for m in q.modules()):
                continue  # not quantised: nothing to make real
            to_int8_(q)
            v = Variant(name, "torch", "int8 real (to_int8_)", torch_runner(q),
                        bytes_stored(q, cfg))  # fmt: skip
        elif name == "ort-model":
            v = ort_as_stored(name, "model", model)
        elif name == "torch-fp32":
            v = Variant(name, "torch", "fp32", torch_runner(model), bytes_stored(model, cfg))
        elif name == "torch-int8-dynamic":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
                )
            v = Variant(name, "torch", "int8 dynamic (torch.ao)", torch_runner(q), _torch_bytes(q))
        elif name == "torch-int8":
            from vitcompress.int8 import to_int8_

            q = copy.deepcopy(quantized())
            to_int8_(q)
            v = Variant(name, "torch", "int8 static (ours)", torch_runner(q), bytes_stored(q, cfg))
        elif name == "ort-fp32":
            p = onnx("fp32", model)
            v = Variant(name, "onnxruntime", "fp32", ort_runner(p, threads), p.stat().st_size)
        elif name == "ort-int8-dynamic":
            dst = work_dir / f"ort-dynamic{FUSED_SUFFIX * fused}.onnx"
            p = quantize_dynamic_onnx(onnx("fp32", model), dst)
            v = Variant(name, "onnxruntime", "int8 dynamic (ORT peer)", ort_runner(p, threads),
                        p.stat().st_size)  # fmt: skip
        elif name == "ort-int8-qdq":
            p = onnx("int8-qdq", quantized())
            v = Variant(name, "onnxruntime", "int8 QDQ (ours)", ort_runner(p, threads),
                        p.stat().st_size)  # fmt: skip
        elif name in ("ort-lowrank-fp32", "ort-lowrank-int8-qdq"):
            v = restructured(name, "lowrank", lambda: _lowrank_copy(model, rank_ratio),
                             f"low-rank {rank_ratio}")  # fmt: skip
        elif name in ("ort-shrink-fp32", "ort-shrink-int8-qdq"):
            v = restructured(name, "shrink", lambda: _shrunk_copy(model, shrink),
                             f"{shrink:.0%} of heads and MLP neurons removed")  # fmt: skip
        elif name.startswith(("torch-sparse-csr-", "ort-sparse-")):
            s = float(name.rsplit("-", 1)[1])
            pruned = cache.setdefault(f"p{s}", _pruned_copy(model, s))
            if name.startswith("ort-"):
                p = onnx(f"sparse-{s}", pruned)
                v = Variant(name, "onnxruntime", f"fp32 {s:.2%} sparse, dense kernels",
                            ort_runner(p, threads), p.stat().st_size)  # fmt: skip
            else:
                from vitcompress.sparse_exec import sparsify_for_inference, summary

                sp = copy.deepcopy(pruned)
                example = torch.from_numpy(_input(1, input_shape))
                report = sparsify_for_inference(sp, min_sparsity=0.5, example_input=example)
                v = Variant(name, "torch", f"fp32 {s:.2%} sparse, CSR", torch_runner(sp),
                            bytes_stored(pruned, cfg), {"sparse": summary(report)})  # fmt: skip
        else:
            raise VitcompressError(
                f"unknown bench variant {full_name!r}; known: {', '.join(DEFAULT_VARIANTS)} "
                "(sparse ones take any sparsity, e.g. torch-sparse-csr-0.9; onnxruntime ones "
                f"take {FUSED_SUFFIX} for fused attention)"
            )
        if fused:
            v.name, v.fmt = full_name, v.fmt + ", fused attention"
        out.append(v)
    for label, other, other_cfg in compare:
        packed = bytes_stored(other, other_cfg)  # one packing per run, for both exports
        for fused in (False, True):
            try:
                v = ort_as_stored(f"ort-{label}" + FUSED_SUFFIX * fused, f"compare-{label}",
                                  other.eval(), f", run {label}")  # fmt: skip
            except VitcompressError:
                if not fused:
                    raise
                continue  # attention products quantised: no fused form (export_onnx says why)
            if fused:
                v.fmt += ", fused attention"
            v.notes["packed_bytes"] = packed
            out.append(v)
    return out


def _load_compare(runs: Iterable[str | Path], shape: tuple[int, ...], names: set[str]) -> list:
    """``(label, model, config)`` of each run directory, checked to take ``shape`` inputs."""
    from vitcompress.export import input_shape_of
    from vitcompress.runs import load_run

    out = []
    for run in runs:
        path = Path(run)
        other, cfg = load_run(path)
        got = input_shape_of(cfg)
        if got != tuple(shape):
            raise VitcompressError(
                f"bench: compare run {path} takes {got[0]}x{got[1]}x{got[2]} images, the "
                f"benchmarked model {shape[0]}x{shape[1]}x{shape[2]}"
            )
        label = path.name
        taken = {f"ort-{label}", f"ort-{label}{FUSED_SUFFIX}"} & set(names)
        if taken or any(label == lab for lab, _, _ in out):
            raise VitcompressError(f"bench: two variants named ort-{label}; rename a run")
        out.append((label, other, cfg))
    return out


def _input(batch: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)


def bench(
    checkpoint: str | Path | None = None,
    model: str | None = None,
    img_size: int = 224,
    threads: int = 2,
    variants: Iterable[str] | None = None,
    rounds_b1: int = 15,
    rounds_b32: int = 4,
    batch: int = 32,
    warmup: int = 2,
    calib: list[torch.Tensor] | None = None,
    rank_ratio: float = 0.25,
    work_dir: str | Path | None = None,
    eval_loader: Iterable | None = None,
    compare: Iterable[str | Path] = (),
    pause: float = 0.2,
    passes: int = 3,
) -> list[dict]:
    """Benchmark the deployment variants of a run directory or a preset (module docstring).

    Args:
        checkpoint: a run directory (its model, trained or compressed); or
        model: a preset name (``vit-small``), random weights, at ``img_size`` with 3 channels
            and 1000 classes.
        threads: intra-op threads for torch and onnxruntime alike.
        variants: names from :data:`DEFAULT_VARIANTS` (the default for a dense model) or
            :data:`COMPRESSED_VARIANTS` (the default for a compressed checkpoint).
        rounds_b1, rounds_b32: timed calls per variant at batch 1 and at ``batch``.
        calib: calibration batches for the int8 variants (default: 4 random batches of 8).
        work_dir: where the ONNX files go (default: a temporary directory).
        eval_loader: ``(images, labels)`` batches; when given, each row gets ``top1`` (%).
        compare: compressed run directories of the same model, timed (and evaluated) as
            ``ort-<directory name>`` next to the variants.
        pause: seconds between blocks of calls (:func:`time_rounds`).
        passes: passes over the variants (:func:`time_rounds`); more passes spread each
            variant's calls over the whole run, so a burst of load on a shared machine hits
            all variants alike (useful for sub-millisecond models).

    Returns:
        One dict per variant: ``variant``, ``runtime``, ``format``, ``latency_ms_b1`` (median),
        ``latency_p90_ms_b1``, ``latency_min_ms_b1``, ``throughput_b32`` (images / median batch
        time), ``throughput_best_b32`` (images / fastest batch time), ``bytes_stored``,
        ``speedup_b1``, ``speedup_b32`` (medians) and ``speedup_best_b1``, ``speedup_best_b32``
        (fastest calls) over torch fp32 when it is among the variants, ``size_ratio``,
        ``threads``, ``model``, ``img_size``, ``notes``. Thread settings are restored after.
    """
    from vitcompress.export import input_shape_of
    from vitcompress.models import build_model, model_config

    if (checkpoint is None) == (model is None):
        raise VitcompressError("bench: give a checkpoint (run directory) or a model preset")
    if not isinstance(threads, int) or threads < 1:
        raise VitcompressError(f"bench: threads must be an integer >= 1, got {threads!r}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise VitcompressError(f"bench: passes must be an integer >= 1, got {passes!r}")
    if checkpoint is not None:
        from vitcompress.runs import load_run

        net, config = load_run(Path(checkpoint))
        label = str(checkpoint)
    else:
        config = {"model": model_config(model, img_size=img_size)}
        net = build_model(config["model"])
        label = model
    if variants is None:
        variants = COMPRESSED_VARIANTS if is_compressed(net) else DEFAULT_VARIANTS
    names = list(variants)
    if not names:
        raise VitcompressError("bench: no variants to run")
    shape = input_shape_of(config)
    others = _load_compare(compare, shape, set(names))
    saved_threads = torch.get_num_threads()
    _pin_threads(threads)
    try:
        return _bench(net, config, label, shape, names, threads, calib, rank_ratio, work_dir,
                      rounds_b1, rounds_b32, batch, warmup, eval_loader, others, pause,
                      passes)  # fmt: skip
    finally:
        torch.set_num_threads(saved_threads)


def _bench(net, config, label, shape, names, threads, calib, rank_ratio, work_dir, rounds_b1,
           rounds_b32, batch, warmup, eval_loader, others, pause, passes
           ) -> list[dict]:  # fmt: skip
    if calib is None:
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn((8, *shape), generator=g) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(work_dir) if work_dir is not None else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        vs = build_variants(net.eval(), shape, names, wd, threads, calib, config, rank_ratio,
                            others)  # fmt: skip
        t1 = time_rounds(vs, _input(1, shape), rounds_b1, warmup, passes, pause)
        tb = time_rounds(vs, _input(batch, shape), rounds_b32, min(warmup, 1), passes, pause)
        top1 = evaluate_variants(vs, eval_loader) if eval_loader is not None else {}
    rows = []
    for v in vs:
        rows.append(
            {
                "variant": v.name,
                "runtime": v.runtime,
                "format": v.fmt,
                "latency_ms_b1": statistics.median(t1[v.name]) * 1000,
                "latency_p90_ms_b1": p90(t1[v.name]) * 1000,
                "latency_min_ms_b1": min(t1[v.name]) * 1000,
                f"throughput_b{batch}": batch / statistics.median(tb[v.name]),
                f"throughput_best_b{batch}": batch / min(tb[v.name]),
                "bytes_stored": v.bytes,
                "threads": threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)"),
                "model": label,
                "img_size": shape[1],
                "notes": v.notes,
            }
        )
        if top1:
            rows[-1]["top1"] = top1[v.name]
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    for r in rows:
        if base is not None:
            r["speedup_b1"] = base["latency_ms_b1"] / r["latency_ms_b1"]
            r[f"speedup_b{batch}"] = r[f"throughput_b{batch}"] / base[f"throughput_b{batch}"]
            # from the fastest call of each: on a shared machine, the least disturbed estimate
            r["speedup_best_b1"] = base["latency_min_ms_b1"] / r["latency_min_ms_b1"]
            r[f"speedup_best_b{batch}"] = (
                r[f"throughput_best_b{batch}"] / base[f"throughput_best_b{batch}"]
            )
            r["size_ratio"] = base["bytes_stored"] / r["bytes_stored"]
    return rows


def _logits(out: object) -> np.ndarray:
    if isinstance(out, (list, tuple)):  # onnxruntime returns a list of outputs
        out = out[0]
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def evaluate_variants(
    variants: list[Variant], loader: Iterable, limit: int | None = None
) -> dict[str, float]:
    """Top-1 accuracy (%) of each variant over ``loader``'s ``(images, labels)`` batches."""
    correct = {v.name: 0 for v in variants}
    seen = 0
    for x, y in loader:
        if limit is not None and seen >= limit:
            break
        xn = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        labels = y.numpy()
        for v in variants:
            correct[v.name] += int((_logits(v.run(xn)).argmax(-1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise VitcompressError("evaluate_variants: the loader yielded no images")
    return {k: 100.0 * c / seen for k, c in correct.items()}


def format_table(rows: list[dict]) -> str:
    """A plain-text (Markdown) table of :func:`bench` results."""
    if not rows:
        return "(no results)"
    tp = next(k for k in rows[0] if k.startswith("throughput_b"))
    b = tp.removeprefix("throughput_b")
    has_ratio = "speedup_b1" in rows[0]
    head = ["variant", "format", "b1 median ms", "b1 p90 ms", f"b{b} img/s", "MB"]
    if has_ratio:
        head += ["x b1", f"x b{b}", "x smaller"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            r["format"],
            f"{r['latency_ms_b1']:.1f}",
            f"{r['latency_p90_ms_b1']:.1f}",
            f"{r[tp]:.1f}",
            f"{r['bytes_stored'] / 1e6:.2f}",
        ]
        if has_ratio:
            cells += [
                f"{r['speedup_b1']:.2f}",
                f"{r[f'speedup_b{b}']:.2f}",
                f"{r['size_ratio']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_cli(
    checkpoint: Path | None,
    model: str | None,
    img_size: int,
    threads: int,
    json_out: bool,
    compare: Iterable[Path] = (),
    variants: Iterable[str] | None = None,
    passes: int = 3,
) -> list[dict]:
    """``vitcompress bench``: run :func:`bench` and print a table (or JSON); returns the rows."""
    rows = bench(checkpoint=checkpoint, model=model, img_size=img_size, threads=threads,
                 compare=compare, variants=variants, passes=passes)  # fmt: skip
    from vitcompress.fileio import dumps_strict

    print(dumps_strict(rows) if json_out else format_table(rows))
    return rows


__all__ = [
    "COMPRESSED_VARIANTS",
    "DEFAULT_VARIANTS",
    "is_compressed",
    "Variant",
    "bench",
    "bench_cli",
    "build_variants",
    "evaluate_variants",
    "format_table",
]
