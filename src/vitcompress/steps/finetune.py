"""The ``finetune`` step: train the compressed model a little, optionally distilled from a teacher,
with every pruning mask held after each optimizer step; a cubic ``prune`` just before it prunes
gradually during this training.

Its options are those of :class:`~vitcompress.train.TrainConfig` (with the fine-tuning defaults
of :data:`~vitcompress.train.FINETUNE_DEFAULTS`), plus ``distill: {teacher, kind, alpha, tau}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from vitcompress.config import build_config, check_fraction, check_number
from vitcompress.errors import VitcompressError
from vitcompress.sparsity import GradualPruner, enforce_masks_
from vitcompress.steps.registry import Step, StepContext
from vitcompress.train import FINETUNE_DEFAULTS, TrainConfig, train
from vitcompress.zoo import run_path

# The TrainConfig fields a recipe may set; the rest (seed, data, model shape) come from the run.
# The first seven are always written out, so a recipe's hash stays what it was before the
# fine-tune shared the training config.
FINETUNE_KEYS = (
    "epochs", "lr", "batch_size", "weight_decay", "warmup_epochs", "label_smoothing",
    "max_steps", "min_lr", "clip_grad", "amp",
)  # fmt: skip
_ALWAYS = FINETUNE_KEYS[:7]


@dataclass(frozen=True)
class DistillSpec:
    """Where a fine-tuning step takes its teacher: a run directory, or ``self`` (the model as it
    was before the recipe: the compressed model learns from its dense self)."""

    teacher: str = "self"
    kind: str = "soft"
    alpha: float = 0.5
    tau: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in ("soft", "hard"):
            raise VitcompressError(f"finetune.distill.kind must be soft or hard, not {self.kind!r}")
        check_fraction(self.alpha, "finetune.distill.alpha", closed=True)
        check_number(self.tau, "finetune.distill.tau", positive=True)
        if not isinstance(self.teacher, str):
            raise VitcompressError(f"finetune.distill.teacher must be a string: {self.teacher!r}")
        if self.teacher != "self" and not (run_path(self.teacher) / "config.json").is_file():
            raise VitcompressError(
                f"finetune.distill.teacher: {self.teacher} is not a run directory (no config.json)"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tune: its training settings and, optionally, its teacher."""

    train: TrainConfig = TrainConfig.for_finetune()
    distill: DistillSpec | None = None

    @property
    def epochs(self) -> int:
        return self.train.epochs

    @property
    def batch_size(self) -> int:
        return self.train.batch_size


class FinetuneStep(Step):
    kind = "finetune"
    config_cls = FinetuneConfig

    def parse(self, options: Any, what: str) -> FinetuneConfig:
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise VitcompressError(f"{what}: expected a mapping of options, got {options!r}")
        options = dict(options)
        distill = options.pop("distill", None)
        unknown = [k for k in options if k not in FINETUNE_KEYS]
        if unknown:
            raise VitcompressError(
                f"{what}: unknown key {unknown[0]!r}; valid keys: {', '.join(FINETUNE_KEYS)}, "
                "distill"
            )
        try:
            train_cfg = TrainConfig.for_finetune(**options)
        except VitcompressError as e:
            raise VitcompressError(f"{what}: finetune.{e}") from None
        spec = None if distill is None else build_config(DistillSpec, distill, f"{what}: distill")
        return FinetuneConfig(train_cfg, spec)

    def to_dict(self, config: FinetuneConfig) -> dict:
        t = config.train
        base = TrainConfig.for_finetune(lr=t.lr)  # what each extra key is when left out
        d = {k: getattr(t, k) for k in _ALWAYS}
        d.update({k: getattr(t, k) for k in FINETUNE_KEYS[7:] if getattr(t, k) != getattr(base, k)})
        d["distill"] = None if config.distill is None else asdict(config.distill)
        return d

    def needs_training(self, config: FinetuneConfig) -> bool:
        return True

    def apply(self, model: nn.Module, config: FinetuneConfig, ctx: StepContext, index: int) -> dict:
        if ctx.train_loader is None:
            raise VitcompressError("finetune needs training data")
        teacher = None
        spec = config.distill
        if spec is not None:
            teacher = ctx.teacher_for(spec.teacher) if ctx.teacher_for else None
            if teacher is None:
                raise VitcompressError(f"no teacher available for {spec.teacher!r}")
        total = config.train.epochs * len(ctx.train_loader)
        if config.train.max_steps is not None:
            total = min(total, config.train.max_steps)
        deferred = ctx.deferred.pop("prune", None)
        pruner = None
        if deferred is not None:  # a cubic prune: its schedule runs over this training
            prune_index, prune_cfg = deferred
            pruner = GradualPruner(model, prune_cfg.over(total))
            pruner.step(0)
            callbacks = [pruner.step]
        else:
            callbacks = [lambda step: enforce_masks_(model)]
        tcfg = replace(
            config.train,
            seed=ctx.seed,
            distill=spec.kind if spec else None,
            distill_alpha=spec.alpha if spec else TrainConfig.distill_alpha,
            distill_tau=spec.tau if spec else TrainConfig.distill_tau,
        )
        metrics = train(
            model, ctx.train_loader, None, tcfg, teacher=teacher, device=ctx.device,
            after_step=callbacks,
        )  # fmt: skip
        if pruner is not None:
            pruner.step(10**12)  # the final sparsity is reached, whatever the length
            pruner.apply()
            ctx.reports[prune_index] = {"sparsity": pruner.report()}
        metrics.pop("history", None)
        return metrics


STEP = FinetuneStep()

__all__ = ["FINETUNE_DEFAULTS", "FINETUNE_KEYS", "STEP", "DistillSpec", "FinetuneConfig"]
