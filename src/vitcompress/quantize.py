"""Post-training quantization in the torchao style: ``quantize_(model, QuantizeConfig(...))``.

Two layers of work:

- Emulation (any format of :mod:`vitcompress.formats`): each selected ``nn.Linear`` becomes a
  :class:`QuantLinear` holding its quantised weight values in fp32, the integer codes and scales a
  packer stores, and an :class:`ActivationQuantizer` on its input. Activation ranges are
  calibrated on data (minmax, percentile, mse), or computed per token at run time
  (``dynamic=True``). With ``attention_matmul`` set, the inputs of Q.K^T and A.V are quantised too
  (:class:`QuantMatMul`). The patch-embedding Conv2d stays in float: it sees the raw image and
  is a small share of the compute.
- Real int8 on the CPU: :func:`to_int8_` turns int8 :class:`QuantLinear` layers into
  :class:`Int8Linear`, which runs an integer GEMM with int32 accumulation (torch's fused
  quantized engine for static scales, ``torch._int_mm`` for per-token ones) on the same codes, so
  its outputs equal the emulation's up to fp32 rounding: accuracy measured on the emulation is
  the accuracy of what is timed.

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

import functools
import itertools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.formats import (
    GRANULARITIES,
    Format,
    IntFormat,
    compute_qparams,
    dequantize_int,
    dynamic_qparams,
    expand_qparams,
    fake_quant,
    fake_quant_int,
    get_format,
    qparams_from_minmax,
    quantize_int,
)
from vitcompress.models.vit import MatMul
from vitcompress.targets import check_patterns, get_submodule_parent, name_matches, select_modules

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
# precisions for weight scales and the parameters quantize_ leaves in float ("scales", "rest")
PARAM_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Elements kept per quantizer for percentile calibration (a random subsample of the data), and
# the part of them the mse search scores (one clipping ratio per tensor needs few samples).
SAMPLE_BUDGET = 2**17
MSE_SAMPLES = 2**15


def _fail(cls: str, key: str, value: Any, want: str) -> NoReturn:
    raise VitcompressError(f"{cls}.{key} = {value!r}: expected {want}")


@dataclass(frozen=True)
class CalibrationConfig:
    """How activation ranges are measured: ``method`` over at most ``batches`` input batches.

    ``percentile`` (used by method "percentile") is the share of ``|x|`` (both tails when
    asymmetric) kept inside the range, in percent.
    """

    method: str = "minmax"
    batches: int = 8
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            _fail("calibration", "method", self.method, f"one of {', '.join(CALIBRATION_METHODS)}")
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            _fail("calibration", "batches", self.batches, "an integer >= 1")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, int | float) or not (0 < p <= 100):
            _fail("calibration", "percentile", p, "a number in (0, 100], e.g. 99.99")


@dataclass(frozen=True)
class QuantizeConfig:
    """Post-training quantization of the ``nn.Linear`` layers matched by ``targets``/``ignore``.

    Args:
        weights: a format name (``int8``, ``int4``, ``fp8_e4m3``, ``fp16``, ``tf32``, ...).
        activations: a format name for the input of each layer, or None for weight-only.
        granularity: of weight scales: ``per_tensor``, ``per_channel`` (per output row) or
            ``per_group`` (runs of ``group_size`` inputs in each row).
        group_size: for ``per_group``; the last group of a row may be shorter.
        symmetric: signed integer formats with zero point 0 (restricted range) if True.
        calibration: a :class:`CalibrationConfig` (or a dict of its fields).
        dynamic: activation scales computed per token at run time; no calibration.
        attention_matmul: ``fp32`` leaves Q.K^T and A.V alone (as both studies do); a format name
            quantises both inputs of each (models with ``MatMul`` modules, such as ours).
        targets, ignore: layer name patterns (globs or ``re:``), see :mod:`vitcompress.targets`.
        scales: the precision weight scales are rounded to before the codes are computed
            (``fp32``, ``fp16``, ``bf16``); 2-byte scales as GGUF and torchao's int4 keep them.
        rest: the precision of every other floating-point parameter (biases, norms, position
            embedding, class token, patch projection, layers left out of ``targets``): ``fp32``
            keeps them, ``fp16`` / ``bf16`` round them, so a packed INT8 model stores them in 2
            bytes instead of 4 (on a 0.8 M-parameter model they are ~10 % of the INT8 file).
            A signed integer format (``int8``, ... ``int2``) quantises them weight-only and
            symmetrically, with a 2-byte scale per slice along dim 0 (per output channel of the
            patch projection) for tensors of 2 or more dimensions and one per tensor for
            vectors; the packer finds the codes again and stores them in ``bits`` bits
            (:func:`fake_quant_slices`).
    """

    weights: str = "int8"
    activations: str | None = "int8"
    granularity: str = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    dynamic: bool = False
    attention_matmul: str = "fp32"
    targets: str | list[str] = "*"
    ignore: str | list[str] | None = None
    scales: str = "fp32"
    rest: str = "fp32"

    def __post_init__(self) -> None:
        if self.scales not in PARAM_PRECISIONS:
            _fail("quantize", "scales", self.scales, f"one of {', '.join(PARAM_PRECISIONS)}")
        if self.rest not in PARAM_PRECISIONS and rest_int_format(self.rest) is None:
            _fail(
                "quantize", "rest", self.rest,
                f"one of {', '.join(PARAM_PRECISIONS)} or a signed integer format int2..int8",
            )  # fmt: skip
        for key in ("weights", "activations", "attention_matmul"):
            value = getattr(self, key)
            if value is None and key == "activations":
                continue
            try:
                get_format(value)
            except VitcompressError as e:
                raise VitcompressError(f"quantize.{key}: {e}") from None
        if self.granularity not in GRANULARITIES:
            _fail("quantize", "granularity", self.granularity, f"one of {', '.join(GRANULARITIES)}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
            _fail("quantize", "group_size", gs, "an integer >= 1, e.g. 128")
        for key in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, key), bool):
                _fail("quantize", key, getattr(self, key), "true or false")
        cal = self.calibration
        if isinstance(cal, dict):
            known = {f.name for f in fields(CalibrationConfig)}
            unknown = sorted(set(cal) - known)
            if unknown:
                _fail("quantize", "calibration", unknown[0], f"keys among {sorted(known)}")
            object.__setattr__(self, "calibration", CalibrationConfig(**cal))
        elif not isinstance(cal, CalibrationConfig):
            _fail("quantize", "calibration", cal, "a mapping like {method: minmax, batches: 8}")
        for key in ("targets", "ignore"):
            value = getattr(self, key)
            if value is None and key == "ignore":
                continue
            ok = isinstance(value, str) or (
                isinstance(value, list | tuple) and all(isinstance(p, str) for p in value)
            )
            if not ok:
                _fail("quantize", key, value, "a name pattern or a list of them")
            check_patterns(value, f"quantize.{key}")

    # --- the formats, with ``symmetric`` applied ------------------------------------------
    def _fmt(self, name: str | None, narrow: bool) -> Format | None:
        if name is None:
            return None
        fmt = get_format(name)
        if isinstance(fmt, IntFormat) and not fmt.unsigned:
            fmt = replace(fmt, symmetric=self.symmetric, narrow=narrow and self.symmetric)
        return fmt

    @property
    def weight_format(self) -> Format:
        """Symmetric integer weights use the narrow range (int8: [-127, 127])."""
        return self._fmt(self.weights, narrow=True)

    @property
    def activation_format(self) -> Format | None:
        """Symmetric integer activations use the full range (int8: [-128, 127])."""
        return self._fmt(self.activations, narrow=False)

    @property
    def matmul_format(self) -> Format | None:
        if self.attention_matmul == "fp32":
            return None
        return self._fmt(self.attention_matmul, narrow=False)


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


def _is_scaled(fmt: Format) -> bool:
    """Integers, and floats of 8 bits or fewer, need a scale; wider floats are plain casts."""
    return isinstance(fmt, IntFormat) or fmt.bits <= 8


# --- activation quantizer ------------------------------------------------------------------
class ActivationQuantizer(nn.Module):
    """Fake-quantises a tensor with per-tensor qparams frozen after calibration, or per-vector
    qparams computed on each call (``dynamic``; vectors along ``dim``).

    Buffers ``scale`` (fp32 scalar) and ``zero_point`` (int32 scalar; None for floats) hold the
    calibrated qparams; ``calibrated`` (bool) says they are real. Unscaled float formats (fp16,
    bf16, tf32) need neither: they cast.
    """

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
        self.scaled = _is_scaled(fmt)
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

    def freeze(self, where: str = "") -> None:
        """Turn the observed statistics into ``scale`` / ``zero_point``."""
        self.observing = False
        if self._batches == 0:
            raise VitcompressError(
                f"quantizer {where or '?'} saw no data during calibration; check that calib_data "
                "reaches this layer (or ignore it)"
            )
        lo, hi = torch.tensor(self._lo), torch.tensor(self._hi)
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
        scaled = _is_scaled(weight_format)
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
    ) -> QuantLinear:
        """Quantise ``linear``'s weight (min/max scales, rounded to ``scale_dtype``)."""
        w = linear.weight.detach().float()  # (out, in)
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
            scale, zp = compute_qparams(w, fmt, q.granularity, q.group_size, axis=0)
            scale = round_scale(scale, scale_dtype)
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


