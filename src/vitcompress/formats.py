"""Number formats and their exact emulation: pure tensor functions, no modules.

Floating-point formats (:class:`FloatFormat`) are emulated in fp32: ``fmt.quantize(x)`` returns
an fp32 tensor holding, for each element, the value that the format would store. Rounding is to
nearest, ties to even; subnormals are kept (or flushed to zero); NaN stays NaN. What happens
beyond the largest finite value depends on ``saturate``:

- ``saturate=False``: IEEE behaviour. A value that rounds above the maximum becomes +-inf in a
  format with infinities; in a format whose only special is NaN (OCP ``fn`` flavour) it becomes
  NaN (the OCP "non-saturating" conversion).
- ``saturate=True``: every magnitude beyond the maximum, infinities included, becomes +-max.

The default of each format is what ``x.to(dtype)`` does in torch 2.13 on the CPU (checked bit by
bit in the tests): fp16, bf16 and fp8 e5m2 overflow to inf; fp8 e4m3fn saturates (torch maps even
+-inf to +-448). Quantizers with a scale (:mod:`vitcompress.quantize`) always saturate, since
clipping the range is the point of calibrating it.

Integer formats (:class:`IntFormat`) are affine: ``q = clamp(round(x / s) + z, qmin, qmax)``,
``x ~ s * (q - z)``, rounding half to even. This is the order of operations of ONNX
QuantizeLinear (round, then add the zero point); for an integer ``z`` it equals
``round(x / s + z)`` except in fp32 corner cases. Symmetric formats have ``z = 0`` and
``s = max|x| / qmax``. Their range is ``narrow`` by default, ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
(int8: [-127, 127]): a symmetric grid, and what int8 GEMM kernels and ONNX expect of weights.
:mod:`vitcompress.quantize` gives symmetric *activations* the full range [-128, 127] instead
(``narrow=False``; only values clipped below ``-max|x|`` reach -128), which the fused int8
kernels take as is. Asymmetric signed formats use the full range, unsigned ones [0, 2^b - 1];
all codes fit ONNX's int8 / uint8 QDQ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from vitcompress.errors import VitcompressError

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
QPARAM_METHODS = ("minmax", "percentile", "mse")

_FP32_MAX = float(torch.finfo(torch.float32).max)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0 ** e`` in float64 for integer ``e`` in [-1022, 1023], built from its bits."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign, ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    Three flavours, after how the top exponent code is used:

    - ``has_inf=True`` (IEEE 754 like fp16, bf16, fp8 e5m2): the top exponent holds inf and NaN.
    - ``has_inf=False, has_nan=True`` (OCP "fn", like fp8 e4m3fn): the top exponent holds normal
      numbers, except ``S.1..1.1..1`` which is NaN; no infinities.
    - ``has_inf=False, has_nan=False`` (OCP MX fp6/fp4, e.g. e2m1): every code is a finite number.

    Args:
        exp_bits: exponent bits, 1..8 (the results must fit fp32).
        man_bits: explicit mantissa bits, 1..23.
        bias: exponent bias; default ``2^(exp_bits-1) - 1``.
        subnormals: keep subnormal numbers; when False, results below the smallest normal
            magnitude are flushed to (signed) zero after rounding.
        has_inf: see above.
        has_nan: see above (must be True when ``has_inf``).
        max_value: a smaller largest finite value (must be representable); beyond it the
            overflow rule applies.
        saturate: overflow rule (module docstring); default False with infinities, else True.
        name: a label; defaults to ``e{E}m{M}``.
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    subnormals: bool = True
    has_inf: bool = True
    has_nan: bool = True
    max_value: float | None = None
    saturate: bool | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.exp_bits, int) and 1 <= self.exp_bits <= 8):
            raise VitcompressError(f"FloatFormat: exp_bits must be 1..8, got {self.exp_bits!r}")
        if not (isinstance(self.man_bits, int) and 1 <= self.man_bits <= 23):
            raise VitcompressError(f"FloatFormat: man_bits must be 1..23, got {self.man_bits!r}")
        if self.has_inf and not self.has_nan:
            raise VitcompressError(
                "FloatFormat: a format with inf also has NaN (IEEE); set has_nan"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        if self.saturate is None:
            object.__setattr__(self, "saturate", not self.has_inf)
        if not self.saturate and not self.has_inf and not self.has_nan:
            raise VitcompressError(
                f"FloatFormat e{self.exp_bits}m{self.man_bits}: without inf or NaN an overflow "
                "has nowhere to go; use saturate=True"
            )
        if not self.name:
            object.__setattr__(self, "name", f"e{self.exp_bits}m{self.man_bits}")
        natural = self._natural_max()
        if natural > _FP32_MAX or self.emin - self.man_bits < -149:
            raise VitcompressError(
                f"FloatFormat {self.name}: range (bias {self.bias}) does not fit fp32 emulation"
            )
        if self.max_value is not None:
            mv = float(self.max_value)
            if (
                not (0 < mv <= natural)
                or self._round64(torch.tensor([mv], dtype=torch.float64))[0].item() != mv
            ):
                raise VitcompressError(
                    f"FloatFormat {self.name}: max_value {mv} is not a positive representable "
                    f"value <= {natural}"
                )

    # --- derived numbers -------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Bits of one encoded element (tf32: 19, though torch and ONNX keep it in 32)."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite numbers."""
        top = 2**self.exp_bits - (2 if self.has_inf else 1)
        return top - self.bias

    def _natural_max(self) -> float:
        # In the fn flavour the all-ones mantissa of the top exponent is NaN.
        ulps = 1 if (self.has_inf or not self.has_nan) else 2
        return (2.0 - ulps * 2.0**-self.man_bits) * 2.0**self.emax

    @property
    def max(self) -> float:
        """Largest finite value."""
        return float(self.max_value) if self.max_value is not None else self._natural_max()

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits) if self.subnormals else self.min_normal

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly these semantics (overflow aside), if any."""
        key = (self.exp_bits, self.man_bits, self.bias, self.has_inf, self.has_nan)
        if not self.subnormals or self.max_value is not None:
            return None
        return _TORCH_DTYPES.get(key)

    # --- rounding --------------------------------------------------------------------------
    def _round64(self, x64: torch.Tensor) -> torch.Tensor:
        """Round float64 values onto this format's grid, range unbounded above (no overflow)."""
        _, e = torch.frexp(x64)  # x = m * 2^e, 0.5 <= |m| < 1, so the exponent of x is e - 1
        exp = torch.clamp(e.to(torch.int64) - 1, min=self.emin)  # subnormals share emin
        quantum = _pow2(exp - self.man_bits)
        # Dividing and multiplying by a power of two is exact; torch.round is half-to-even.
        return torch.round(x64 / quantum) * quantum

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        """The format's value of each element, by arithmetic alone (works for every format)."""
        x64 = x.detach().to(torch.float64)
        r = self._round64(x64)
        if not self.subnormals:
            r = torch.where(r.abs() < self.min_normal, r * 0.0, r)  # r * 0 keeps the sign
        over = r.abs() > self.max  # False for NaN, True for inf
        if self.saturate:
            r = torch.where(over, torch.copysign(torch.full_like(r, self.max), x64), r)
        elif self.has_inf:
            r = torch.where(over, torch.copysign(torch.full_like(r, math.inf), x64), r)
        else:
            r = torch.where(over, torch.full_like(r, math.nan), r)
        return r.to(torch.float32)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 tensor of the values this format stores for ``x`` (see the module docstring).

        Uses torch's own cast when a dtype with the same semantics exists (fast, and proven
        bit-identical to :meth:`emulate` by the tests), the arithmetic emulation otherwise.
        """
        dt = self.torch_dtype
        if dt is not None and dt is not torch.float32:
            torch_saturates = not self.has_inf  # torch 2.13 CPU: e4m3fn saturates, others overflow
            if self.saturate == torch_saturates:
                return x.detach().to(dt).to(torch.float32)
            if self.saturate:  # clamping first gives +-max for every overflow, inf included
                return x.detach().clamp(-self.max, self.max).to(dt).to(torch.float32)
        if dt is torch.float32 and self.saturate is False:
            return x.detach().to(torch.float32)
        return self.emulate(x)

    def saturating(self) -> FloatFormat:
        """This format with ``saturate=True`` (what scaled quantizers use)."""
        return self if self.saturate else replace(self, saturate=True)


_TORCH_DTYPES: dict[tuple, torch.dtype] = {
    (8, 23, 127, True, True): torch.float32,
    (5, 10, 15, True, True): torch.float16,
    (8, 7, 127, True, True): torch.bfloat16,
    (4, 3, 7, False, True): torch.float8_e4m3fn,
    (5, 2, 15, True, True): torch.float8_e5m2,
}


@dataclass(frozen=True)
class IntFormat:
    """A ``bits``-bit integer with an affine map to reals (module docstring for the ranges).

    Unsigned formats are always asymmetric (their zero point sits inside the range).
    ``narrow`` drops the most negative code of a signed format; default: when symmetric.
    """

    bits: int
    symmetric: bool = True
    unsigned: bool = False
    narrow: bool | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise VitcompressError(f"IntFormat: bits must be 2..8, got {self.bits!r}")
        if self.unsigned and self.symmetric:
            raise VitcompressError(
                "IntFormat: unsigned formats are asymmetric; use symmetric=False or a signed format"
            )
        if self.narrow is None:
            object.__setattr__(self, "narrow", self.symmetric)
        if self.narrow and self.unsigned:
            raise VitcompressError("IntFormat: the narrow range is for signed formats")

    @property
    def name(self) -> str:
        return f"{'u' if self.unsigned else ''}int{self.bits}"

    @property
    def qmin(self) -> int:
        if self.unsigned:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if self.unsigned else 2 ** (self.bits - 1) - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype that holds one code (sub-byte codes are packed by the exporter)."""
        return torch.uint8 if self.unsigned else torch.int8

    def quantize(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fake-quantise ``x`` (fp32 out); without a scale, per-tensor min/max qparams."""
        if scale is None:
            scale, zero_point = compute_qparams(x, self)
        if zero_point is None:
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return fake_quant_int(x, scale, zero_point, self.qmin, self.qmax)


Format = FloatFormat | IntFormat

# --- names ---------------------------------------------------------------------------------
_NAMED_FLOATS: dict[str, FloatFormat] = {
    "fp32": FloatFormat(8, 23, name="fp32"),
    "tf32": FloatFormat(8, 10, name="tf32"),
    "bf16": FloatFormat(8, 7, name="bf16"),
    "fp16": FloatFormat(5, 10, name="fp16"),
    "fp8_e4m3": FloatFormat(4, 3, has_inf=False, name="fp8_e4m3"),
    "fp8_e5m2": FloatFormat(5, 2, name="fp8_e5m2"),
    "fp6_e3m2": FloatFormat(3, 2, has_inf=False, has_nan=False, name="fp6_e3m2"),
    "fp6_e2m3": FloatFormat(2, 3, has_inf=False, has_nan=False, name="fp6_e2m3"),
    "fp4_e2m1": FloatFormat(2, 1, has_inf=False, has_nan=False, name="fp4_e2m1"),
}


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as a signed integer tensor of the same width (bool as uint8)."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size(), torch.uint8)
        return t.view(width)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (so -0.0 differs from 0.0 and NaNs compare by payload)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits_view(a), bits_view(b))


def float_code_table(fmt: FloatFormat) -> torch.Tensor:
    """Value of every code of a float format of <= 8 bits (NaN for the special codes)."""
    E, M = fmt.exp_bits, fmt.man_bits
    codes = torch.arange(2 ** (1 + E + M), dtype=torch.int64)
    sign = (codes >> (E + M)) & 1
    e = (codes >> M) & (2**E - 1)
    m = (codes & (2**M - 1)).double()
    val = torch.where(
        e == 0,
        m * 2.0 ** (fmt.emin - M),
        (1 + m / 2**M) * torch.pow(2.0, (e - fmt.bias).double()),
    )
    val = torch.where(sign == 1, -val, val)
    top = e == 2**E - 1
    if fmt.has_inf:
        val = torch.where(top, torch.full_like(val, math.nan), val)
    elif fmt.has_nan:
        val = torch.where(top & (m == 2**M - 1), torch.full_like(val, math.nan), val)
    return val.float()


def float_codes(q: torch.Tensor, fmt: FloatFormat) -> torch.Tensor | None:
    """Codes of values ``q`` that lie on ``fmt``'s grid, or None if one does not."""
    table = float_code_table(fmt)
    pos = table[: len(table) // 2]  # sign bit clear
    ok = ~torch.isnan(pos)
    vals, codes = pos[ok], torch.arange(len(pos))[ok]
    order = torch.argsort(vals, stable=True)
    vals, codes = vals[order], codes[order]
    mag = q.abs().reshape(-1)
    i = torch.searchsorted(vals, mag).clamp(max=len(vals) - 1)
    if not torch.equal(vals[i], mag):
        return None
    out = codes[i] + torch.signbit(q.reshape(-1)).long() * (len(table) // 2)
    return out.reshape(q.shape)


_ALIASES = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp8": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "fp4": "fp4_e2m1",
    "e2m1": "fp4_e2m1",
    "e3m2": "fp6_e3m2",
    "e2m3": "fp6_e2m3",
}
FORMAT_NAMES = list(_NAMED_FLOATS) + list(_ALIASES) + ["e{E}m{M}", "int2..int8", "uint2..uint8"]


def get_format(name: str) -> Format:
    """The format called ``name``.

    Names: ``fp32``, ``tf32``, ``bf16``, ``fp16``, ``fp8_e4m3`` (``fp8``, ``e4m3``: OCP e4m3fn),
    ``fp8_e5m2`` (``e5m2``), ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1`` (``fp4``), any ``e{E}m{M}``,
    ``int2``..``int8`` (symmetric) and ``uint2``..``uint8`` (asymmetric).

    A general ``e{E}m{M}`` follows the OCP conventions by exponent width, so that every OCP name
    means what OCP says: E >= 5 is IEEE-like (inf and NaN; e5m2, e5m10 = fp16, e8m7 = bf16),
    E = 4 is the fn flavour (NaN only; e4m3), E <= 3 has no specials (MX fp6/fp4).
    """
    if not isinstance(name, str):
        raise VitcompressError(f"format must be a string name, got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _NAMED_FLOATS:
        return _NAMED_FLOATS[key]
    m = re.fullmatch(r"(?:fp\d+_)?e(\d+)m(\d+)", key)
    if m:
        e, mb = int(m.group(1)), int(m.group(2))
        flavour = dict(has_inf=e >= 5, has_nan=e >= 4)
        return FloatFormat(e, mb, name=f"e{e}m{mb}", **flavour)
    m = re.fullmatch(r"(u?)int(\d+)", key)
    if m and 2 <= int(m.group(2)) <= 8:
        unsigned = m.group(1) == "u"
        return IntFormat(int(m.group(2)), symmetric=not unsigned, unsigned=unsigned)
    raise VitcompressError(f"unknown number format {name!r}; valid: {', '.join(FORMAT_NAMES)}")


# --- integer affine maths ------------------------------------------------------------------
def _code_dtype(qmin: int, qmax: int) -> torch.dtype:
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int32


def quantize_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (round half to even).

    ``scale`` and ``zero_point`` must broadcast against ``x`` (see :func:`expand_qparams`).
    Returns uint8 for ranges within [0, 255], int8 within [-128, 127], int32 otherwise.
    """
    q = torch.div(x.detach().float(), scale).round_()
    if not (isinstance(zero_point, int) and zero_point == 0):
        q.add_(zero_point)
    return q.clamp_(qmin, qmax).to(_code_dtype(qmin, qmax))


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero_point)`` in fp32 (ONNX DequantizeLinear)."""
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale


def fake_quant_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``dequantize_int(quantize_int(x, ...))`` without the integer tensor in between."""
    zp = zero_point.to(torch.float32)
    q = torch.div(x.float(), scale).round_().add_(zp).clamp_(qmin, qmax)
    return q.sub_(zp).mul_(scale)


def qparams_from_minmax(
    min_val: torch.Tensor, max_val: torch.Tensor, fmt: Format
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point that map ``[min_val, max_val]`` (elementwise) onto ``fmt``.

    Integers: symmetric ``s = max(|min|, |max|) / qmax``, ``z = 0``; asymmetric ranges are first
    widened to contain 0 (so that 0 is exact), ``s = (max - min) / (qmax - qmin)``,
    ``z = qmin - round(min / s)``. Floats: ``s = max(|min|, |max|) / fmt.max`` and no zero point
    (the largest magnitude lands on the format's largest value). An empty range gives ``s = 1``.
    """
    lo = min_val.detach().float()
    hi = max_val.detach().float()
    if isinstance(fmt, FloatFormat) or fmt.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        top = fmt.max if isinstance(fmt, FloatFormat) else fmt.qmax
        scale = amax / top
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    ok = (scale > 0) & torch.isfinite(scale)
    scale = torch.where(ok, scale, torch.ones_like(scale)).clamp(
        min=torch.finfo(torch.float32).tiny
    )
    if isinstance(fmt, FloatFormat):
        return scale, None
    if fmt.symmetric:
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    zp = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
    return scale, zp.to(torch.int32)


def fake_quant(
    x: torch.Tensor, fmt: Format, scale: torch.Tensor | None, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """Fake-quantise with broadcastable qparams: affine for integers, scaled cast for floats."""
    if isinstance(fmt, IntFormat):
        return fake_quant_int(x, scale, zero_point, fmt.qmin, fmt.qmax)
    if scale is None:
        return fmt.quantize(x)
    return fmt.saturating().quantize(x.float() / scale) * scale


def _slices(
    x: torch.Tensor, granularity: str, group_size: int | None, axis: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as rows (one per set of qparams, zero-padded) and the shape of the qparams."""
    if granularity == "per_tensor":
        return x.reshape(1, -1), ()
    if granularity not in GRANULARITIES:
        raise VitcompressError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    axis = axis % x.ndim
    rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, K)
    if granularity == "per_channel":
        shape = tuple(x.shape[axis] if d == axis else 1 for d in range(x.ndim))
        return rows, shape
    if not (isinstance(group_size, int) and group_size >= 1):
        raise VitcompressError(f"per_group needs group_size >= 1, got {group_size!r}")
    C, K = rows.shape
    G = -(-K // group_size)
    # Zero padding changes neither the range (which always contains 0) nor the error.
    rows = torch.nn.functional.pad(rows, (0, G * group_size - K))
    return rows.reshape(C * G, group_size), (C, G)


def expand_qparams(
    t: torch.Tensor,
    x_shape: tuple[int, ...] | torch.Size,
    granularity: str,
    group_size: int | None = None,
    axis: int = 0,
) -> torch.Tensor:
    """Qparams as returned by :func:`compute_qparams`, made to broadcast against ``x``.

    Per-group qparams ``(C, G)`` cover runs of ``group_size`` consecutive elements of the
    flattened non-channel dims (for a Linear weight ``(out, in)``: columns
    ``[g * group_size, (g + 1) * group_size)`` of row ``c``; the last group may be shorter).
    """
    if granularity != "per_group":
        return t
    axis = axis % len(x_shape)
    C = x_shape[axis]
    K = math.prod(x_shape) // C
    full = t.repeat_interleave(group_size, dim=1)[:, :K]  # (C, K)
    moved = [x_shape[axis]] + [s for d, s in enumerate(x_shape) if d != axis]
    return full.reshape(moved).movedim(0, axis)


def _range_of(rows: torch.Tensor, fmt: Format, method: str, percentile: float):
    if method == "percentile":
        n = rows.shape[1]
        k_hi = min(n, max(1, math.ceil(percentile / 100.0 * n)))
        if isinstance(fmt, FloatFormat) or fmt.symmetric:
            hi = rows.abs().kthvalue(k_hi, dim=1).values
            return -hi, hi
        k_lo = max(1, min(n, n + 1 - k_hi))
        return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values
    return rows.amin(dim=1), rows.amax(dim=1)


def _mse_range(rows: torch.Tensor, fmt: Format, n_grid: int = 64):
    """Per row, the clipped range ``ratio * [min, max]`` with the least quantisation MSE."""
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # (S,)
    ratios = torch.linspace(1.0, 0.2, n_grid, device=rows.device)
    chunk = max(1, 2**22 // max(rows.numel(), 1))  # ratios scored at once, in bounded memory
    errs = []
    for i in range(0, n_grid, chunk):
        r = ratios[i : i + chunk, None]  # (c, 1)
        s, z = qparams_from_minmax(lo * r, hi * r, fmt)  # (c, S)
        fq = fake_quant(rows, fmt, s[..., None], None if z is None else z[..., None])  # (c, S, n)
        errs.append((fq - rows).pow(2).sum(dim=-1))
    best = torch.cat(errs).argmin(dim=0)  # the first minimum: ties keep the wider range
    return lo * ratios[best], hi * ratios[best]


def compute_qparams(
    x: torch.Tensor,
    fmt: Format,
    granularity: str = "per_tensor",
    group_size: int | None = None,
    axis: int = 0,
    method: str = "minmax",
    percentile: float = 99.99,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None for floats) of ``x`` in ``fmt``.

    Shapes: ``per_tensor`` scalars; ``per_channel`` ``x.ndim`` dims, all 1 but ``axis``
    (broadcast directly); ``per_group`` ``(C, G)``, ``G = ceil(K / group_size)`` (see
    :func:`expand_qparams`). ``method``: ``minmax`` (full range), ``percentile`` (the given
    percentile of ``|x|`` when symmetric, of both tails otherwise; nearest rank), or ``mse``
    (the clipping of the range, among 64 ratios in [0.2, 1], with the least squared error).
    """
    if method not in QPARAM_METHODS:
        raise VitcompressError(f"method must be one of {QPARAM_METHODS}, got {method!r}")
    rows, shape = _slices(x.detach().float(), granularity, group_size, axis)
    if method == "mse":
        lo, hi = _mse_range(rows, fmt)
    else:
        lo, hi = _range_of(rows, fmt, method, percentile)
    scale, zp = qparams_from_minmax(lo, hi, fmt)
    return scale.reshape(shape), None if zp is None else zp.reshape(shape)


def dynamic_qparams(
    x: torch.Tensor, fmt: Format, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max qparams of each vector along ``dim`` (per token for ``dim=-1``), keepdim shape.

    The same function serves the emulation and the real int8 kernel, so both see the same codes.
    """
    xd = x.detach()
    # amin + amax: two fast reductions (vector_norm(inf) and aminmax are ~10x slower on CPU)
    return qparams_from_minmax(xd.amin(dim=dim, keepdim=True), xd.amax(dim=dim, keepdim=True), fmt)
