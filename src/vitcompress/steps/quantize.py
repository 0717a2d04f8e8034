"""The ``quantize`` step: post-training quantization in the torchao style,
``quantize_(model, QuantizeConfig(...), calib_data)``, and the structure record of quantised
layers (:class:`~vitcompress.quantize.QuantLinear`, ``QuantMatMul``, ``Int8Linear``).

The attention dot products Q.K^T and A.V stay in float unless ``attention_matmul`` names a
format (both studies leave them in float). The patch-embedding Conv2d stays in float: it sees
the raw image and is a small share of the compute.

``softmax_quant`` and ``gelu_quant`` put the two ViT activations a uniform grid serves worst
(post-softmax attention, post-GELU) on the non-uniform grids of :mod:`vitcompress.quant_grids`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, NoReturn

import torch
from torch import nn

from vitcompress.config import as_patterns, build_config
from vitcompress.errors import VitcompressError
from vitcompress.formats import GRANULARITIES, Format, IntFormat, get_format
from vitcompress.gptq import gptq_quantize
from vitcompress.int8 import to_int8_
from vitcompress.models.vit import Attention, MatMul, Mlp
from vitcompress.obs import check_options
from vitcompress.quant_records import describe_quantized, rebuild_quantized_
from vitcompress.quantize import (
    PARAM_PRECISIONS,
    ActivationQuantizer,
    QuantLinear,
    QuantMatMul,
    calibrate_,
    is_scaled,
    rest_int_format,
    round_rest_,
)
from vitcompress.sparsity import MASK
from vitcompress.steps.hessian import compress_sequentially_
from vitcompress.steps.registry import Step, StepContext, plain
from vitcompress.targets import (
    Patterns,
    get_submodule_parent,
    name_matches,
    replace_module,
    select_modules,
)

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
ALGORITHMS = ("rtn", "gptq")
# QuantizeConfig fields that only GPTQ reads: left out of a recipe's hash under RTN, so that the
# hashes of recipes written before GPTQ existed do not change
GPTQ_FIELDS = ("algorithm", "damp", "act_order", "block_size")


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
            bytes instead of 4 (on a small ViT they are a noticeable share of the INT8 file).
            A signed integer format (``int8``, ... ``int2``) quantises them weight-only and
            symmetrically, with a 2-byte scale per slice along dim 0 (per output channel of the
            patch projection) for tensors of 2 or more dimensions and one per tensor for
            vectors; the packer finds the codes again and stores them in ``bits`` bits
            (:func:`fake_quant_slices`).
        algorithm: how the weights are rounded: ``rtn`` (round to nearest, each weight on its
            own) or ``gptq`` (:mod:`vitcompress.gptq`: column by column, each column's error
            moved onto the columns after it, the Hessian of the layer's inputs measured block by
            block on ``calibration.batches`` batches of calibration data,
            :mod:`vitcompress.steps.hessian`). Same codes, scales and stored size either way.
        damp: GPTQ's dampening of the Hessian, relative to its mean diagonal (> 0).
        act_order: GPTQ quantises the inputs with the largest activations first.
        block_size: GPTQ's columns per lazy batch update (speed only; >= 1).
        softmax_quant: the grid of the post-softmax input ``A`` of each attention ``A.V``
            (when ``attention_matmul`` is an integer format): ``uniform``, ``log2`` or ``twin``
            (:mod:`vitcompress.quant_grids`); static activations only.
        gelu_quant: the grid of each ``mlp.fc2`` input (post-GELU; static integer
            activations): ``uniform`` or ``twin``.
    """

    weights: str = "int8"
    activations: str | None = "int8"
    granularity: str = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    dynamic: bool = False
    attention_matmul: str = "fp32"
    targets: Patterns = "*"
    ignore: Patterns = None
    scales: str = "fp32"
    rest: str = "fp32"
    algorithm: str = "rtn"
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    # --- outlier-aware activation grids (see the block of that name below) -----------------
    softmax_quant: str = "uniform"
    gelu_quant: str = "uniform"

    def __post_init__(self) -> None:
        _check_grids(self)
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
        for key in ("symmetric", "dynamic", "act_order"):
            if not isinstance(getattr(self, key), bool):
                _fail("quantize", key, getattr(self, key), "true or false")
        if self.algorithm not in ALGORITHMS:
            _fail("quantize", "algorithm", self.algorithm, f"one of {', '.join(ALGORITHMS)}")
        check_options(self.damp, self.block_size, "quantize")
        if self.algorithm != "gptq":
            set_ = [k for k in GPTQ_FIELDS[1:] if getattr(self, k) != _GPTQ_DEFAULTS[k]]
            if set_:
                raise VitcompressError(
                    f"quantize.{set_[0]} only applies to algorithm: gptq (this step rounds to "
                    "nearest); add algorithm: gptq or drop it"
                )
        cal = self.calibration
        if isinstance(cal, Mapping):
            cal = build_config(CalibrationConfig, cal, "quantize.calibration")
            object.__setattr__(self, "calibration", cal)
        elif not isinstance(cal, CalibrationConfig):
            _fail("quantize", "calibration", cal, "a mapping like {method: minmax, batches: 8}")
        if self.targets is None:
            _fail("quantize", "targets", None, "a name pattern or a list of them")
        for key in ("targets", "ignore"):
            object.__setattr__(self, key, as_patterns(getattr(self, key), f"quantize.{key}"))

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