# --- real int8 -----------------------------------------------------------------------------
def _int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32, exactly."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        # Shapes or devices the kernel refuses (e.g. CUDA wants M > 16 and K, N multiples of 8):
        # float64 holds every int32 sum of int8 products exactly.
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


INT8_BACKENDS = ("auto", "int_mm", "fbgemm")


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo names of int8 dot products


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8) integer dot products.

    Without it, fbgemm's (and onnxruntime's) uint8 x int8 kernels add pairs of products in
    saturating int16 (``vpmaddubsw``): 255 x 127 x 2 overflows, so results drift from the exact
    integer GEMM (measured on an AVX2-only AMD EPYC: 10 % of the output range on a random toy
    ViT, -0.04 points of top-1 on the trained Fashion-MNIST vit-nano). ``torch._int_mm``
    stays exact there but runs ~10x slower than fbgemm, so ``backend="auto"`` keeps fbgemm for
    speed; exact choices there are ``backend="int_mm"``, or 7-bit weights (``weights: int7``,
    codes in [-63, 63]: 255 x 63 x 2 fits int16), with which fbgemm is exact (tested), and so
    is onnxruntime's ``MatMulInteger`` (``benchmarks/int8_exactness.py``: 0 outputs off with
    7-bit weights, 97 % with 8-bit ones); what then remains between onnxruntime and torch is
    their float arithmetic outside the GEMMs.
    """
    return any(f in cpu_flags() for f in VNNI_FLAGS)


def _fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """Our int8 codes and per-channel scales, prepacked for torch's quantized CPU engine."""
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; still the fastest
        warnings.simplefilter("ignore")
        n = qweight.shape[0]
        wq = torch._make_per_channel_quantized_tensor(
            qweight.detach().cpu(),
            scale.detach().reshape(-1).double().cpu(),
            torch.zeros(n, dtype=torch.long),
            0,
        )
        return torch.ops.quantized.linear_prepack(wq, None if bias is None else bias.detach())


