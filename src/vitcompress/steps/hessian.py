"""The calibration machinery of GPTQ and SparseGPT: the Hessian ``H = 2 X^T X / n`` of each
chosen layer's inputs, collected block by block while the layers are compressed.

:func:`compress_sequentially_` runs the calibration batches through the model one transformer
block at a time, as the reference implementations do:

1. the inputs of ``blocks[0]`` are captured once (the forward stops there);
2. for each block ``k``: its chosen layers see the block's inputs, their Hessians are summed,
   then ``compress(name, module, H)`` compresses each of them; the block then runs again, now
   compressed, and its outputs become the inputs of block ``k + 1``.

So the layers of block ``k`` are calibrated on what blocks ``0..k-1`` *as compressed* produce,
and each block can correct some of the error of those before it instead of compounding it
blindly. Within a block every layer sees the block's input as it is before the block is
compressed (the reference's default; its "true sequential" order inside a block is not done).
Only one block's Hessians exist at a time.

The blocks are ``model.blocks`` when it is an ``nn.Sequential`` (our ViT and DeiT, and the
models imported into them): a Sequential runs each block on the output of the one before, which
is what step 2 relies on. Chosen layers outside the blocks are compressed in a pass of their
own: those that run before ``blocks[0]`` first (the capture is then repeated), those after the
last block (the classifier heads) on a full pass through the compressed model. Any other model
(no ``blocks``, or a ModuleList whose ``forward`` might do anything between blocks) gets one
pass over all its chosen layers, then every layer is compressed (all their Hessians at once,
each measured on the model before any compression).

The calibration batches are read once (at most ``max_batches``) and kept, inputs only, so that
any iterable works, a one-shot generator included; the inputs of the current block are kept
alongside (``batches x tokens x width`` floats).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.steps.calib import forward_batch, input_rows, model_device, model_inputs

CompressFn = Callable[[str, nn.Module, torch.Tensor], None]


class HessianSum:
    """``2 X^T X / n`` of the rows ``X`` added so far, summed in float64."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None  # (k, k)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add the rows ``(tokens, k)`` of one batch."""
        r = rows.detach().to(torch.float64)  # (tokens, k)
        if self.sum is None:
            self.sum = torch.zeros(r.shape[1], r.shape[1], dtype=torch.float64, device=r.device)
        self.sum.addmm_(r.T, r)
        self.count += r.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None or self.count == 0:
            raise VitcompressError("no calibration inputs were seen")
        return self.sum.mul_(2.0 / self.count)  # in place: the sum is not needed again


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it wanted are captured."""


def hessians(layers: Mapping[str, nn.Module], run: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """The Hessian of the inputs of each of ``layers`` that ``run()`` reaches (others left out)."""
    sums = {n: HessianSum() for n in layers}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            sums[name].add(input_rows(name, module, inputs[0]))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: s.hessian() for n, s in sums.items() if s.count}


def _compress_all(
    layers: Mapping[str, nn.Module], hs: dict[str, torch.Tensor], compress: CompressFn
) -> None:
    missing = [n for n in layers if n not in hs]
    if missing:
        raise VitcompressError(
            f"calibration data never reached layer {missing[0]!r} (empty data, or an unused layer)"
        )
    for name, module in layers.items():
        compress(name, module, hs.pop(name))  # one Hessian freed after another


def _run_block(block: nn.Module, xs: list) -> list:
    return [block(x) for x in xs]


def _blocks(model: nn.Module) -> nn.Sequential | None:
    blocks = getattr(model, "blocks", None)
    return blocks if isinstance(blocks, nn.Sequential) and len(blocks) > 0 else None


def compress_sequentially_(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib_data: Iterable,
    compress: CompressFn,
    max_batches: int | None = None,
) -> None:
    """Call ``compress(name, module, H)`` once for each of ``layers``, ``H`` (float64,
    ``in x in``) the Hessian of its inputs, block by block (module docstring).

    ``compress`` may change the module in place or put another in its place (by name); the
    model runs in eval mode without gradients and is left in the mode it was in.

    Raises:
        VitcompressError: calibration data without batches, or a layer it never reaches.
    """
    inputs = [model_inputs(b) for b in itertools.islice(calib_data, max_batches)]
    if not inputs:
        raise VitcompressError("calibration data yielded no batches")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _sequential(model, dict(layers), inputs, compress, device)
    finally:
        model.train(was_training)


def _sequential(
    model: nn.Module,
    layers: dict[str, nn.Module],
    inputs: list,
    compress: CompressFn,
    device: torch.device,
) -> None:
    def full_pass() -> None:
        for x in inputs:
            forward_batch(model, x, device)

    blocks = _blocks(model)
    if blocks is None:  # any module tree: one pass over every chosen layer
        _compress_all(layers, hessians(layers, full_pass), compress)
        return
    owner: dict[int, int] = {}
    for k, block in enumerate(blocks):
        owner.update({id(m): k for m in block.modules()})
    in_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for n, m in layers.items():
        if id(m) in owner:
            in_block[owner[id(m)]][n] = m
    outside = {n: m for n, m in layers.items() if id(m) not in owner}

    def capture() -> list:
        xs: list = []

        def stop(module: nn.Module, args: tuple) -> None:
            xs.append(args[0])
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(stop)
        try:
            for x in inputs:
                try:
                    forward_batch(model, x, device)
                except _Stop:
                    pass
        finally:
            handle.remove()
        if len(xs) != len(inputs):
            raise VitcompressError("calibration batches did not all reach the model's blocks")
        return xs

    captured: list = []
    before = hessians(outside, lambda: captured.append(capture())) if outside else {}
    if before:  # layers that run before the blocks: compressed first, then the capture redone
        _compress_all({n: outside.pop(n) for n in list(before)}, before, compress)
        captured = []
    xs = captured[0] if captured else capture()
    last = max((k for k, mine in enumerate(in_block) if mine), default=-1)
    for k in range(last + 1):
        block, mine = blocks[k], in_block[k]
        if mine:
            _compress_all(mine, hessians(mine, partial(_run_block, block, xs)), compress)
        if k < last:  # the compressed block's outputs: the next one's inputs
            xs = _run_block(block, xs)
    xs = []  # freed before the last pass
    if outside:  # after the blocks (the heads): one pass through the compressed model
        _compress_all(outside, hessians(outside, full_pass), compress)


__all__ = ["HessianSum", "compress_sequentially_", "hessians"]
