"""Non-uniform activation grids for the two ViT activations a uniform grid serves worst
(PTQ4ViT, Yuan et al. 2022; RepQ-ViT, Li et al. 2023).

- Post-softmax attention (the ``A`` of ``A.V``) lies in [0, 1] with most of its mass near 0 and
  a few large values, the ones that decide what a head attends to. A uniform 8-bit grid covering
  [0, 1] has a step of 1/255: most probabilities round to 0, and at 4-6 bits almost all do.
- Post-GELU values (the input of ``fc2``) have a long positive tail and a small negative range
  (GELU's minimum is about -0.17): a range wide enough for the tail leaves the bulk of values a
  few codes.

Two grids, both with ``b`` bits and both static (calibrated on data):

- :func:`log2_fake_quant`: values ``s * 2^-q`` for ``q`` in ``[0, 2^b - 2]`` and 0 (the last
  code), ``q = round(-log2(x / s))`` (rounding in the log domain, as FQ-ViT and RepQ-ViT do):
  fine steps near 0, coarse ones near the top. ``s`` is searched on calibration samples.
- :func:`twin_fake_quant`: two uniform ranges of ``2^(b-1)`` codes each (one bit says which):
  a fine one, scale ``s`` with a zero point ``z`` (values ``s * (q - z)``, covering the small
  negative range and the bulk), and a coarse one, scale ``s * 2^m`` (values ``s * 2^m * q``,
  ``q >= 0``) for the rare large values. The power-of-two ratio keeps the two ranges one shift
  apart, as PTQ4ViT requires for hardware. Each value takes the nearer of its two candidates
  (PTQ4ViT assigns by range, R1 when the value lies inside it; the nearer candidate is the same
  there and never worse at R1's edge). ``s``, ``z`` and ``m`` are searched on calibration samples.

Both search by plain MSE on the calibration sample (PTQ4ViT's Hessian-guided metric needs
gradients of the task loss; MSE needs only the forward pass). They are emulated: no ONNX QDQ
form and no integer kernel here, so export and :func:`~vitcompress.int8.to_int8_` refuse them.
The quantize step selects them with ``softmax_quant`` and ``gelu_quant``.
"""

from __future__ import annotations

import math

import torch

from vitcompress.errors import VitcompressError
from vitcompress.formats import Format, IntFormat
from vitcompress.quantize import MSE_SAMPLES, ActivationQuantizer

# candidate searches: scale fractions of the observed maximum, and range ratios 2^m
LOG2_STEPS = 16  # s = max * 2^(-j/8), j < 16: an eighth of a code apart, down to max / 4
TWIN_CLIPS = torch.linspace(1.0, 0.5, 8).tolist()  # the coarse range's top, times max
TWIN_MAX_SHIFT = 12  # m in [0, 12]: the fine scale down to max / (4096 * codes)


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def log2_fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """``x`` on the grid ``{scale * 2^-q : 0 <= q <= 2^bits - 2} U {0}`` (module docstring);
    values above ``scale`` saturate to it, values <= 0 and below the smallest level go to 0."""
    n = 2**bits - 1  # codes for non-zero levels: q in [0, n - 1]; code n is 0
    xf = x.float()
    s = torch.as_tensor(scale, dtype=torch.float32, device=xf.device)
    r = xf / s
    tiny = torch.finfo(torch.float32).tiny
    q = torch.round(-torch.log2(r.clamp(min=tiny))).clamp_(min=0)
    out = s * torch.exp2(-q)
    return torch.where((r > 0) & (q < n), out, torch.zeros_like(out))


def twin_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    shift: torch.Tensor | int,
    bits: int,
) -> torch.Tensor:
    """``x`` on the union of a fine grid ``scale * (q - zero_point)`` and a coarse grid
    ``scale * 2^shift * q``, ``q`` in ``[0, 2^(bits-1) - 1]`` each; every value takes the nearer
    candidate (ties: the fine one). Broadcasting qparams give one twin grid per slice."""
    n = 2 ** (bits - 1)  # codes per range
    xf = x.float()
    s1 = torch.as_tensor(scale, dtype=torch.float32, device=xf.device)
    z = torch.as_tensor(zero_point, device=xf.device).float()
    s2 = s1 * torch.exp2(torch.as_tensor(shift, device=xf.device).float())
    fine = (torch.round(xf / s1).add_(z).clamp_(0, n - 1) - z) * s1
    coarse = torch.round(xf / s2).clamp_(0, n - 1) * s2
    return torch.where((xf - fine).abs() <= (xf - coarse).abs(), fine, coarse)


def _twin_zero_point(lo: float, s1: torch.Tensor, n: int) -> torch.Tensor:
    """The fine range's zero point: enough codes below 0 for ``lo`` (at most all of them)."""
    if lo >= 0:
        return torch.zeros_like(s1)
    return torch.ceil(-lo / s1 - 1e-6).clamp(0, n - 1)