_GPTQ_DEFAULTS = {f.name: f.default for f in fields(QuantizeConfig) if f.name in GPTQ_FIELDS}


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
            for static activation ranges and GPTQ's Hessians; at most
            ``config.calibration.batches`` are used.
        calibrate: False only builds the quantised structure, e.g. before loading the state dict
            of a model that was calibrated earlier (GPTQ is then not run: the weights to load
            hold its values).

    Raises:
        VitcompressError: a pattern that matches nothing, static activations or GPTQ without
            ``calib_data``, attention quantization on a model without MatMul modules, a
            ``softmax_quant`` / ``gelu_quant`` grid with no layer to act on; all before the
            model is changed.
    """
    if not isinstance(config, QuantizeConfig):
        raise VitcompressError(f"quantize_ needs a QuantizeConfig, got {type(config).__name__}")
    layers = select_modules(model, config.targets, config.ignore, (nn.Linear,), "quantize.targets")
    mm_fmt = config.matmul_format
    matmuls = _matmuls(model, config) if mm_fmt is not None else []
    grids = grid_sites(model, config, (n for n, _ in layers), (n for n, _ in matmuls))
    wfmt, afmt = config.weight_format, config.activation_format
    cal = config.calibration
    needs_data = not config.dynamic and (
        (afmt is not None and is_scaled(afmt)) or (mm_fmt is not None and is_scaled(mm_fmt))
    )
    if needs_data and calibrate and calib_data is None:
        raise VitcompressError(
            "static activation quantization needs calib_data (a few input batches); "
            "or set dynamic: true, or activations: null for weight-only"
        )
    gptq = config.algorithm == "gptq" and calibrate
    if gptq and calib_data is None:
        raise VitcompressError(
            "quantize.algorithm gptq needs calib_data (a few input batches) to measure each "
            "layer's inputs; pass calib_data or use algorithm: rtn"
        )

    def act(fmt: Format, dim: int = -1) -> ActivationQuantizer:
        return ActivationQuantizer(fmt, config.dynamic, cal.method, cal.percentile, dim)

    for name, linear in layers:  # all checked before the model changes
        if not bool(torch.isfinite(linear.weight.detach()).all()):
            raise VitcompressError(
                f"quantize: {name}.weight holds NaN or Inf; quantising would hide it behind "
                "finite codes"
            )
    scale_dtype = PARAM_PRECISIONS[config.scales]
    if gptq:
        # the same batches for the Hessians and the activation ranges, from any iterable
        calib_data = list(itertools.islice(calib_data, cal.batches))
        _gptq_(model, dict(layers), config, calib_data)
    for name, linear in layers:
        aq = act(afmt) if afmt is not None else None
        if gptq:  # quantised above; inputs quantised only now, so GPTQ saw float activations
            model.get_submodule(name).input_quant = aq
            continue
        new = QuantLinear.from_linear(
            linear, wfmt, config.granularity, config.group_size, aq, scale_dtype
        )
        replace_module(model, name, new)
    round_rest_(model, config.rest)
    for name, _ in matmuls:
        parent, _ = get_submodule_parent(model, name)
        if hasattr(parent, "fused_attn"):
            parent.fused_attn = False  # route attention through the MatMul modules
        replace_module(model, name, QuantMatMul(act(mm_fmt, -1), act(mm_fmt, -2)))
    use_grids_(model, config, grids)
    if needs_data and calibrate:
        calibrate_(model, calib_data, cal.batches)


def _gptq_(
    model: nn.Module, layers: dict[str, nn.Module], config: QuantizeConfig, calib_data: Iterable
) -> None:
    """Replace ``layers`` by weight-only :class:`QuantLinear` modules holding GPTQ's values,
    block by block. A pruned layer (``weight_mask``) keeps its zeros."""
    wfmt, scale_dtype = config.weight_format, PARAM_PRECISIONS[config.scales]

    def compress(name: str, linear: nn.Module, h: torch.Tensor) -> None:
        try:
            res = gptq_quantize(
                linear.weight.detach(), h, wfmt, config.granularity, config.group_size,
                damp=config.damp, act_order=config.act_order, block_size=config.block_size,
                scale_dtype=scale_dtype, mask=linear._buffers.get(MASK),
            )  # fmt: skip
        except VitcompressError as e:
            raise VitcompressError(f"quantize (gptq) {name}: {e}") from None
        new = QuantLinear.from_linear(
            linear, wfmt, config.granularity, config.group_size, None, scale_dtype,
            weight=res.weight, qparams=(res.scale, res.zero_point),
        )  # fmt: skip
        replace_module(model, name, new)

    compress_sequentially_(model, layers, calib_data, compress, config.calibration.batches)


# --------------------------------------------------------------------------------------------
# Outlier-aware activation grids: softmax_quant, gelu_quant (vitcompress.quant_grids)
# --------------------------------------------------------------------------------------------

SOFTMAX_GRIDS = ("uniform", "log2", "twin")
GELU_GRIDS = ("uniform", "twin")
# Fields added after recipe hashes were first stored: left out of a recipe's resolved dict while
# they hold their defaults, so that the hash of every older recipe stays the same.
_GRID_FIELDS = {"softmax_quant": "uniform", "gelu_quant": "uniform"}


def _check_grids(config: QuantizeConfig) -> None:
    """``softmax_quant`` / ``gelu_quant``: known grids, on static integer inputs. Formats that
    do not parse are left to the checks of ``__post_init__`` that follow."""
    for key, source, grids in (
        ("softmax_quant", "attention_matmul", SOFTMAX_GRIDS),
        ("gelu_quant", "activations", GELU_GRIDS),
    ):
        value = getattr(config, key)
        if value not in grids:
            _fail("quantize", key, value, f"one of {', '.join(grids)}")
        if value == "uniform":
            continue
        name = getattr(config, source)
        try:
            fmt = None if name in (None, "fp32") else get_format(name)
        except VitcompressError:
            continue
        if not isinstance(fmt, IntFormat):
            raise VitcompressError(
                f"quantize.{key} = {value!r} quantises {source} on a {value} grid, which needs "
                f"an integer {source} format (e.g. {source}: int8), got {name!r}"
            )
        if config.dynamic is True:
            raise VitcompressError(
                f"quantize.{key} = {value!r} is a calibrated grid; it needs dynamic: false"
            )


def grid_sites(
    model: nn.Module, config: QuantizeConfig, linears: Iterable[str], matmuls: Iterable[str]
) -> list[tuple[str, str]]:
    """``(module name, quantizer attribute)`` of every activation quantizer ``softmax_quant`` /
    ``gelu_quant`` replace, given the names of the Linears and MatMuls :func:`quantize_` is
    about to quantise: the ``a`` input of each attention ``A.V``, the input of each ``fc2``
    (its ``.first`` factor after a low-rank step). A grid that finds nothing is an error.
    """
    linears, matmuls = set(linears), set(matmuls)
    sites: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if config.softmax_quant != "uniform" and isinstance(m, Attention):
            if f"{prefix}av_matmul" in matmuls:
                sites.append((f"{prefix}av_matmul", "a_quant"))
        if config.gelu_quant != "uniform" and isinstance(m, Mlp):
            fc2 = f"{prefix}fc2"
            fc2 = fc2 if fc2 in linears else f"{fc2}.first"  # after lowrank: fc2.first
            if fc2 in linears:
                sites.append((fc2, "input_quant"))
    for key, attr, what in (("softmax_quant", "a_quant", "attention A.V MatMul"),
                            ("gelu_quant", "input_quant", "mlp.fc2 Linear")):  # fmt: skip
        grid = getattr(config, key)
        if grid != "uniform" and not any(a == attr for _, a in sites):
            raise VitcompressError(
                f"quantize.{key} = {grid!r}, but no quantised {what} matches the targets; "
                f"quantise it or leave {key}: uniform"
            )
    return sites


def use_grids_(model: nn.Module, config: QuantizeConfig, sites: list[tuple[str, str]]) -> None:
    """Put the quantizers ``softmax_quant`` / ``gelu_quant`` name in place of the uniform ones
    :func:`quantize_` made at ``sites`` (:func:`grid_sites`), before calibration."""
    from vitcompress.quant_grids import GRID_QUANTIZERS

    for name, attr in sites:
        module = model.get_submodule(name)
        grid = config.softmax_quant if attr == "a_quant" else config.gelu_quant
        old = getattr(module, attr)
        setattr(module, attr, GRID_QUANTIZERS[grid](old.fmt, old.dim))


class QuantizeStep(Step):
    kind = "quantize"
    config_cls = QuantizeConfig
    last = True  # quantization-aware training is not supported
    result_defaults = {"format": "fp32", "activations": None}

    def to_dict(self, config: QuantizeConfig) -> dict:
        """Defaults filled in; GPTQ's options only when it runs and the outlier grids only
        when not uniform (the hashes of older recipes stay)."""
        d = plain(config)
        if config.algorithm == "rtn":
            for key in GPTQ_FIELDS:
                del d[key]
        return {k: v for k, v in d.items() if k not in _GRID_FIELDS or v != _GRID_FIELDS[k]}

    def needs_calibration(self, config: QuantizeConfig) -> bool:
        if config.algorithm == "gptq":
            return True
        if config.dynamic:
            return False
        fmts = (config.activation_format, config.matmul_format)
        return any(f is not None and is_scaled(f) for f in fmts)

    def check_layers(self, shadow: nn.Module, config: QuantizeConfig, what: str) -> None:
        select_modules(shadow, config.targets, config.ignore, (nn.Linear,), what)

    def apply(self, model: nn.Module, config: QuantizeConfig, ctx: StepContext, index: int) -> dict:
        quantize_(model, config, ctx.calib_loader)
        return {"weights": config.weights, "activations": config.activations}

    def describe(self, model: nn.Module) -> dict | None:
        return describe_quantized(model) or None

    def rebuild(self, model: nn.Module, record: dict) -> None:
        if "config" in record:  # a config.json written before the registry: replay the config
            quantize_(model, QuantizeConfig(**record["config"]), calibrate=False)
        else:
            rebuild_quantized_(model, record)

    def result_fields(
        self, model: nn.Module, config: QuantizeConfig, report: dict | None, so_far: dict
    ) -> dict:
        fields = {"format": config.weights, "activations": config.activations}
        for key, default in self.result_defaults.items():  # layers in several formats
            if so_far.get(key, default) not in (default, fields[key]):
                fields[key] = "mixed"
        return fields

    def runtime(self, model: nn.Module, config: QuantizeConfig) -> tuple | None:
        """INT8 weights with INT8 activations run real integer GEMMs; bf16/fp16 run in that
        dtype; formats without a CPU kernel here (fp8, int4, ...) are ``emulated``."""
        w, a = config.weights, config.activations
        if w in ("fp32", "tf32") and a in (None, "fp32", "tf32"):
            return model, "torch-fp32", torch.float32
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if w == name and a in (None, name):
                return copy.deepcopy(model).to(dtype), f"torch-{name}", dtype
        if w == "int8" and a == "int8" and config.attention_matmul == "fp32":
            fast = copy.deepcopy(model)
            try:
                to_int8_(fast)
            except VitcompressError:
                return None, "emulated", torch.float32
            return fast, "torch-int8", torch.float32
        return None, "emulated", torch.float32


STEP = QuantizeStep()

__all__ = [
    "ALGORITHMS",
    "CALIBRATION_METHODS",
    "GPTQ_FIELDS",
    "STEP",
    "CalibrationConfig",
    "QuantizeConfig",
    "quantize_",
    "grid_sites",
    "use_grids_",
]
