"""A plain training loop: AdamW, warm-up + cosine, label smoothing, clipping, distillation.

The same loop fine-tunes compressed models: ``after_step`` callbacks run after every optimizer
step (re-zeroing pruned weights, advancing a gradual pruner), so masks hold through training.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitcompress.config import (
    build_config,
    check_choice,
    check_fraction,
    check_int,
    check_number,
    is_number,
)
from vitcompress.distill import DISTILL_KINDS, distillation_loss
from vitcompress.errors import VitcompressError

AfterStep = Callable[[int], None]
# Called after every epoch with (epochs done, model, optimizer, progress): where a run directory
# gets its checkpoint and resume state (workflows.train_run), so this loop writes no files.
OnEpochEnd = Callable[[int, nn.Module, torch.optim.Optimizer, dict], None]

# The settings of a fine-tune differ from those of a training from scratch only here; the
# recipe's ``finetune`` step builds its TrainConfig with :meth:`TrainConfig.for_finetune`.
FINETUNE_DEFAULTS: dict[str, Any] = {"epochs": 1, "lr": 1e-4, "warmup_epochs": 0.0}


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained or fine-tuned: the one place that holds these defaults.

    The CLI's ``train`` options, a study's model settings and a recipe's ``finetune`` step are
    all fields of this class. ``augment``, ``img_size``, ``patch_size`` and ``drop_path`` shape
    the data and the model that :func:`vitcompress.workflows.train_run` builds; the others drive
    :func:`train`.
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5  # the end of the cosine schedule
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (a fine-tuning budget)
    amp: str | None = None  # "bf16" (CPU or CUDA) or "fp16" (CUDA): autocast forward passes
    eval_every: int = 1  # evaluate on the test split every N epochs (and always at the end)
    seed: int = 0
    distill: str | None = None  # "soft" | "hard" | None
    distill_alpha: float = 0.5
    distill_tau: float = 3.0
    augment: bool | str = True  # True is "crop+flip"; see vitcompress.data.AUGMENT_MODES
    img_size: int | None = None  # None: the data's native size
    patch_size: int | None = None  # None: the preset's
    drop_path: float = 0.0  # stochastic depth rate (ViT)

    def __post_init__(self) -> None:
        from vitcompress.data import AUGMENT_MODES

        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_number(self.lr, "lr", positive=True)
        check_number(self.min_lr, "min_lr", 0)
        for k in ("weight_decay", "warmup_epochs", "drop_path", "distill_tau"):
            check_number(getattr(self, k), k, 0)
        check_number(self.clip_grad, "clip_grad", 0, optional=True)
        check_int(self.max_steps, "max_steps", 1, optional=True)
        check_int(self.eval_every, "eval_every", 1)
        check_int(self.seed, "seed")
        check_int(self.img_size, "img_size", 1, optional=True)
        check_int(self.patch_size, "patch_size", 1, optional=True)
        check_choice(self.amp, (None, "bf16", "fp16"), "amp")
        check_choice(self.distill, (None, *DISTILL_KINDS), "distill")
        check_fraction(self.distill_alpha, "distill_alpha", closed=True)
        check_fraction(self.label_smoothing, "label_smoothing")
        if self.drop_path >= 1:
            raise VitcompressError(f"drop_path must be < 1, got {self.drop_path!r}")
        if not isinstance(self.augment, bool) and self.augment not in AUGMENT_MODES:
            raise VitcompressError(
                f"augment must be true, false or one of {', '.join(AUGMENT_MODES)}, "
                f"got {self.augment!r}"
            )

    @classmethod
    def for_finetune(cls, **settings: Any) -> TrainConfig:
        """A fine-tuning config: :data:`FINETUNE_DEFAULTS` under ``settings``, and a schedule
        that ends at ``lr / 100`` unless ``min_lr`` is given."""
        d = {**FINETUNE_DEFAULTS, **settings}
        if "min_lr" not in d and is_number(d["lr"]):
            d["min_lr"] = d["lr"] / 100
        return cls(**d)

    @classmethod
    def from_dict(cls, d: Mapping, what: str = "train") -> TrainConfig:
        """From a mapping (a run's ``config.json`` "train" section, a study's settings); unknown
        keys are an error naming the valid ones."""
        return build_config(cls, d, what)

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise VitcompressError(f"device {device!r} asked for, but CUDA is not available here")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); without them
    bf16 autocast runs several times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr/100 to lr, then cosine decay to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (0.01 + 0.99 * step / warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and position embeddings (as timm does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("cls_token", "dist_token", "pos_embed")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _logits(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The prediction of a model output: DeiT's two heads averaged, as at inference."""
    if isinstance(out, tuple):
        return (out[0] + out[1]) / 2
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    desc: str = "eval",
    max_batches: int | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (top-k for k = min(5, classes)) and mean cross-entropy on a loader."""
    device = torch.device(device)
    model.eval()
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    for i, (x, y) in enumerate(tqdm(loader, desc=desc, leave=False, disable=None)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = _logits(model(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices  # (B, k)
        correct1 += (topk[:, 0] == y).sum().item()
        correct5 += (topk == y[:, None]).any(dim=-1).sum().item()
        n += y.numel()
    if n == 0:
        raise VitcompressError("evaluation data is empty")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "samples": n}


@dataclass(frozen=True)
class ResumeState:
    """Where an interrupted training stopped: what :func:`train` needs, with the model's weights
    of that epoch already loaded, to go on exactly as an unbroken run would."""

    epochs_done: int
    history: list
    wall_s: float
    optimizer: dict  # the optimizer's state_dict
    torch_rng: torch.Tensor


def train(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None,
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    resume: ResumeState | None = None,
    device: str | torch.device = "auto",
    after_step: list[AfterStep] | None = None,
    on_epoch_end: OnEpochEnd | None = None,
) -> dict:
    """Train ``model`` for ``cfg.epochs``; returns the final metrics and the per-epoch history.

    ``on_epoch_end`` is called after every epoch (where the caller saves a checkpoint);
    ``resume`` continues from such a checkpoint (optimizer and schedule position, RNG state).
    """
    device = pick_device(device) if isinstance(device, str) else device
    if cfg.distill and teacher is None:
        raise VitcompressError(f"distill={cfg.distill!r} needs a teacher checkpoint")
    seed_everything(cfg.seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise VitcompressError("training data is empty")
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    start_epoch, history, elapsed_before = 0, [], 0.0

    if resume is not None:
        start_epoch, history = resume.epochs_done, list(resume.history)
        elapsed_before = resume.wall_s
        opt.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.torch_rng)

    if cfg.amp == "fp16" and device.type != "cuda":
        raise VitcompressError("amp='fp16' needs CUDA; use amp='bf16' on the CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp or "")
    if amp_dtype is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        print(
            "vitcompress: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 autocast "
            "runs ~10x slower than fp32: training in fp32 instead",
            file=sys.stderr,
        )
        amp_dtype = None
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    step = start_epoch * steps_per_epoch
    t_start = time.perf_counter()
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a resumed run sees the same order as an unbroken one
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for x, y in bar:
            if step >= total:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            with autocast():
                out_ = model(x)
            out_ = tuple(o.float() for o in out_) if isinstance(out_, tuple) else out_.float()
            if cfg.distill:
                with torch.no_grad(), autocast():
                    t_logits = _logits(teacher(x)).float()
                loss = distillation_loss(
                    out_, y, t_logits, cfg.distill, cfg.distill_alpha, cfg.distill_tau,
                    cfg.label_smoothing,
                )  # fmt: skip
            elif isinstance(out_, tuple):
                # a DeiT trained without a teacher: both heads learn the labels
                loss = sum(F.cross_entropy(o, y, label_smoothing=cfg.label_smoothing) for o in out_)
                loss = loss / len(out_)
            else:
                loss = F.cross_entropy(out_, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise VitcompressError(f"loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            step += 1
            for cb in after_step or []:
                cb(step)
            with torch.no_grad():
                correct += (_logits(out_).argmax(-1) == y).sum().item()
            seen += y.numel()
            loss_sum += loss.item() * y.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                 "train_acc": correct / max(seen, 1)}  # fmt: skip
        last = epoch + 1 == cfg.epochs or step >= total
        if test_loader is not None and (last or (epoch + 1) % cfg.eval_every == 0):
            ev = evaluate(model, test_loader, device)
            entry.update({"test_top1": ev["top1"], "test_loss": ev["loss"]})
            if last:
                metrics.update({k: ev[k] for k in ("top1", "top5", "loss", "samples")})
        entry["wall_s"] = elapsed_before + time.perf_counter() - t_start
        history.append(entry)
        tqdm.write(  # stderr: stdout stays clean for --json output
            "epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}".format(**entry)
            + (f", test top-1 {entry['test_top1']:.4f}" if "test_top1" in entry else "")
            + f" ({entry['wall_s']:.0f} s)",
            file=sys.stderr,
        )
        sys.stderr.flush()  # epoch lines reach a log file as they happen
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, opt, {"history": history, "wall_s": entry["wall_s"]})
        if last:
            break
    metrics.update(
        {
            "history": history,
            "epochs_done": cfg.epochs,
            "train_wall_s": history[-1]["wall_s"] if history else elapsed_before,
        }
    )
    return metrics
