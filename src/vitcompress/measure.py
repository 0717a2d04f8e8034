"""What a model costs: parameters (total and non-zero), FLOPs, latency, throughput."""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitcompress.pack import bytes_stored
from vitcompress.steps.recipe import Recipe, result_fields, runtime_of


def machine_load() -> dict:
    """The 1-minute load average and the CPUs this process may use, recorded beside every
    latency: a load well above the CPU count means other work shared the cores, and the report
    says so next to the number."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        load = None
    return {"load_avg_1m": load, "cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count()}  # fmt: skip


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


def p90(times: list[float]) -> float:
    """The 90th percentile of ``times`` (nearest rank)."""
    s = sorted(times)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def time_rounds(
    variants: list,
    x: object,
    rounds: int,
    warmup: int,
    passes: int = 3,
    pause: float = 0.2,
) -> dict[str, list[float]]:
    """Seconds per call of each variant (anything with ``name`` and ``run(x)``), ``rounds``
    calls each.

    The calls are split over ``passes`` sweeps through the variants (load that comes and goes
    falls on all of them); in each sweep a variant sleeps ``pause`` seconds (the previous
    runtime's threads stop spinning), runs ``warmup`` untimed calls (at least one: its own
    threads wake up) and then its share of the timed calls back to back.
    """
    passes = max(1, min(passes, rounds))
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(passes):
        share = rounds // passes + (1 if i < rounds % passes else 0)
        for v in variants:
            time.sleep(pause)
            for _ in range(max(1, warmup)):
                v.run(x)
            for _ in range(share):
                t0 = time.perf_counter()
                v.run(x)
                times[v.name].append(time.perf_counter() - t0)
    return times


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
    return {
        "median_ms": statistics.median(times),
        "p90_ms": p90(times),
        "mean_ms": statistics.fmean(times),
        "std_ms": statistics.pstdev(times),
    }


def compression_fields(
    model: nn.Module, dense: nn.Module, recipe: Recipe, reports: list[dict], config: dict
) -> dict:
    """The result fields of a compressed model, counted from what is stored: parameters, bytes
    as packed, and what each of the recipe's steps reports (format, sparsity, pattern, ...).

    ``bytes_fp32`` is the dense fp32 size of the model before the recipe, so
    ``bytes_fp32 / bytes_stored`` is the compression ratio.
    """
    return {
        "params_total": params_total(model),
        "params_nonzero": params_nonzero(model),
        "bytes_stored": bytes_stored(model, config),
        "bytes_fp32": 4 * params_total(dense),
        **result_fields(model, recipe, reports),
    }


def speed_fields(model: nn.Module, recipe: Recipe, input_shape: tuple[int, int, int]) -> dict:
    """Latency at batch 1 (median ms) and throughput at batch 32 (images/s) on the CPU runtime
    that executes the model's format; None where no runtime here executes it."""
    runnable, runtime, dtype = runtime_of(model, recipe)
    if runnable is None:
        return {"runtime": runtime, "latency_ms_b1": None, "throughput_b32": None}
    b1 = latency_ms(runnable, input_shape, 1, warmup=3, iters=20, dtype=dtype)
    b32 = latency_ms(runnable, input_shape, 32, warmup=1, iters=5, dtype=dtype)
    return {
        **machine_load(),
        "runtime": runtime,
        "latency_ms_b1": b1["median_ms"],
        "latency_ms_b1_p90": b1["p90_ms"],
        "throughput_b32": 32 / (b32["median_ms"] / 1000),
        "threads": torch.get_num_threads(),
    }
