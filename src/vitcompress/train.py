"""A plain training loop: AdamW, warm-up + cosine, label smoothing, clipping, distillation.

The same loop fine-tunes compressed models: ``after_step`` callbacks run after every optimizer
step (re-zeroing pruned weights, advancing a gradual pruner), so masks hold through training.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitcompress.distill import DISTILL_KINDS, distillation_loss
from vitcompress.errors import VitcompressError
from vitcompress.models.checkpoints import (
    METRICS,
    TRAIN_STATE,
    atomic_write_bytes,
    save_run,
)

AfterStep = Callable[[int], None]


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    distill: str | None = None  # "soft" | "hard" | None
    distill_alpha: float = 0.5
    distill_tau: float = 3.0
    seed: int = 0
    eval_every: int = 1  # evaluate on the test split every N epochs (and always at the end)
    max_steps: int | None = None  # stop after this many optimizer steps (a fine-tuning budget)
    amp: str | None = None  # "bf16" (CPU or CUDA) or "fp16" (CUDA): autocast forward passes

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise VitcompressError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise VitcompressError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise VitcompressError(f"lr must be > 0, got {self.lr}")
        if self.distill is not None and self.distill not in DISTILL_KINDS:
            raise VitcompressError(
                f"distill must be one of {', '.join(DISTILL_KINDS)}, got {self.distill!r}"
            )
        if not 0 <= self.distill_alpha <= 1:
            raise VitcompressError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.amp not in (None, "bf16", "fp16"):
            raise VitcompressError(f"amp must be 'bf16' or 'fp16', got {self.amp!r}")
        if not 0 <= self.label_smoothing < 1:
            raise VitcompressError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

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
    """Whether oneDNN has native bf16 kernels on this CPU (measured here: an AMD EPYC with AVX2
    only ran a bf16 ResNet training step in 1,970 ms against 200 ms in fp32)."""
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


def train(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None,
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    run_config: dict | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    after_step: list[AfterStep] | None = None,
) -> dict:
    """Train ``model`` for ``cfg.epochs``; write a checkpoint to ``out`` after every epoch.

    With ``resume``, continue from the last epoch saved in ``out`` (weights, optimizer and
    scheduler position, RNG state). Returns the final metrics (also in ``out/metrics.json``).
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

    if resume:
        start_epoch, history, elapsed_before = _load_train_state(out, model, opt)
        model.to(device)

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
                metrics.update({k: ev[k] for k in ("top1", "top5", "loss")})
        entry["wall_s"] = elapsed_before + time.perf_counter() - t_start
        history.append(entry)
        tqdm.write(  # stderr: stdout stays clean for --json output
            "epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}".format(**entry)
            + (f", test top-1 {entry['test_top1']:.4f}" if "test_top1" in entry else "")
            + f" ({entry['wall_s']:.0f} s)",
            file=sys.stderr,
        )
        sys.stderr.flush()  # epoch lines reach a log file as they happen
        if out is not None:
            partial = {"history": history, "epochs_done": epoch + 1, "wall_s": entry["wall_s"]}
            save_run(out, model, run_config or {}, None)
            _save_train_state(out, opt, epoch + 1, partial)
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


def _save_train_state(out: Path, opt: torch.optim.Optimizer, epochs_done: int, partial: dict):
    """Optimizer and RNG state for --resume, in a file torch.load reads with weights_only."""
    import io
    import json

    state = {
        "optimizer": opt.state_dict(),
        "epochs_done": epochs_done,
        "torch_rng": torch.get_rng_state(),
        "progress": json.dumps(partial),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(out) / TRAIN_STATE, buf.getvalue())


def _load_train_state(
    out: Path | None, model: nn.Module, opt: torch.optim.Optimizer
) -> tuple[int, list, float]:
    import json

    from vitcompress.models.checkpoints import WEIGHTS, load_state_checked, read_weights

    if out is None:
        raise VitcompressError("--resume needs --out pointing at the interrupted run")
    path = Path(out) / TRAIN_STATE
    if not path.is_file():
        if (Path(out) / METRICS).is_file():
            raise VitcompressError(f"{out} is a finished run (no {TRAIN_STATE}); nothing to resume")
        raise VitcompressError(f"cannot resume: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise VitcompressError(f"corrupt training state {path}: {type(e).__name__}") from None
    load_state_checked(model, read_weights(Path(out) / WEIGHTS), str(Path(out) / WEIGHTS))
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    progress = json.loads(state["progress"])
    return int(state["epochs_done"]), progress["history"], float(progress["wall_s"])
