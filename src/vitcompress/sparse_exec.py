"""Sparse execution: run highly pruned Linears through a CSR kernel when that is faster.

A dense GEMM does the same work whatever the zeros, so unstructured sparsity only saves time
when the product skips them. :class:`SparseLinear` keeps the weight as a CSR matrix and computes
``y^T = b + W_csr @ x^T`` (``torch.addmm`` with the sparse matrix on the left), over tiles of
``chunk`` tokens so that each tile of ``x^T`` stays in cache.

Why this form: ``addmm(b, W_csr, x^T)`` (the sparse matrix on the left, CSR) beat
``sparse.mm``, COO and ``x @ W^T_csr`` on the CPUs tried, and without tiling the speed-up fell
as the token count grew. The speed-up over dense is modelled as
``1 / (SPARSE_COST * density)``: sparse only wins at high sparsity (``benchmarks/RESULTS.md``
has the measured curve). :func:`sparsify_for_inference` converts only the layers where the
kernel wins, by measuring each layer on its real input shape (given an example input) or by
that cost model.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.targets import Patterns, replace_module, select_modules

# Sparse time per non-zero relative to dense time per weight (see the module docstring).
SPARSE_COST = 5.5


def predicted_speedup(density: float) -> float:
    """Predicted speed-up of :class:`SparseLinear` over dense at ``density`` (1 - sparsity)."""
    return 1.0 / (SPARSE_COST * max(density, 1e-9))


class SparseLinear(nn.Module):
    """A Linear whose weight is a CSR matrix; same outputs as the dense layer up to fp32 rounding.

    Attributes:
        weight_csr: the ``(out, in)`` weight in CSR (a buffer: inference only).
        bias: fp32 ``(out,)`` or None.
        chunk: tokens per tile of the product.
    """

    execution_only = True  # a form to run, not to store: pack the pruned model instead

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int = 128):
        super().__init__()
        if weight.ndim != 2:
            raise VitcompressError(f"SparseLinear needs a 2-D weight, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "CSR support is in beta": known, and tested here
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("weight_csr", csr)
        b = None if bias is None else bias.detach().clone()
        self.register_buffer("bias", b)
        self.chunk = chunk

    @classmethod
    def from_linear(cls, linear: nn.Linear, chunk: int = 128) -> SparseLinear:
        return cls(linear.weight, linear.bias, chunk)

    @property
    def nnz(self) -> int:
        return int(self.weight_csr.values().numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_csr.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        T = x2.shape[0]
        out = torch.empty(T, self.out_features, dtype=x.dtype, device=x.device)  # (T, out)
        bias = None if self.bias is None else self.bias.to(x.dtype).unsqueeze(1)  # (out, 1)
        for i in range(0, T, self.chunk):
            xt = x2[i : i + self.chunk].t()  # (in, t)
            if bias is None:
                yt = torch.sparse.mm(self.weight_csr, xt)  # (out, t)
            else:
                yt = torch.addmm(bias, self.weight_csr, xt)  # (out, t)
            out[i : i + self.chunk] = yt.t()
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sparsity={self.sparsity:.4f}, chunk={self.chunk}"
        )


def _min_ms(fn, x: torch.Tensor, iters: int) -> float:
    """Fastest of ``iters`` runs: on a shared machine the minimum is the least noisy estimate."""
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return min(times) * 1000


def measure_speedup(linear: nn.Linear, x: torch.Tensor, iters: int = 7) -> float:
    """Dense time / sparse time of ``linear`` on input ``x`` (min of ``iters`` runs each)."""
    sparse = SparseLinear.from_linear(linear)
    dense_ms = _min_ms(lambda t: F.linear(t, linear.weight, linear.bias), x, iters)
    sparse_ms = _min_ms(sparse, x, iters)
    return dense_ms / max(sparse_ms, 1e-9)


def _layer_inputs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict:
    """The input of each named layer on one forward pass of ``example``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:

        def hook(m, inputs, output, n=n):
            seen.setdefault(n, inputs[0].detach())

        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def sparsify_for_inference(
    model: nn.Module,
    min_sparsity: float = 0.8,
    example_input: torch.Tensor | None = None,
    min_speedup: float = 1.1,
    targets: Patterns = "*",
    ignore: Patterns = None,
    iters: int = 7,
) -> dict[str, dict]:
    """Replace pruned Linears by :class:`SparseLinear` where that is faster, in place, and say
    where it did.

    A layer is a candidate when its weight has at least ``min_sparsity`` exact zeros. With
    ``example_input`` each candidate is timed dense and sparse on the input it really gets;
    without it the speed-up is predicted by :func:`predicted_speedup`. Only layers whose
    speed-up exceeds ``min_speedup`` are converted (a margin against timing noise).

    Returns:
        ``{layer: {"sparsity", "speedup", "how" ("measured" / "predicted"), "converted"}}`` for
        every candidate.
    """
    if not 0.0 <= min_sparsity < 1.0:
        raise VitcompressError(f"min_sparsity must be in [0, 1), got {min_sparsity}")
    layers = [
        (n, m) for n, m in select_modules(model, targets, ignore, (nn.Linear,), "sparse.targets")
    ]
    candidates = {}
    for name, m in layers:
        s = 1.0 - int(torch.count_nonzero(m.weight)) / m.weight.numel()
        if s >= min_sparsity and m.weight.dtype == torch.float32:
            candidates[name] = (m, s)
    inputs = {}
    if example_input is not None and candidates:
        was_training = model.training
        model.eval()
        inputs = _layer_inputs(model, list(candidates), example_input)
        model.train(was_training)
    report: dict[str, dict] = {}
    for name, (m, s) in candidates.items():
        if name in inputs:
            speed, how = measure_speedup(m, inputs[name], iters), "measured"
        else:
            speed, how = predicted_speedup(1.0 - s), "predicted"
        convert = speed > min_speedup
        if convert:
            new = SparseLinear.from_linear(m)
            new.train(m.training)
            replace_module(model, name, new)
        report[name] = {"sparsity": s, "speedup": speed, "how": how, "converted": convert}
    return report


def summary(report: dict[str, dict]) -> str:
    """One line: how many layers were converted and their median speed-up."""
    conv = [r["speedup"] for r in report.values() if r["converted"]]
    if not conv:
        best = max((r["speedup"] for r in report.values()), default=float("nan"))
        return f"0/{len(report)} candidate layers sparse (none beat dense; best {best:.2f}x)"
    med = statistics.median(conv)
    return f"{len(conv)}/{len(report)} candidate layers sparse (median speed-up {med:.2f}x)"


__all__ = [
    "SPARSE_COST",
    "SparseLinear",
    "measure_speedup",
    "predicted_speedup",
    "sparsify_for_inference",
    "summary",
]