class Int8Linear(nn.Module):
    """A Linear computed in integers: int8 activations x int8 weights -> int32 -> fp32.

    ``y = s_x * s_w * (q_x - z_x) @ q_w^T + b`` with ``q_w`` symmetric (per output channel or
    per tensor) and ``q_x`` quantised per tensor with calibrated qparams (static), or per token
    at run time (dynamic: ``input_scale`` is None). Two kernels; ``backend="auto"`` takes the
    faster one each mode allows (measured on ViT-small Linear shapes, 197 and 32 x 197 tokens,
    one thread of an AVX512-VNNI Xeon, against fp32 ``F.linear``):

    - ``fbgemm`` (static only, 2.1-2.7x): torch's quantized CPU engine quantizes the input, runs
      the integer GEMM and rescales in one fused call, prepacked from our codes (rebuilt lazily
      when the tensors change). The input needs no extra pass when its codes span all 256
      values, as the full-range activations of :mod:`vitcompress.quantize` do.
    - ``int_mm`` (static 1.4-2.5x, dynamic per token 1.1-1.8x): ``torch._int_mm`` (oneDNN,
      int32 accumulation; any shape on the CPU) over tiles of ``tile_rows`` rows, with the
      quantization and rescaling in eager torch around it. The only one with per-token scales,
      and the fallback wherever fbgemm is missing.

    Both see the same codes as :class:`QuantLinear` (fbgemm multiplies by 1/s where we divide
    by s, which can move a value sitting within an ulp of a rounding tie by one code), so the
    outputs agree with the emulation up to fp32 rounding.

    Stored: ``qweight`` (Parameter, int8, (out, in), no grad: counted by ``parameters()`` at one
    byte each), ``weight_scale`` (fp32, (out, 1)), ``bias`` (fp32), ``input_format``,
    ``input_scale`` / ``input_zero_point`` (fp32 / int32 scalars; None when dynamic).
    """

    tile_rows = 256

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        input_format: IntFormat,
        input_scale: torch.Tensor | None = None,
        input_zero_point: torch.Tensor | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.ndim != 2:
            raise VitcompressError("Int8Linear: qweight must be a 2-D int8 tensor")
        if backend not in INT8_BACKENDS:
            raise VitcompressError(f"Int8Linear: backend must be one of {INT8_BACKENDS}")
        self.out_features, self.in_features = qweight.shape
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        ws = weight_scale.detach().float().reshape(-1, 1).expand(self.out_features, 1).clone()
        self.register_buffer("weight_scale", ws)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.input_format = input_format
        s = None if input_scale is None else input_scale.detach().float().reshape(()).clone()
        self.register_buffer("input_scale", s)
        zp = None
        if input_scale is not None:
            zp = torch.zeros(()) if input_zero_point is None else input_zero_point.detach()
            zp = zp.to(torch.int32).reshape(()).clone()
        self.register_buffer("input_zero_point", zp)
        if backend == "fbgemm" and self.dynamic:
            raise VitcompressError("Int8Linear: fbgemm has no per-token scales; use int_mm")
        self.backend = backend
        self._packed = None  # fbgemm's prepacked weight, and the tensor versions it was made of
        self._packed_key = None

    @property
    def dynamic(self) -> bool:
        return self.input_scale is None

    def __getstate__(self):  # the prepacked weight is a cache: rebuilt, never copied
        return {**self.__dict__, "_packed": None, "_packed_key": None}

    @classmethod
    def from_quant_linear(
        cls, layer: QuantLinear, name: str = "layer", backend: str = "auto"
    ) -> Int8Linear:
        """The integer twin of an int8 :class:`QuantLinear` (same codes and scales)."""
        wf, aq = layer.weight_format, layer.input_quant
        why = None
        if not isinstance(wf, IntFormat) or wf.unsigned or not wf.symmetric:
            kind = wf.name if getattr(wf, "symmetric", True) else f"{wf.name} asymmetric"
            why = f"weights are {kind}; need a signed symmetric integer format"
        elif layer.granularity not in ("per_channel", "per_tensor"):
            why = f"weights are {layer.granularity}; need per_channel or per_tensor"
        elif aq is None:
            why = "it is weight-only; quantise activations too (activations='int8', dynamic=True)"
        elif not isinstance(aq.fmt, IntFormat):
            why = f"activations are {aq.fmt.name}; need an integer format"
        elif aq.dynamic and aq.dim not in (-1, layer.weight.ndim - 1):
            why = "dynamic activation scales must be per token"
        elif not aq.dynamic and not bool(aq.calibrated):
            why = "its activation quantizer is not calibrated"
        if why:
            raise VitcompressError(f"to_int8_: {name} cannot run in int8: {why}")
        return cls(
            layer.qweight.detach().clone(),
            layer.weight_scale.reshape(-1, 1).expand(layer.out_features, 1),
            None if layer.bias is None else layer.bias.detach(),
            aq.fmt,
            None if aq.dynamic else aq.scale,
            None if aq.dynamic else aq.zero_point,
            backend=backend,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Per-channel symmetric int8 weights, dynamic per-token symmetric int8 activations."""
        aq = ActivationQuantizer(IntFormat(8, narrow=False), dynamic=True)
        ql = QuantLinear.from_linear(linear, IntFormat(8), "per_channel", input_quant=aq)
        return cls.from_quant_linear(ql)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        out = None
        if not self.dynamic and self.backend in ("auto", "fbgemm") and x2.device.type == "cpu":
            out = self._forward_fbgemm(x2)
        if out is None:
            out = self._forward_int_mm(x2)
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def _forward_fbgemm(self, x2: torch.Tensor) -> torch.Tensor | None:
        """None where the engine refuses (then int_mm runs), unless fbgemm was asked for."""
        fmt = self.input_format
        parts = (self.qweight, self.weight_scale, self.bias)
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in parts)
        try:
            if self._packed_key != key:
                self._packed = _fbgemm_pack(self.qweight, self.weight_scale, self.bias)
                self._packed_key = key
            # fbgemm takes uint8 codes: ours shifted by 128 (q - z is unchanged)
            shift = 0 if fmt.unsigned else 128
            s, z = float(self.input_scale), int(self.input_zero_point) + shift
            if (fmt.qmin + shift, fmt.qmax + shift) != (0, 255):  # e.g. a narrow [-127, 127]
                x2 = x2.clamp(s * (fmt.qmin + shift - z), s * (fmt.qmax + shift - z))
            op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
            return op(x2.contiguous(), s, z, self._packed)
        except (RuntimeError, AttributeError):
            if self.backend == "fbgemm":
                raise
            self.backend = "int_mm"  # this engine cannot: do not try again
            return None

    def _forward_int_mm(self, x2: torch.Tensor) -> torch.Tensor:
        fmt = self.input_format
        # int_mm wants int8: codes of a format that reaches past 127 are shifted by -128.
        shift = 128 if fmt.qmax > 127 else 0
        qmin, qmax = fmt.qmin - shift, fmt.qmax - shift
        M, K = x2.shape
        asym = not fmt.symmetric
        out = torch.empty(M, self.out_features, dtype=torch.float32, device=x2.device)
        if M == 0:
            return out
        wq_t = self.qweight.t()  # (K, N); _int_mm reads the transposed view without a copy
        w_scale = self.weight_scale.reshape(1, -1)  # (1, N)
        colsum = self.qweight.sum(dim=1, dtype=torch.int32).reshape(1, -1) if asym else None
        # Everything runs per tile of rows, in work buffers reused across tiles: the tile stays
        # in cache from quantization to rescaling, and no large temporary is allocated (fresh
        # memory costs page faults). Same operations as formats.quantize_int, so same codes.
        T = min(self.tile_rows, M)
        work = torch.empty(T, K, dtype=torch.float32, device=x2.device)
        codes = torch.empty(T, K, dtype=torch.int8, device=x2.device)
        for i in range(0, M, T):
            xt = x2[i : i + T]  # (t, K)
            t = xt.shape[0]
            if self.dynamic:
                s, z = dynamic_qparams(xt, fmt, dim=-1)  # (t, 1) each
            else:
                s, z = self.input_scale, self.input_zero_point  # ()
            w, q = work[:t], codes[:t]
            torch.div(xt, s, out=w).round_()
            if asym:
                w.add_(z - shift)
            q.copy_(w.clamp_(qmin, qmax))
            acc = _int8_mm(q, wq_t)  # (t, N) int32
            if asym:
                acc.sub_((z - shift) * colsum)
            o = out[i : i + t]
            o.copy_(acc)
            o.mul_(s)
            if self.bias is None:
                o.mul_(w_scale)
            else:
                torch.addcmul(self.bias, o, w_scale, out=o)
        return out

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.dynamic else "static per-tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.input_format.name} {act}, backend={self.backend}"
        )


# --- the verbs -----------------------------------------------------------------------------
def _matmuls(model: nn.Module, config: QuantizeConfig) -> list[tuple[str, nn.Module]]:
    def listed(n: str, patterns) -> bool:
        pats = [patterns] if isinstance(patterns, str) else list(patterns or [])
        return any(name_matches(n, p) for p in pats)

    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, MatMul) and listed(n, config.targets) and not listed(n, config.ignore)
    ]
    if not found:
        raise VitcompressError(
            f"quantize.attention_matmul = {config.attention_matmul!r}, but no attention MatMul "
            "module matches the targets (models whose attention calls torch.matmul inline cannot "
            "quantise it); use attention_matmul: fp32"
        )
    return found


def _run_batch(model: nn.Module, batch: Any, device: torch.device) -> None:
    if isinstance(batch, list | tuple):
        batch = batch[0]
    if isinstance(batch, dict):
        model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    elif torch.is_tensor(batch):
        model(batch.to(device))
    else:
        raise VitcompressError(
            f"calib_data yields {type(batch).__name__}; expected tensors, (x, y) tuples or dicts"
        )


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
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        seen = 0
        with torch.no_grad():
            for batch in itertools.islice(calib_data, batches):  # never pulls one batch more
                _run_batch(model, batch, device)
                seen += 1
        if seen == 0:
            raise VitcompressError("calib_data yielded no batches")
        for n, q in quantizers:
            q.freeze(n)
    finally:
        for _, q in quantizers:
            q.observing = False
        model.train(was_training)


def quantize_(
    model: nn.Module,
    config: QuantizeConfig,
    calib_data: Iterable | None = None,
    *,
    calibrate: bool = True,
) -> None:
    """Quantise ``model`` in place as ``config`` says (module docstring).

    Args:
        calib_data: input batches (tensors, ``(x, y, ...)`` tuples, or dicts of keyword inputs)
            for static activation ranges; at most ``config.calibration.batches`` are used.
        calibrate: False only builds the quantised structure, e.g. before loading the state dict
            of a model that was calibrated earlier.

    Raises:
        VitcompressError: a pattern that matches nothing, static activations without
            ``calib_data``, attention quantization on a model without MatMul modules; all before
            the model is changed.
    """
    if not isinstance(config, QuantizeConfig):
        raise VitcompressError(f"quantize_ needs a QuantizeConfig, got {type(config).__name__}")
    layers = select_modules(model, config.targets, config.ignore, (nn.Linear,), "quantize.targets")
    mm_fmt = config.matmul_format
    matmuls = _matmuls(model, config) if mm_fmt is not None else []
    wfmt, afmt = config.weight_format, config.activation_format
    cal = config.calibration
    needs_data = not config.dynamic and (
        (afmt is not None and _is_scaled(afmt)) or (mm_fmt is not None and _is_scaled(mm_fmt))
    )
    if needs_data and calibrate and calib_data is None:
        raise VitcompressError(
            "static activation quantization needs calib_data (a few input batches); "
            "or set dynamic: true, or activations: null for weight-only"
        )

    def act(fmt: Format, dim: int = -1) -> ActivationQuantizer:
        return ActivationQuantizer(fmt, config.dynamic, cal.method, cal.percentile, dim)

    for name, linear in layers:
        aq = act(afmt) if afmt is not None else None
        new = QuantLinear.from_linear(
            linear, wfmt, config.granularity, config.group_size, aq,
            PARAM_PRECISIONS[config.scales],
        )  # fmt: skip
        _replace(model, name, new)
    round_rest_(model, config.rest)
    for name, _ in matmuls:
        parent, _ = get_submodule_parent(model, name)
        if hasattr(parent, "fused_attn"):
            parent.fused_attn = False  # route attention through the MatMul modules
        _replace(model, name, QuantMatMul(act(mm_fmt, -1), act(mm_fmt, -2)))
    if needs_data and calibrate:
        calibrate_(model, calib_data, cal.batches)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = get_submodule_parent(model, name)
    old = getattr(parent, attr)
    new.train(old.training)
    setattr(parent, attr, new)


def to_int8_(
    model: nn.Module,
    targets: str | list[str] = "*",
    ignore: str | list[str] | None = None,
    backend: str = "auto",
) -> None:
    """Replace int8-capable :class:`QuantLinear` layers by :class:`Int8Linear` (real int8 GEMM).

    Needs signed symmetric integer weights (per channel or per tensor) and integer activations
    (static per tensor, or dynamic per token). Raises, naming the layer, for any matched layer
    that cannot be converted; ``ignore`` it to keep it emulated.
    """
    layers = select_modules(model, targets, ignore, (QuantLinear,), "to_int8_.targets")
    new = [(n, Int8Linear.from_quant_linear(m, n, backend)) for n, m in layers]  # checks first
    for n, m in new:
        _replace(model, n, m)
