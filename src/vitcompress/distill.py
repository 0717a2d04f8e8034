"""Distillation losses: soft (KL with temperature, Hinton et al.) and hard (teacher argmax, DeiT).

A DeiT student gives two logits: the class head learns from the labels, the distillation head
from the teacher. A plain student (one head) mixes both terms on its only head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_KINDS = ("soft", "hard")


def soft_distill_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), averaged over the batch.

    The tau^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    log_p_student = F.log_softmax(student / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * tau * tau


def hard_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax (DeiT's hard distillation)."""
    return F.cross_entropy(student, teacher.argmax(dim=-1))


def distillation_loss(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    alpha: float = 0.5,
    tau: float = 3.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(1 - alpha) * CE(labels) + alpha * distillation term.

    ``outputs`` is either one logits tensor or DeiT's ``(cls_logits, dist_logits)``: then the
    label term uses the class head and the distillation term the distillation head.
    """
    if isinstance(outputs, tuple):
        cls_logits, dist_logits = outputs
    else:
        cls_logits = dist_logits = outputs
    base = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    if kind == "soft":
        dist = soft_distill_loss(dist_logits, teacher_logits, tau)
    elif kind == "hard":
        dist = hard_distill_loss(dist_logits, teacher_logits)
    else:
        raise ValueError(f"distillation kind must be one of {DISTILL_KINDS}, not {kind!r}")
    return (1 - alpha) * base + alpha * dist
