"""What a model costs: parameters (total and non-zero), FLOPs, latency, throughput."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def params_total(model: nn.Module) -> int:
    """Parameters of the model as built (buffers such as masks are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def params_nonzero(model: nn.Module) -> int:
    """Parameters that are not exactly zero: what a sparse format has to store."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def flops_per_image(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on one image, counted by torch on meta."""
    was_training = model.training
    model.eval()
    meta = _to_meta(model)
    x = torch.empty((1, *input_shape), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def _to_meta(model: nn.Module) -> nn.Module:
    import copy

    if all(p.is_meta for p in model.parameters()):
        return model
    with torch.device("meta"):
        clone = copy.deepcopy(model).to("meta")
    return clone


@torch.no_grad()
def latency_ms(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int = 1,
    warmup: int = 3,
    iters: int = 20,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Median and p90 wall time of one forward pass at ``batch_size``, after warm-up."""
    model.eval()
    x = torch.randn((batch_size, *input_shape), device=device, dtype=dtype)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "mean_ms": statistics.fmean(times),
        "std_ms": statistics.pstdev(times),
    }


def _zero_fraction(model: nn.Module, layers: list[str]) -> float:
    """Zeros among the weights of the pruned layers (0.0 if none).

    The layers are named by the recipe's prune records: a later quantize step replaces the
    module (and drops its mask buffer) but keeps the name and the zeros.
    """
    total = zeros = 0
    for name in layers:
        w = model.get_submodule(name).weight
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


def compression_fields(model: nn.Module, dense: nn.Module, recipe, config: dict) -> dict:
    """The result fields that describe what a recipe did to a model, counted from what is stored.

    ``bytes_fp32`` is the dense fp32 size of the model before the recipe, so
    ``bytes_fp32 / bytes_stored`` is the compression ratio.
    """
    from vitcompress.pack import bytes_stored

    fmt, act, pattern, target, ratio = "fp32", None, None, 0.0, None
    for step in recipe.steps:
        c = step.config
        if step.kind == "quantize":
            fmt, act = c.weights, c.activations
        elif step.kind == "prune":
            pattern = c.pattern
            target = c.target_sparsity
        elif step.kind == "lowrank":
            ratio = c.rank_ratio
        elif step.kind == "shrink":  # heads / neurons removed: fewer parameters, no zeros
            pattern = "structured"
    pruned = sorted(
        {n for r in config.get("compression", []) if r["kind"] == "prune" for n in r["layers"]}
    )
    ranks = [
        (m.rank, min(m.first.in_features, m.second.out_features))
        for m in model.modules()
        if hasattr(m, "rank") and hasattr(m, "first") and isinstance(m.first, nn.Linear)
    ]
    if ranks and ratio is None:
        ratio = sum(r / full for r, full in ranks) / len(ranks)
    return {
        "params_total": params_total(model),
        "params_nonzero": params_nonzero(model),
        "bytes_stored": bytes_stored(model, config),
        "bytes_fp32": 4 * params_total(dense),
        "format": fmt,
        "activations": act,
        "pattern": pattern,
        "sparsity_target": target,
        "sparsity": _zero_fraction(model, pruned),
        "rank_ratio": ratio,
    }


def deployable(model: nn.Module, recipe) -> tuple[nn.Module | None, str, torch.dtype]:
    """The model as a runtime here would execute it: (module, runtime name, input dtype).

    INT8 weights with INT8 activations run real integer GEMMs; bf16/fp16 run in that dtype;
    formats without a CPU kernel (fp8, int4, ...) give ``(None, "emulated", ...)``: their latency
    is not measured rather than reported from an emulation.
    """
    import copy

    from vitcompress.errors import VitcompressError

    quant = [s.config for s in recipe.steps if s.kind == "quantize"]
    if not quant:
        return model, "torch-fp32", torch.float32
    q = quant[-1]
    if q.weights in ("fp32", "tf32") and q.activations in (None, "fp32", "tf32"):
        return model, "torch-fp32", torch.float32
    if q.weights == q.activations == "bf16" or (q.weights == "bf16" and q.activations is None):
        return copy.deepcopy(model).to(torch.bfloat16), "torch-bf16", torch.bfloat16
    if q.weights == q.activations == "fp16" or (q.weights == "fp16" and q.activations is None):
        return copy.deepcopy(model).to(torch.float16), "torch-fp16", torch.float16
    if q.weights == "int8" and q.activations == "int8" and q.attention_matmul == "fp32":
        from vitcompress.quantize import to_int8_

        fast = copy.deepcopy(model)
        try:
            to_int8_(fast)
        except VitcompressError:
            return None, "emulated", torch.float32
        return fast, "torch-int8", torch.float32
    return None, "emulated", torch.float32


def speed_fields(model: nn.Module, recipe, input_shape: tuple[int, int, int]) -> dict:
    """Latency at batch 1 (median ms) and throughput at batch 32 (images/s) on the CPU runtime
    that executes the model's format; None where no runtime here executes it."""
    runnable, runtime, dtype = deployable(model, recipe)
    if runnable is None:
        return {"runtime": runtime, "latency_ms_b1": None, "throughput_b32": None}
    b1 = latency_ms(runnable, input_shape, 1, warmup=3, iters=20, dtype=dtype)
    b32 = latency_ms(runnable, input_shape, 32, warmup=1, iters=5, dtype=dtype)
    return {
        "runtime": runtime,
        "latency_ms_b1": b1["median_ms"],
        "latency_ms_b1_p90": b1["p90_ms"],
        "throughput_b32": 32 / (b32["median_ms"] / 1000),
        "threads": torch.get_num_threads(),
    }
