"""Real int8 on the CPU: :func:`to_int8_` turns int8 :class:`~vitcompress.quantize.QuantLinear`
layers into :class:`Int8Linear`, which runs an integer GEMM with int32 accumulation (torch's
fused quantized engine for static scales, ``torch._int_mm`` for per-token ones) on the same codes,
so its outputs equal the emulation's up to fp32 rounding: accuracy measured on the emulation is
the accuracy of what is timed.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.formats import IntFormat, dynamic_qparams
from vitcompress.quantize import ActivationQuantizer, QuantLinear
from vitcompress.targets import replace_module, select_modules


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
    integer GEMM. ``torch._int_mm`` stays exact there but runs far slower than fbgemm, so
    ``backend="auto"`` keeps fbgemm for speed; exact choices there are ``backend="int_mm"``, or
    7-bit weights (``weights: int7``, codes in [-63, 63]: 255 x 63 x 2 fits int16), with which
    fbgemm is exact (tested), and so is onnxruntime's ``MatMulInteger``; what then remains
    between onnxruntime and torch is their float arithmetic outside the GEMMs
    (``benchmarks/INT8_EXACTNESS.md`` has the numbers).
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
    faster one each mode allows (on ViT Linear shapes, fbgemm was the faster where it applies):

    - ``fbgemm`` (static only): torch's quantized CPU engine quantizes the input, runs
      the integer GEMM and rescales in one fused call, prepacked from our codes (rebuilt lazily
      when the tensors change). The input needs no extra pass when its codes span all 256
      values, as the full-range activations of :mod:`vitcompress.quantize` do.
    - ``int_mm`` (static or dynamic per token): ``torch._int_mm`` (oneDNN,
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
        elif aq.grid != "uniform":
            why = f"its activations are on a {aq.grid} grid; an integer GEMM needs a uniform one"
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
        replace_module(model, n, m)