def search_log2(sample: torch.Tensor, hi: float, bits: int) -> float:
    """The scale of :func:`log2_fake_quant` with the least squared error on ``sample``, among
    ``hi * 2^(-j/8)``, ``j < 16``; 1.0 when nothing positive was seen."""
    if not hi > 0:
        return 1.0
    cands = [hi * 2.0 ** (-j / 8) for j in range(LOG2_STEPS)]
    x = sample.float()
    errs = [float((log2_fake_quant(x, s, bits) - x).pow(2).sum()) for s in cands]
    return cands[min(range(len(cands)), key=errs.__getitem__)]  # first minimum: widest


def search_twin(sample: torch.Tensor, lo: float, hi: float, bits: int) -> tuple[float, int, int]:
    """``(scale, zero_point, shift)`` of :func:`twin_fake_quant` with the least squared error on
    ``sample``: the coarse range's top at ``c * hi`` (``c`` in :data:`TWIN_CLIPS`), the fine
    scale ``2^m`` times finer (``m`` in ``[0, 12]``), the zero point covering ``lo``."""
    n = 2 ** (bits - 1)
    x = sample.float().reshape(1, -1)  # (1, S)
    if not hi > 0:  # nothing positive: the fine range covers [lo, 0]
        s1 = max(-lo, 1e-30) / (n - 1)
        return s1, n - 1 if lo < 0 else 0, 0
    best = (math.inf, 1.0, 0, 0)
    shifts = torch.arange(TWIN_MAX_SHIFT + 1, dtype=torch.float32)  # (M,)
    for c in TWIN_CLIPS:
        s2 = c * hi / (n - 1)
        s1 = (s2 / torch.exp2(shifts)).clamp(min=torch.finfo(torch.float32).tiny)  # (M,)
        z = _twin_zero_point(lo, s1, n)  # (M,)
        fq = twin_fake_quant(x, s1[:, None], z[:, None], shifts[:, None], bits)  # (M, S)
        err = (fq - x).pow(2).sum(dim=1)  # (M,)
        i = int(err.argmin())
        if float(err[i]) < best[0]:
            best = (float(err[i]), float(s1[i]), int(z[i]), int(shifts[i]))
    return best[1], best[2], best[3]


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------


def _int_format(fmt: Format, what: str) -> IntFormat:
    if not isinstance(fmt, IntFormat):
        raise VitcompressError(f"{what} quantizer needs an integer format, got {fmt.name}")
    return fmt


class _GridQuantizer(ActivationQuantizer):
    """A static activation quantizer on a non-uniform grid: it observes a sample like the
    ``mse`` method, and :meth:`freeze` searches the grid's parameters on it."""

    def __init__(self, fmt: Format, dim: int = -1):
        super().__init__(_int_format(fmt, self.grid), False, "mse", 99.99, dim)
        self.zero_point = None  # set again by the grids that have one

    def _sample(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        sample = torch.cat(self._samples) if self._samples else torch.zeros(0)
        if sample.numel() > MSE_SAMPLES:
            sample = sample[torch.randperm(sample.numel(), generator=self._gen)[:MSE_SAMPLES]]
        self._samples, self._gen = [], None
        return torch.cat([sample, torch.stack([lo, hi])])  # the range's ends always count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not bool(self.calibrated):
            raise VitcompressError(
                f"{self.grid} activation quantizer used before calibration: pass calib_data to "
                "quantize_"
            )
        return self._fake_quant(x).to(x.dtype)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.fmt.bits} bits, {self.grid}"


class Log2Quantizer(_GridQuantizer):
    """Post-softmax values on a power-of-two grid (:func:`log2_fake_quant`); buffer ``scale``
    is the top level."""

    grid = "log2"

    def freeze(self, where: str = "") -> None:
        lo, hi = self._observed_range(where)
        self.scale.fill_(search_log2(self._sample(lo, hi), float(hi), self.fmt.bits))
        self.calibrated.fill_(True)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return log2_fake_quant(x, self.scale, self.fmt.bits)


class TwinUniformQuantizer(_GridQuantizer):
    """Two uniform ranges (:func:`twin_fake_quant`); buffers ``scale`` (the fine one),
    ``zero_point`` (the fine range's, int32) and ``shift`` (``m``: the coarse scale is
    ``scale * 2^m``, int32)."""

    grid = "twin"

    def __init__(self, fmt: Format, dim: int = -1):
        super().__init__(fmt, dim)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("shift", torch.zeros((), dtype=torch.int32))

    def freeze(self, where: str = "") -> None:
        lo, hi = self._observed_range(where)
        s, z, m = search_twin(self._sample(lo, hi), float(lo), float(hi), self.fmt.bits)
        self.scale.fill_(s)
        self.zero_point.fill_(z)
        self.shift.fill_(m)
        self.calibrated.fill_(True)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return twin_fake_quant(x, self.scale, self.zero_point, self.shift, self.fmt.bits)


GRID_QUANTIZERS: dict[str, type[_GridQuantizer]] = {
    "log2": Log2Quantizer,
    "twin": TwinUniformQuantizer,
}

__all__ = [
    "GRID_QUANTIZERS",
    "Log2Quantizer",
    "TwinUniformQuantizer",
    "log2_fake_quant",
    "search_log2",
    "search_twin",
    "twin_fake_quant",
]
