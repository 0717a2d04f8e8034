"""Quantised layers: weights in any format of :mod:`vitcompress.formats`, inputs fake-quantised.

Each selected ``nn.Linear`` becomes a :class:`QuantLinear` holding its quantised weight values
in fp32, the integer codes and scales a packer stores, and an :class:`ActivationQuantizer` on its
input. Activation ranges are calibrated on data (minmax, percentile, mse, :func:`calibrate_`),
or computed per token at run time (``dynamic``). :class:`QuantMatMul` quantises both inputs of
an attention dot product. The recipe step and the verb ``quantize_(model, QuantizeConfig(...))``
live in :mod:`vitcompress.steps.quantize`; real int8 execution in :mod:`vitcompress.int8`.

Choices that are not obvious:

- Scaled float formats (8 bits or fewer: fp8, fp6, fp4) get a scale so that the largest
  magnitude lands on the format's largest value: per tensor for activations, per the configured
  granularity for weights; wider floats (fp16, bf16, tf32) are plain casts with no scale.
- Dynamic activation quantization is per token (one scale per vector along the last dim; the
  second operand of a matmul: per column), so that an image's output never depends on the other
  images of its batch.
- ``symmetric`` applies to signed integer weights and activations; unsigned formats (uint8) are
  always asymmetric. Symmetric weights use the narrow range (int8: [-127, 127]), symmetric
  activations the full one ([-128, 127], same scale ``max|x| / 127``): the fused int8 kernel
  takes that range without an extra clamping pass over the input.
- Calibration observes all quantizers at once, activations left unquantised (one pass over the
  data; the weights are already quantised).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.formats import (
    Format,
    IntFormat,
    compute_qparams,
    dequantize_int,
    dynamic_qparams,
    expand_qparams,
    fake_quant,
    fake_quant_int,
    float_code_table,
    float_codes,
    get_format,
    qparams_from_minmax,
    quantize_int,
    same_bits,
)
from vitcompress.steps.calib import run_calibration

# precisions for weight scales and the parameters quantize_ leaves in float ("scales", "rest")
PARAM_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Elements kept per quantizer for percentile calibration (a random subsample of the data), and
# the part of them the mse search scores (one clipping ratio per tensor needs few samples).
SAMPLE_BUDGET = 2**17
MSE_SAMPLES = 2**15


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``dtype`` (nearest even) and back to fp32, kept positive and finite.

    Rounding up where a scale would underflow to 0 or overflow keeps every weight representable.
    """
    if dtype is torch.float32:
        return scale
    info = torch.finfo(dtype)
    tiny = info.smallest_normal if dtype is torch.bfloat16 else 2.0**-24  # exact in ``dtype``
    r = scale.clamp(max=info.max).to(dtype).float()
    return torch.where(r > 0, r, torch.full_like(r, tiny))


def rest_int_format(name: Any) -> IntFormat | None:
    """The signed integer format ``name`` names (``int8`` ... ``int2``), else None."""
    try:
        fmt = get_format(name) if isinstance(name, str) else None
    except VitcompressError:
        return None
    return fmt if isinstance(fmt, IntFormat) and not fmt.unsigned else None


