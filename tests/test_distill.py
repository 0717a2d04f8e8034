import math

import pytest
import torch

from vitcompress.distill import distillation_loss, hard_distill_loss, soft_distill_loss


def _log_softmax(v):
    m = max(v)
    s = sum(math.exp(x - m) for x in v)
    return [x - m - math.log(s) for x in v]


def test_soft_loss_against_hand_computed_kl():
    s = [2.0, 0.5, -1.0]
    t = [1.0, 1.5, 0.0]
    tau = 2.0
    ls = _log_softmax([x / tau for x in s])
    lt = _log_softmax([x / tau for x in t])
    kl = sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
    got = soft_distill_loss(torch.tensor([s]), torch.tensor([t]), tau)
    assert got.item() == pytest.approx(kl * tau * tau, rel=1e-6)


def test_soft_loss_is_zero_for_identical_logits():
    x = torch.randn(4, 10)
    assert soft_distill_loss(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_loss_is_cross_entropy_against_teacher_argmax():
    s = [0.3, 1.2, -0.4]
    t = [5.0, 0.0, 1.0]  # teacher says class 0
    expected = -_log_softmax(s)[0]
    assert hard_distill_loss(torch.tensor([s]), torch.tensor([t])).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_deit_heads_get_labels_and_teacher_separately():
    cls_logits = torch.tensor([[1.0, 0.0, 0.0]])
    dist_logits = torch.tensor([[0.0, 2.0, 0.0]])
    labels = torch.tensor([2])
    teacher = torch.tensor([[0.0, 0.0, 9.0]])  # teacher agrees with the label
    got = distillation_loss((cls_logits, dist_logits), labels, teacher, "hard", alpha=0.5)
    ce_cls = -_log_softmax([1.0, 0.0, 0.0])[2]
    ce_dist = -_log_softmax([0.0, 2.0, 0.0])[2]
    assert got.item() == pytest.approx(0.5 * ce_cls + 0.5 * ce_dist, rel=1e-6)
