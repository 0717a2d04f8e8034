"""Calibration data: what a batch is, and one pass that shows chosen layers their inputs.

A calibration batch may be a tensor of images, an ``(inputs, labels, ...)`` tuple as a
DataLoader yields, or a mapping of keyword inputs (``{"pixel_values": x}``, as Hugging Face
processors give). Every step that reads calibration data unpacks it with :func:`model_inputs`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import VitcompressError


def model_inputs(batch: Any) -> torch.Tensor | dict[str, Any]:
    """The model input of one calibration batch: a tensor, or a dict of keyword inputs."""
    if isinstance(batch, list | tuple):
        if not batch:
            raise VitcompressError("calibration data yields an empty tuple")
        batch = batch[0]
    if isinstance(batch, Mapping):
        return dict(batch)
    if not torch.is_tensor(batch):
        raise VitcompressError(
            f"calibration data yields {type(batch).__name__}; expected tensors, (inputs, labels) "
            "pairs or dicts of keyword inputs"
        )
    return batch


def forward_batch(model: nn.Module, batch: Any, device: torch.device) -> None:
    """Run ``model`` on one calibration batch, moved to ``device``."""
    x = model_inputs(batch)
    if isinstance(x, dict):
        model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()})
    else:
        model(x.to(device))


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def run_calibration(model: nn.Module, calib_data: Iterable, max_batches: int | None) -> int:
    """Run at most ``max_batches`` batches through ``model`` in eval mode without gradients,
    never pulling one batch more from the iterable; returns how many ran (at least one)."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in itertools.islice(calib_data, max_batches):
                forward_batch(model, batch, device)
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise VitcompressError("calibration data yielded no batches")
    return seen


def input_rows(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows its weight multiplies, ``(tokens, features)``: a Linear's
    tokens flattened over every leading dim, a Conv2d's unfolded patches (``in*kh*kw``
    features, in the memory order of its weight)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise VitcompressError(
                f"{name}: calibrated pruning supports Conv2d with groups=1 and numeric padding only"
            )
        x = F.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        ).transpose(1, 2)  # (B, L, C*kh*kw)
    return x.reshape(-1, x.shape[-1])  # (tokens, features)


def observe_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib_data: Iterable,
    observe: Callable[[str, nn.Module, torch.Tensor], None],
    max_batches: int | None = None,
) -> None:
    """Run ``model`` over at most ``max_batches`` calibration batches and call
    ``observe(name, module, input)`` with the input of each of ``layers``.

    Raises:
        VitcompressError: a layer the data never reached (empty data, or an unused layer).
    """
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.add(name)
            observe(name, module, inputs[0].detach())

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        run_calibration(model, calib_data, max_batches)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in seen]
    if missing:
        raise VitcompressError(
            f"calibration data never reached layer {missing[0]!r} (empty data, or an unused layer)"
        )


__all__ = [
    "forward_batch",
    "input_rows",
    "model_device",
    "model_inputs",
    "observe_inputs",
    "run_calibration",
]