def fake_quant_slices(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` on a symmetric ``bits``-bit grid: codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1]
    times a bf16 scale, one per slice along dim 0 for tensors of 2+ dimensions, one in all for
    vectors and scalars.

    Why bf16: every ``code * scale`` is exact in fp32 (8 x 7 significant bits), the scale has
    no subnormals to lose precision in for tiny tensors, so the largest magnitude of a slice is
    always ``qmax * scale`` exactly, and the packer recovers scale and codes from the values
    alone (``pack``'s "scaled" layout). A scale 0.4 % off the ideal moves the grid, not the
    error bound.
    """
    fmt = IntFormat(bits)  # symmetric, narrow: codes in [-qmax, qmax]
    granularity = "per_channel" if t.dim() >= 2 else "per_tensor"
    scale, zero = compute_qparams(t, fmt, granularity, axis=0)
    # adding the zero point (0.0) turns a -0.0 code into +0.0, as the packer wants
    return fake_quant_int(t, round_scale(scale, torch.bfloat16), zero, fmt.qmin, fmt.qmax)


def round_rest_(model: nn.Module, rest: str) -> None:
    """Round the float parameters not held as quantised weights as ``rest`` says (fp16 / bf16,
    or an integer format, :func:`fake_quant_slices`); the values stay fp32."""
    if rest == "fp32":
        return
    ifmt = rest_int_format(rest)
    derived = {id(m.weight) for m in model.modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in derived or p.dtype is not torch.float32 or p.numel() == 0:
                continue
            if ifmt is not None:
                p.copy_(fake_quant_slices(p, ifmt.bits))
            else:
                p.copy_(p.to(PARAM_PRECISIONS[rest]).float())


def is_scaled(fmt: Format) -> bool:
    """Integers, and floats of 8 bits or fewer, need a scale; wider floats are plain casts."""
    return isinstance(fmt, IntFormat) or fmt.bits <= 8


# --- activation quantizer ------------------------------------------------------------------
class ActivationQuantizer(nn.Module):
    """Fake-quantises a tensor with per-tensor qparams frozen after calibration, or per-vector
    qparams computed on each call (``dynamic``; vectors along ``dim``).

    Buffers ``scale`` (fp32 scalar) and ``zero_point`` (int32 scalar; None for floats) hold the
    calibrated qparams; ``calibrated`` (bool) says they are real. Unscaled float formats (fp16,
    bf16, tf32) need neither: they cast. ``grid`` names the grid of values: ``uniform`` here,
    non-uniform ones in :mod:`vitcompress.quant_grids` (runtimes and exporters check it).
    """

    grid = "uniform"

    def __init__(
        self,
        fmt: Format,
        dynamic: bool = False,
        method: str = "minmax",
        percentile: float = 99.99,
        dim: int = -1,
    ):
        super().__init__()
        self.fmt = fmt
        self.scaled = is_scaled(fmt)
        self.dynamic = dynamic and self.scaled
        self.method = method
        self.percentile = percentile
        self.dim = dim
        static = self.scaled and not self.dynamic
        is_int = isinstance(fmt, IntFormat)
        self.register_buffer("scale", torch.ones(()) if static else None)
        self.register_buffer(
            "zero_point", torch.zeros((), dtype=torch.int32) if static and is_int else None
        )
        self.register_buffer("calibrated", torch.tensor(not static))
        self.observing = False
        self._reset_stats(1)

    @property
    def needs_calibration(self) -> bool:
        return self.scaled and not self.dynamic

    def _reset_stats(self, max_batches: int) -> None:
        self._lo, self._hi = math.inf, -math.inf
        self._samples: list[torch.Tensor] = []
        self._per_batch = max(1, SAMPLE_BUDGET // max_batches)
        self._gen: torch.Generator | None = None  # only while observing: models get deep-copied
        self._batches = 0

    def start_observing(self, max_batches: int) -> None:
        self._reset_stats(max_batches)
        self._gen = torch.Generator().manual_seed(0)  # the same subsample on every run
        self.observing = True

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        if flat.numel() == 0:
            return
        lo, hi = flat.amin().item(), flat.amax().item()  # (aminmax is far slower on CPU)
        self._lo, self._hi = min(self._lo, lo), max(self._hi, hi)
        self._batches += 1
        if self.method != "minmax":
            if flat.numel() > self._per_batch:
                idx = torch.randint(flat.numel(), (self._per_batch,), generator=self._gen)
                flat = flat[idx.to(flat.device)]
            self._samples.append(flat.cpu())

    def _observed_range(self, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The observed ``(min, max)``; raises when no data, or no finite data, was seen."""
        self.observing = False
        if self._batches == 0:
            raise VitcompressError(
                f"quantizer {where or '?'} saw no data during calibration; check that calib_data "
                "reaches this layer (or ignore it)"
            )
        if not (math.isfinite(self._lo) and math.isfinite(self._hi)):
            raise VitcompressError(
                f"quantizer {where or '?'} saw NaN or Inf activations during calibration; the "
                "model or its calibration data is broken"
            )
        return torch.tensor(self._lo), torch.tensor(self._hi)

    def freeze(self, where: str = "") -> None:
        """Turn the observed statistics into ``scale`` / ``zero_point``."""
        lo, hi = self._observed_range(where)
        if self.method == "minmax":
            scale, zp = qparams_from_minmax(lo, hi, self.fmt)
        else:
            sample = torch.cat(self._samples)
            if self.method == "mse" and sample.numel() > MSE_SAMPLES:
                sample = sample[torch.randperm(sample.numel(), generator=self._gen)[:MSE_SAMPLES]]
            sample = torch.cat([sample, torch.stack([lo, hi])])  # the search starts at the range
            scale, zp = compute_qparams(
                sample, self.fmt, method=self.method, percentile=self.percentile
            )
        self.scale.copy_(scale)
        if self.zero_point is not None:
            self.zero_point.copy_(zp)
        self.calibrated.fill_(True)
        self._samples, self._gen = [], None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scaled:
            return self.fmt.quantize(x).to(x.dtype)
        if self.observing:
            self._observe(x)
            return x
        if self.dynamic:
            scale, zp = dynamic_qparams(x, self.fmt, self.dim)
        else:
            if not bool(self.calibrated):
                raise VitcompressError(
                    "activation quantizer used before calibration: pass calib_data to quantize_ "
                    "(or use dynamic=True)"
                )
            scale, zp = self.scale, self.zero_point
        return fake_quant(x, self.fmt, scale, zp).to(x.dtype)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.dynamic else (self.method if self.scaled else "cast")
        return f"{self.fmt.name}, {mode}"


# --- quantised layers ----------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A Linear whose weight is stored in ``weight_format`` and whose input is quantised.

    What a packer / exporter reads:

    - ``weight`` (Parameter, fp32, (out, in)): the quantised weight values (what the layer
      computes with; equals ``dequantize(qweight)`` for integers).
    - ``bias`` (Parameter or None): kept in fp32.
    - ``weight_format`` (:class:`~vitcompress.formats.IntFormat` or ``FloatFormat``; its
      ``.name``, ``.bits``), ``granularity`` and ``group_size`` (None unless per_group).
    - ``weight_scale`` (fp32): shape () per_tensor, (out, 1) per_channel, (out, ceil(in / g))
      per_group; None for unscaled floats (fp16, bf16, tf32, fp32).
    - ``weight_zero_point`` (int32, same shape as the scale; zeros when symmetric): integers only.
    - ``qweight`` (out, in): integer codes (int8, or uint8 for unsigned formats; sub-byte codes
      are not packed here) for integers; for floats with a torch dtype (fp16, bf16, fp8) the
      tensor ``weight / scale`` in that dtype; otherwise None.
    - ``input_quant``: an :class:`ActivationQuantizer` (``scale``, ``zero_point``, ``fmt``,
      ``dynamic``) or None for weight-only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: Format,
        granularity: str | None = "per_channel",
        group_size: int | None = None,
        bias: bool = True,
        input_quant: ActivationQuantizer | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_format = weight_format
        scaled = is_scaled(weight_format)
        self.granularity = granularity if scaled else None
        self.group_size = group_size if self.granularity == "per_group" else None
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        shape = self._scale_shape()
        self.register_buffer("weight_scale", torch.ones(shape) if scaled else None)
        is_int = isinstance(weight_format, IntFormat)
        zp = torch.zeros(shape, dtype=torch.int32) if is_int else None
        self.register_buffer("weight_zero_point", zp)
        qdtype = weight_format.storage_dtype if is_int else weight_format.torch_dtype
        if qdtype is torch.float32:
            qdtype = None  # the weight itself
        qweight = None if qdtype is None else torch.zeros(out_features, in_features, dtype=qdtype)
        self.register_buffer("qweight", qweight)
        self.input_quant = input_quant

    def _scale_shape(self) -> tuple[int, ...]:
        if self.granularity == "per_tensor":
            return ()
        if self.granularity == "per_channel":
            return (self.out_features, 1)
        if self.granularity == "per_group":
            return (self.out_features, -(-self.in_features // self.group_size))
        return ()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_format: Format,
        granularity: str = "per_channel",
        group_size: int = 128,
        input_quant: ActivationQuantizer | None = None,
        scale_dtype: torch.dtype = torch.float32,
        *,
        weight: torch.Tensor | None = None,
        qparams: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> QuantLinear:
        """Quantise ``linear``'s weight (min/max scales, rounded to ``scale_dtype``).

        ``weight`` and ``qparams`` (scale, zero point, in this layer's shapes) replace the
        linear's weight and the min/max qparams: a weight another algorithm (GPTQ) already put
        on the grid is stored by the same arithmetic as round-to-nearest's, so that ``weight``
        equals the dequantised codes bit for bit.
        """
        w = (linear.weight if weight is None else weight).detach().float()  # (out, in)
        q = cls(
            linear.in_features,
            linear.out_features,
            weight_format,
            granularity,
            group_size,
            bias=linear.bias is not None,
            input_quant=input_quant,
        ).to(w.device)
        fmt = weight_format
        with torch.no_grad():
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach().float())
            if q.weight_scale is None:  # plain cast
                q.weight.copy_(fmt.quantize(w))
                if q.qweight is not None:
                    q.qweight.copy_(w.to(q.qweight.dtype))
                return q
            if qparams is None:
                scale, zp = compute_qparams(w, fmt, q.granularity, q.group_size, axis=0)
                scale = round_scale(scale, scale_dtype)
            else:
                scale, zp = qparams
            q.weight_scale.copy_(scale)
            s = expand_qparams(scale, w.shape, q.granularity, q.group_size)
            if isinstance(fmt, IntFormat):
                q.weight_zero_point.copy_(zp)
                z = expand_qparams(zp, w.shape, q.granularity, q.group_size)
                codes = quantize_int(w, s, z, fmt.qmin, fmt.qmax)
                q.qweight.copy_(codes)
                q.weight.copy_(dequantize_int(codes, s, z))
            else:
                q.weight.copy_(fake_quant(w, fmt, s, None))
                if q.qweight is not None:
                    q.qweight.copy_(fmt.saturating().quantize(w / s).to(q.qweight.dtype))
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    # --- what a packer needs: the fp32 weight follows from the codes and scales ------------
    def _dequant_int(self) -> torch.Tensor:
        shape = self.qweight.shape
        s = expand_qparams(self.weight_scale, shape, self.granularity, self.group_size)
        z = expand_qparams(self.weight_zero_point, shape, self.granularity, self.group_size)
        return dequantize_int(self.qweight, s, z)

    def weight_derivation(self) -> tuple[str, torch.Tensor | None] | None:
        """How ``weight`` follows from the layer's other tensors, checked bit for bit:
        ``(how, codes)``, where ``codes`` is a uint8 tensor to store for float formats torch has
        no dtype for (fp6, fp4, ...); None when it does not follow (then it is stored itself)."""
        w = self.weight.detach()
        fmt = self.weight_format
        if isinstance(fmt, IntFormat):
            if self.qweight is None or self.weight_scale is None or self.weight_zero_point is None:
                return None
            return ("dequant_int", None) if same_bits(self._dequant_int(), w) else None
        if self.weight_scale is None:  # unscaled float: a cast
            if self.qweight is not None and same_bits(self.qweight.float(), w):
                return ("cast", None)
            return None
        s = expand_qparams(self.weight_scale, w.shape, self.granularity, self.group_size)
        if self.qweight is not None:
            return ("scaled_qweight", None) if same_bits(self.qweight.float() * s, w) else None
        if fmt.bits > 8:
            return None
        codes = float_codes(fmt.saturating().quantize(w / s), fmt)
        if codes is None:
            return None
        ref = float_code_table(fmt)[codes] * s
        return ("scaled_codes", codes.to(torch.uint8)) if same_bits(ref, w) else None

    def derived_weight(self, how: str, codes: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight that :meth:`weight_derivation` said follows from the other tensors
        (which must be loaded first)."""
        if how == "dequant_int":
            return self._dequant_int()
        if how == "cast":
            return self.qweight.float()
        shape = (self.out_features, self.in_features)
        s = expand_qparams(self.weight_scale, shape, self.granularity, self.group_size)
        if how == "scaled_qweight":
            return self.qweight.float() * s
        if how == "scaled_codes" and codes is not None:
            return float_code_table(self.weight_format)[codes.long()] * s
        raise VitcompressError(f"unknown weight derivation {how!r}")

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weights={self.weight_format.name}, granularity={self.granularity}{g}"
        )


class QuantMatMul(nn.Module):
    """``a @ b`` with both inputs quantised (``a`` per row, ``b`` per column when dynamic)."""

    def __init__(self, a_quant: ActivationQuantizer, b_quant: ActivationQuantizer):
        super().__init__()
        self.a_quant = a_quant
        self.b_quant = b_quant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quant(a) @ self.b_quant(b)


# --- calibration ---------------------------------------------------------------------------
def calibrate_(model: nn.Module, calib_data: Iterable, batches: int = 8) -> None:
    """Run up to ``batches`` batches through ``model`` and freeze every observing quantizer."""
    quantizers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, ActivationQuantizer) and m.needs_calibration
    ]
    if not quantizers:
        return
    for _, q in quantizers:
        q.start_observing(batches)
    try:
        run_calibration(model, calib_data, batches)
        for n, q in quantizers:
            q.freeze(n)
    finally:
        for _, q in quantizers:
            q.observing = False
