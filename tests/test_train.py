import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitcompress.data.sampler import EpochShuffleSampler
from vitcompress.errors import VitcompressError
from vitcompress.models import build_model, create_model
from vitcompress.runs import TRAIN_STATE, load_train_state, save_run, save_train_state
from vitcompress.train import TrainConfig, evaluate, lr_at, train


def _toy_data(n=256, seed=0):
    """Four classes of 16x16 textures (stripes both ways, checkers, flat) under noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    i = torch.arange(16)
    textures = torch.stack(
        [
            (i[:, None] % 2).expand(16, 16),
            (i[None, :] % 2).expand(16, 16),
            (i[:, None] + i[None, :]) % 2,
            torch.ones(16, 16),
        ]
    ).float()
    x = textures[y][:, None] + 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    return TensorDataset(x, y)


def _loader(ds, shuffle=True):
    sampler = EpochShuffleSampler(len(ds), seed=0) if shuffle else None
    return DataLoader(ds, batch_size=32, sampler=sampler)


def test_lr_schedule_warms_up_then_follows_cosine():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.01)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_training_reduces_loss_and_learns(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg)
    data = _toy_data()
    before = evaluate(model, _loader(data, False))
    cfg = TrainConfig(epochs=4, lr=3e-3, warmup_epochs=0.5, label_smoothing=0.0)
    metrics = train(model, _loader(data), _loader(data, False), cfg, device="cpu")
    after = evaluate(model, _loader(data, False))
    assert after["loss"] < before["loss"] * 0.7
    assert after["top1"] > 0.8
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]


def test_bf16_autocast_training_learns_and_keeps_fp32_weights(tiny_vit_cfg, monkeypatch):
    import vitcompress.train as train_mod

    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: True)  # slow without, but correct
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg)
    data = _toy_data()
    before = evaluate(model, _loader(data, False))
    cfg = TrainConfig(epochs=4, lr=3e-3, warmup_epochs=0.5, label_smoothing=0.0, amp="bf16")
    train(model, _loader(data), None, cfg, device="cpu")
    after = evaluate(model, _loader(data, False))
    assert after["loss"] < before["loss"] * 0.7
    assert after["top1"] > 0.8
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(VitcompressError, match="fp16' needs CUDA"):
        train(model, _loader(data), None, TrainConfig(epochs=1, amp="fp16"), device="cpu")
    with pytest.raises(VitcompressError, match="amp"):
        TrainConfig(amp="int8")


def test_bf16_falls_back_to_fp32_on_a_cpu_without_bf16(tiny_vit_cfg, monkeypatch, capsys):
    import vitcompress.train as train_mod

    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: False)
    weights = []
    for amp in ("bf16", None):
        torch.manual_seed(0)
        model = build_model(tiny_vit_cfg)
        train(model, _loader(_toy_data()), None, TrainConfig(epochs=1, amp=amp), device="cpu")
        weights.append(model.state_dict())
    assert "no native bf16" in capsys.readouterr().err
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_one_step_reduces_loss_on_the_batch(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg)
    x, y = next(iter(_loader(_toy_data())))
    loss0 = torch.nn.functional.cross_entropy(model(x), y).item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.nn.functional.cross_entropy(model(x), y).item() < loss0


class _PermutingTeacher(torch.nn.Module):
    """Labels each image with the class after its own (c -> c + 1 mod 4), by nearest class mean:
    labels that the data alone could never teach."""

    def __init__(self, data):
        super().__init__()
        x, y = data.tensors
        self.register_buffer("means", torch.stack([x[y == c].mean(0) for c in range(4)]))

    def forward(self, x):
        logits = -((x[:, None] - self.means[None]) ** 2).flatten(2).sum(-1)  # (B, 4)
        return logits.roll(1, dims=-1)


def test_distilled_deit_trains_with_a_teacher():
    torch.manual_seed(0)
    student = create_model("deit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4)
    start = copy.deepcopy(student.state_dict())
    data = _toy_data(128)
    teacher = _PermutingTeacher(data)
    # hard distillation only (alpha 1): the distillation head learns the teacher's labels
    cfg = TrainConfig(epochs=3, lr=3e-3, distill="hard", distill_alpha=1.0, label_smoothing=0.0)
    m = train(student, _loader(data), _loader(data, False), cfg, teacher=teacher, device="cpu")
    assert m["top1"] == evaluate(student, _loader(data, False))["top1"]  # the final model's
    x, y = data.tensors
    with torch.no_grad():
        t_labels = teacher(x).argmax(-1)
        student.train()  # (logits_cls, logits_dist)
        dist = student(x)[1].argmax(-1)
    assert (t_labels == (y + 1) % 4).float().mean() > 0.9  # the teacher does what it says
    assert (dist == t_labels).float().mean() > 0.9
    student.load_state_dict(start)
    with pytest.raises(VitcompressError, match="needs a teacher"):
        train(student, _loader(data), None, cfg, device="cpu")


def test_resume_continues_to_the_same_weights(tmp_path, tiny_vit_cfg):
    data = _toy_data(128)
    cfg = TrainConfig(epochs=2, lr=2e-3)
    run_config = {"model": tiny_vit_cfg}

    torch.manual_seed(0)
    straight = build_model(tiny_vit_cfg)
    train(straight, _loader(data), None, cfg, device="cpu")

    # the same run, stopped after one epoch and resumed from its checkpoint
    torch.manual_seed(0)
    first = build_model(tiny_vit_cfg)
    # interrupt the two-epoch run right after its first epoch's checkpoint
    steps_per_epoch = len(_loader(data))

    class Stop(Exception):
        pass

    def stop_after_first_epoch(step):
        if step == steps_per_epoch + 1:
            raise Stop

    def checkpoint(epochs_done, model, opt, progress):  # what workflows.train_run does
        save_run(tmp_path, model, run_config, None)
        save_train_state(tmp_path, opt, epochs_done, progress)

    with pytest.raises(Stop):
        train(
            first,
            _loader(data),
            None,
            cfg,
            device="cpu",
            after_step=[stop_after_first_epoch],
            on_epoch_end=checkpoint,
        )
    assert (tmp_path / TRAIN_STATE).is_file()
    resumed = build_model(tiny_vit_cfg)
    state = load_train_state(tmp_path, resumed)
    assert state.epochs_done == 1
    train(resumed, _loader(data), None, cfg, resume=state, device="cpu")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k, atol=1e-6, rtol=1e-5)


def test_bad_train_config():
    with pytest.raises(VitcompressError, match="distill"):
        TrainConfig(distill="medium")
    with pytest.raises(VitcompressError, match="lr"):
        TrainConfig(lr=0)
