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
) -> dict[str, float]:
    """Median and p90 wall time of one forward pass at ``batch_size``, after warm-up."""
    model.eval()
    x = torch.randn((batch_size, *input_shape), device=device)
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
