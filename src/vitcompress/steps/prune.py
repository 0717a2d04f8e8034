"""The ``prune`` step: unstructured (per layer or global) and N:M sparsity, by magnitude,
Wanda or SparseGPT, one shot or (magnitude) on the cubic schedule during the fine-tune that
follows.

The mask maths lives in :mod:`vitcompress.sparsity` and :mod:`vitcompress.sparsegpt`; this
module holds the config, the verb :func:`prune_` and the step that records which layers carry
masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from vitcompress.config import as_patterns, check_int
from vitcompress.errors import VitcompressError
from vitcompress.obs import check_options
from vitcompress.sparsegpt import sparsegpt_prune
from vitcompress.sparsity import (
    MASK,
    PRUNABLE_TYPES,
    achieved_sparsity,
    apply_masks_,
    check_sparsity,
    compute_masks,
    cubic_sparsity,
    get_masks,
    parse_pattern,
    select_prunable,
)
from vitcompress.steps.calib import input_rows, observe_inputs
from vitcompress.steps.hessian import compress_sequentially_
from vitcompress.steps.registry import Step, StepContext, plain
from vitcompress.targets import Patterns, select_modules

METHODS = ("magnitude", "wanda", "sparsegpt")
# PruneConfig fields that only SparseGPT reads: left out of a recipe's hash for the other
# methods, so that the hashes of recipes written before SparseGPT existed do not change
SPARSEGPT_FIELDS = ("damp", "block_size", "calib_batches")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune, how much, and when.

    Attributes:
        sparsity: final fraction of zeros per layer (or overall for ``scope="global"``), in
            [0, 1). Required for ``"unstructured"``; for ``"N:M"`` it is ``1 - N/M`` and may be
            omitted (if given it must agree).
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"`` keeps 2 of every 4 along the input
            dimension).
        scope: ``"layer"`` (every layer reaches ``sparsity``) or ``"global"`` (one magnitude
            threshold across the selected layers; unstructured magnitude only).
        schedule: ``"oneshot"`` (:func:`prune_`, or :class:`GradualPruner` at ``start_step``) or
            ``"cubic"`` (Zhu & Gupta, with :class:`GradualPruner` during fine-tuning).
        initial_sparsity: ``s_i`` of the cubic schedule, in [0, sparsity].
        start_step: ``t0``, the first pruning step.
        n_steps: ``n``, the number of pruning intervals of the cubic schedule; None lets the
            fine-tune that follows set the schedule (:meth:`over`).
        frequency: ``dt``, optimizer steps between two pruning steps.
        method: ``"magnitude"`` (smallest ``|w|``), ``"wanda"`` (smallest ``|w| * ||x||`` per
            output row, one shot, needs calibration data) or ``"sparsegpt"``
            (:mod:`vitcompress.sparsegpt`: one shot, needs calibration data; the kept weights
            are updated to make up for the pruned ones, the Hessian of each layer's inputs
            measured block by block, :mod:`vitcompress.steps.hessian`). Every layer ends with
            exactly ``round(sparsity * numel)`` zeros, or exactly N of every M kept.
        targets: module name patterns (globs or ``re:``). The default ``"blocks.*"`` selects
            every Linear inside the encoder blocks (qkv, proj, fc1, fc2) and leaves the patch
            embedding and the classifier heads dense, as sparsity studies usually do. Conv2d
            layers can be selected by name too (``patch_embed.proj``).
        ignore: name patterns to leave out.
        damp: SparseGPT's dampening of the Hessian, relative to its mean diagonal (> 0).
        block_size: SparseGPT's columns per block (its masks are chosen per block; >= 1).
        calib_batches: the calibration batches Wanda and SparseGPT read (8 of 64 images: 512,
            Wanda's and SparseGPT's papers use 128 samples).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str = "layer"
    schedule: str = "oneshot"
    initial_sparsity: float = 0.0
    start_step: int = 0
    n_steps: int | None = None
    frequency: int = 1
    method: str = "magnitude"
    targets: Patterns = "blocks.*"
    ignore: Patterns = None
    damp: float = 0.01
    block_size: int = 128
    calib_batches: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", as_patterns(self.targets, "prune.targets"))
        object.__setattr__(self, "ignore", as_patterns(self.ignore, "prune.ignore"))
        nm = parse_pattern(self.pattern)
        if self.sparsity is not None:
            check_sparsity(self.sparsity, "prune.sparsity")
        if nm is None and self.sparsity is None:
            raise VitcompressError(
                "prune.sparsity is required for unstructured pruning (a number in [0, 1), e.g. 0.5)"
            )
        if nm is not None and self.sparsity is not None:
            implied = 1.0 - nm[0] / nm[1]
            if abs(self.sparsity - implied) > 1e-9:
                raise VitcompressError(
                    f"prune.sparsity {self.sparsity} contradicts pattern {self.pattern!r}, which "
                    f"means sparsity {implied:g}; drop sparsity or make them agree"
                )
        if self.scope not in ("layer", "global"):
            raise VitcompressError(f"prune.scope must be 'layer' or 'global', got {self.scope!r}")
        if self.schedule not in ("oneshot", "cubic"):
            raise VitcompressError(
                f"prune.schedule must be 'oneshot' or 'cubic', got {self.schedule!r}"
            )
        if self.method not in METHODS:
            raise VitcompressError(
                f"prune.method must be 'magnitude', 'wanda' or 'sparsegpt', got {self.method!r}"
            )
        check_options(self.damp, self.block_size, "prune")
        check_int(self.calib_batches, "prune.calib_batches", 1)
        if self.method != "sparsegpt":
            set_ = [k for k in _own_fields(self.method, dropped=True)
                    if getattr(self, k) != _SPARSEGPT_DEFAULTS[k]]  # fmt: skip
            if set_:
                where = "'sparsegpt'" if set_[0] != "calib_batches" else "'wanda' or 'sparsegpt'"
                raise VitcompressError(
                    f"prune.{set_[0]} only applies to method {where}; set method or drop it"
                )
        if nm is not None and self.scope == "global":
            raise VitcompressError(
                f"prune.scope 'global' does not apply to pattern {self.pattern!r}: N:M keeps N "
                f"of every M weights in each layer; use scope 'layer'"
            )
        if self.method == "wanda" and self.scope == "global":
            raise VitcompressError(
                "prune.method 'wanda' compares weights within each output row; use scope 'layer'"
            )
        if self.method == "sparsegpt" and self.scope == "global":
            raise VitcompressError(
                "prune.method 'sparsegpt' prunes each layer by its own inputs; use scope 'layer'"
            )
        if self.method in ("wanda", "sparsegpt") and self.schedule != "oneshot":
            raise VitcompressError(
                f"prune.method {self.method!r} prunes one shot; use schedule 'oneshot'"
            )
        if nm is not None and self.schedule != "oneshot":
            raise VitcompressError(
                f"prune.pattern {self.pattern!r} is applied one shot (then fine-tuned); use "
                f"schedule 'oneshot'"
            )
        check_sparsity(self.initial_sparsity, "prune.initial_sparsity")
        check_int(self.start_step, "prune.start_step", 0)
        check_int(self.frequency, "prune.frequency", 1)
        if self.schedule == "cubic":
            check_int(self.n_steps, "prune.n_steps", 1, optional=True)
            if self.initial_sparsity > self.target_sparsity:
                raise VitcompressError(
                    f"prune.initial_sparsity {self.initial_sparsity} must be <= sparsity "
                    f"{self.target_sparsity}"
                )
        else:
            if self.n_steps is not None or self.initial_sparsity != 0.0:
                raise VitcompressError(
                    "prune.n_steps and prune.initial_sparsity only apply to schedule 'cubic'"
                )

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, None for unstructured."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The final sparsity: ``sparsity``, or ``1 - N/M`` for an N:M pattern."""
        nm = self.nm
        return float(self.sparsity) if nm is None else 1.0 - nm[0] / nm[1]

    def over(self, total_steps: int) -> PruneConfig:
        """This config with an open cubic schedule (no ``n_steps``) fitted to a fine-tune of
        ``total_steps``: the ramp takes its first two thirds in ten prunings, so the last third
        recovers accuracy at the final sparsity. A config with ``n_steps`` is returned as is."""
        if self.schedule != "cubic" or self.n_steps is not None:
            return self
        ramp = max(1, (2 * total_steps) // 3)
        freq = self.frequency if self.frequency > 1 else max(1, ramp // 10)
        return replace(self, n_steps=max(1, ramp // freq), frequency=freq)

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at optimizer ``step``."""
        if self.schedule == "cubic":
            if self.n_steps is None:
                raise VitcompressError(
                    "prune.schedule 'cubic' needs n_steps (pruning intervals, >= 1), or a "
                    "fine-tune to fit it to: PruneConfig.over(total_steps)"
                )
            return cubic_sparsity(
                step,
                self.initial_sparsity,
                self.target_sparsity,
                self.start_step,
                self.n_steps,  # type: ignore[arg-type]
                self.frequency,
            )
        return self.target_sparsity if step >= self.start_step else 0.0


_SPARSEGPT_DEFAULTS = {f.name: f.default for f in fields(PruneConfig) if f.name in SPARSEGPT_FIELDS}


def _own_fields(method: str, dropped: bool = False) -> tuple[str, ...]:
    """The calibration options ``method`` reads (or, ``dropped``, those it does not)."""
    own = {"sparsegpt": SPARSEGPT_FIELDS, "wanda": ("calib_batches",)}.get(method, ())
    return tuple(k for k in SPARSEGPT_FIELDS if (k in own) != dropped)


def activation_norms(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib_data: Iterable,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of ``layers`` over all tokens of the first
    ``max_batches`` batches of ``calib_data`` (all of them if None).

    One forward pass of the dense model (Wanda's per-block sequential recalibration is not done:
    it needs the model's block structure). For a Conv2d the features are the unfolded patches
    (``in*kh*kw``). Returns float64 tensors.
    """
    sums: dict[str, torch.Tensor] = {}

    def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = input_rows(name, module, x).double()  # (tokens, in)
        sq = (x * x).sum(0)  # (in,)
        sums[name] = sq if name not in sums else sums[name] + sq

    observe_inputs(model, layers, calib_data, observe, max_batches)
    return {n: s.sqrt() for n, s in sums.items()}


def prune_(model: nn.Module, config: PruneConfig, calib_data: Iterable | None = None) -> None:
    """Prune the selected layers one shot, in place.

    Masks become ``weight_mask`` buffers and the pruned weights exact zeros. Layers that already
    carry a mask are pruned monotonically (their pruned weights stay pruned). ``calib_data`` (an
    iterable of input batches or ``(inputs, labels)`` pairs) is needed by ``method="wanda"`` and
    ``method="sparsegpt"`` (which also changes the weights it keeps).
    """
    if config.schedule != "oneshot":
        raise VitcompressError(
            "prune.schedule 'cubic' prunes during fine-tuning: use GradualPruner(model, config)"
        )
    layers = select_prunable(model, config)
    if config.method in ("wanda", "sparsegpt") and calib_data is None:
        raise VitcompressError(
            f"prune.method {config.method!r} needs calibration data (calib_data)"
        )
    if config.method == "sparsegpt":
        _sparsegpt_(model, layers, config, calib_data)
        return
    norms = None
    if config.method == "wanda":
        norms = activation_norms(model, layers, calib_data, config.calib_batches)
    apply_masks_(model, compute_masks(layers, config, config.target_sparsity, norms))


def _sparsegpt_(
    model: nn.Module, layers: dict[str, nn.Module], config: PruneConfig, calib_data: Iterable
) -> None:
    nm = config.nm
    sparsity = None if nm is not None else config.target_sparsity

    def compress(name: str, module: nn.Module, h: torch.Tensor) -> None:
        res = sparsegpt_prune(
            module.weight.detach(), h, sparsity, nm, mask=module._buffers.get(MASK),
            damp=config.damp, block_size=config.block_size, name=name,
        )  # fmt: skip
        with torch.no_grad():
            module.weight.copy_(res.weight)
        apply_masks_(model, {name: res.mask})

    compress_sequentially_(model, layers, calib_data, compress, config.calib_batches)


def zero_fraction(model: nn.Module, layers: Iterable[str]) -> float:
    """Zeros among the weights of ``layers`` (0.0 if none). A later quantize step replaces a
    pruned module (and drops its mask) but keeps its name and its zeros."""
    total = zeros = 0
    for name in layers:
        w = model.get_submodule(name).weight
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


class PruneStep(Step):
    kind = "prune"
    config_cls = PruneConfig
    result_defaults = {"pattern": None, "sparsity_target": 0.0, "sparsity": 0.0}

    def check_order(self, config: PruneConfig, index: int, kinds: list[str]) -> str | None:
        nxt = kinds[index + 1] if index + 1 < len(kinds) else None
        if config.schedule == "cubic" and nxt != "finetune":
            return "a cubic prune happens during fine-tuning; follow it with a finetune step"
        return None

    def to_dict(self, config: PruneConfig) -> dict:
        """Defaults filled in; SparseGPT's options only for it (older hashes stay)."""
        d = plain(config)
        for key in _own_fields(config.method, dropped=True):
            del d[key]
        return d

    def needs_calibration(self, config: PruneConfig) -> bool:
        return config.method in ("wanda", "sparsegpt")

    def check_layers(self, shadow: nn.Module, config: PruneConfig, what: str) -> None:
        select_modules(shadow, config.targets, config.ignore, PRUNABLE_TYPES, what)

    def apply(
        self, model: nn.Module, config: PruneConfig, ctx: StepContext, index: int
    ) -> dict | None:
        if config.schedule == "cubic":
            ctx.deferred["prune"] = (index, config)  # the next finetune prunes as it trains
            return None
        layers = select_prunable(model, config)
        prune_(model, config, ctx.calib_loader)
        return {"sparsity": achieved_sparsity({n: m._buffers[MASK] for n, m in layers.items()})}

    def describe(self, model: nn.Module) -> dict | None:
        layers = sorted(get_masks(model))
        return {"layers": layers} if layers else None

    def rebuild(self, model: nn.Module, record: dict) -> None:
        masks = {}
        for name in record["layers"]:
            w = model.get_submodule(name).weight
            masks[name] = torch.ones_like(w, dtype=torch.bool)
        apply_masks_(model, masks)

    def result_fields(
        self, model: nn.Module, config: PruneConfig, report: dict | None, so_far: dict
    ) -> dict:
        layers = (report or {}).get("sparsity", {})
        return {
            "pattern": config.pattern,
            "sparsity_target": config.target_sparsity,
            "sparsity": zero_fraction(model, layers),
        }


STEP = PruneStep()

__all__ = [
    "METHODS",
    "PruneConfig",
    "SPARSEGPT_FIELDS",
    "STEP",
    "activation_norms",
    "prune_",
    "zero_fraction",
]
