"""The ``noise`` step: add seeded Gaussian noise to the selected Linear weights.

A robustness probe (how much does top-1 move when a layer's weights are perturbed by ``std``
times their own standard deviation?) and the smallest example of a step: a config, an
``apply``, and one line in :data:`~vitcompress.steps.registry.STEP_MODULES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitcompress.config import as_patterns, check_int, check_number
from vitcompress.steps.registry import Step, StepContext
from vitcompress.targets import Patterns, select_modules


@dataclass(frozen=True)
class NoiseConfig:
    """``std``: noise standard deviation relative to each weight tensor's own; ``seed``: the
    noise's seed (the same noise on every run); ``targets`` / ``ignore``: layer patterns."""

    std: float = 0.01
    seed: int = 0
    targets: Patterns = "blocks.*"
    ignore: Patterns = None

    def __post_init__(self) -> None:
        check_number(self.std, "noise.std", 0)
        check_int(self.seed, "noise.seed")
        for key in ("targets", "ignore"):
            object.__setattr__(self, key, as_patterns(getattr(self, key), f"noise.{key}"))


def add_noise_(model: nn.Module, config: NoiseConfig) -> None:
    """Add ``N(0, (std * weight.std())^2)`` to every selected Linear weight, in place."""
    gen = torch.Generator().manual_seed(config.seed)
    for _, m in select_modules(model, config.targets, config.ignore, (nn.Linear,), "noise"):
        w = m.weight.detach()
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)  # (out, in)
        with torch.no_grad():
            m.weight.add_((noise * config.std * w.double().std()).to(w))


class NoiseStep(Step):
    kind = "noise"
    config_cls = NoiseConfig

    def check_layers(self, shadow: nn.Module, config: NoiseConfig, what: str) -> None:
        select_modules(shadow, config.targets, config.ignore, (nn.Linear,), what)

    def apply(self, model: nn.Module, config: NoiseConfig, ctx: StepContext, index: int) -> dict:
        add_noise_(model, config)
        return {"std": config.std}


STEP = NoiseStep()
