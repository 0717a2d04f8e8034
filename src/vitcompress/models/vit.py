"""Vision Transformer and DeiT (distillation token), in the timm layout.

Submodule names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1/fc2``, ``norm``, ``head``,
and for DeiT ``dist_token``, ``head_dist``) so that timm checkpoints load by name and layer
patterns in recipes mean the same thing on every ViT.

The defaults are timm's maths (LayerNorm eps 1e-6, exact GELU, qkv with bias, MLP width
``embed_dim * mlp_ratio``). The fields ``qkv_bias``, ``layer_norm_eps``, ``act``, ``mlp_hidden``
and ``dist_head`` exist so that foreign models whose maths differ (Hugging Face ViT uses
LayerNorm eps 1e-12; some checkpoints use a tanh GELU, no qkv bias, an MLP width that is no
round multiple, or a DeiT fine-tuned without its teacher) are imported exactly rather than
approximately; see :mod:`vitcompress.models.hf` and :mod:`vitcompress.models.timm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.config import check_known_fields
from vitcompress.errors import VitcompressError


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the sigmoid approximation of GELU that OpenAI's CLIP uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP's hidden activations. "gelu" is the exact (erf) GELU of the ViT and DeiT papers and of
# timm; "gelu_tanh" its tanh approximation (Hugging Face's gelu_new / gelu_pytorch_tanh);
# "quick_gelu" is OpenAI CLIP's.
_ACTS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}
ACTIVATIONS: tuple[str, ...] = tuple(_ACTS)


def make_act(name: str) -> nn.Module:
    """The module of activation ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in _ACTS:
        raise VitcompressError(f"act {name!r} is not supported; use one of {ACTIVATIONS}")
    return _ACTS[name]()


# Far above any ViT in use (ViT-22B: width 6144, depth 48, 48 heads), far below what a careless
# or hostile config.json could ask for.
SIZE_LIMITS = {
    "img_size": 8192, "patch_size": 1024, "in_chans": 64, "num_classes": 100_000,
    "embed_dim": 16384, "depth": 256, "num_heads": 1024,
}  # fmt: skip


@dataclass(frozen=True)
class ViTConfig:
    """The numbers of a ViT (plain data: a run's config.json stores them as they are).

    Attributes:
        mlp_ratio: MLP width is ``int(embed_dim * mlp_ratio)``, unless ``mlp_hidden`` is set.
        distilled: DeiT: a distillation token, and (with ``dist_head``) a second head on it.
        qkv_bias: the fused qkv projection has a bias (timm's and HF's default).
        layer_norm_eps: eps of every LayerNorm; timm uses 1e-6, Hugging Face ViT/DeiT 1e-12.
        act: the MLP's hidden activation, one of :data:`ACTIVATIONS`.
        mlp_hidden: the MLP width itself, for widths that no float ``mlp_ratio`` reproduces
            through ``int(embed_dim * mlp_ratio)``; ``None`` means use ``mlp_ratio``.
        dist_head: for a distilled model, whether the distillation token has its own head.
            ``False`` is a DeiT fine-tuned without a teacher (Hugging Face's
            ``DeiTForImageClassification``): the token still takes part in attention, but the
            logits come from the class token alone, in training and in eval.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    distilled: bool = False  # DeiT: a distillation token and a second head
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    act: str = "gelu"
    mlp_hidden: int | None = None
    dist_head: bool = True

    def __post_init__(self) -> None:
        # A config.json describes the model before its weights are read: sizes far past any ViT
        # are refused here, so that a few bytes of JSON cannot ask for gigabytes.
        for k, most in SIZE_LIMITS.items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise VitcompressError(f"{k} must be an integer in [1, {most:,}], got {v!r}")
        r = self.mlp_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 64:
            raise VitcompressError(f"mlp_ratio must be a number in (0, 64], got {r!r}")
        for k in ("distilled", "qkv_bias", "dist_head"):
            if not isinstance(getattr(self, k), bool):
                raise VitcompressError(f"{k} must be true or false, got {getattr(self, k)!r}")
        if self.act not in ACTIVATIONS:
            raise VitcompressError(f"act {self.act!r} is not supported; use one of {ACTIVATIONS}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise VitcompressError(f"layer_norm_eps must be a number in (0, 1), got {eps!r}")
        if self.mlp_hidden is not None and (
            isinstance(self.mlp_hidden, bool)
            or not isinstance(self.mlp_hidden, int)
            or not 1 <= self.mlp_hidden <= 4 * SIZE_LIMITS["embed_dim"]
        ):
            raise VitcompressError(
                f"mlp_hidden must be an integer in [1, {4 * SIZE_LIMITS['embed_dim']:,}] or "
                f"null, got {self.mlp_hidden!r}"
            )
        if not self.dist_head and not self.distilled:
            raise VitcompressError(
                "dist_head=False only applies to a distilled model (distilled=True)"
            )
        if self.img_size % self.patch_size:
            raise VitcompressError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise VitcompressError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def mlp_width(self) -> int:
        """The MLP hidden width: ``mlp_hidden``, or ``int(embed_dim * mlp_ratio)``."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


class MatMul(nn.Module):
    """``a @ b`` as a module, so that quantizers can find and wrap the attention dot products."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_matmul = MatMul()  # Q.K^T
        self.av_matmul = MatMul()  # A.V
        # The fused kernel is fast, but hides the two dot products; quantizers that need to see
        # them set this to False.
        self.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))  # (B, H, N, N)
            attn = attn.softmax(dim=-1)
            x = self.av_matmul(attn, v)  # (B, H, N, D)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # < C once shrunk
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, cfg.mlp_width, cfg.act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al.) and, with ``distilled=True``, DeiT (Touvron et al.).

    A distilled model returns ``(logits_cls, logits_dist)`` while training and their mean in
    eval mode, as DeiT does at inference. With ``dist_head=False`` it has no ``head_dist`` and
    returns the class head's logits alone, as a plain ViT does.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.distilled = cfg.distilled
        self.num_prefix_tokens = 2 if cfg.distilled else 1
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n + self.num_prefix_tokens, dim))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, dpr[i]) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(dim, cfg.num_classes)
        has_dist_head = cfg.distilled and cfg.dist_head
        self.head_dist = nn.Linear(dim, cfg.num_classes) if has_dist_head else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, C)
        B = x.shape[0]
        tokens = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(tokens + [x], dim=1) + self.pos_embed  # (B, P+N, C)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(x[:, 0])  # (B, K)
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])  # (B, K)
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


# Presets only set numbers. The -tiny/-small/-base widths are those of the studies; the small
# ones are sized to train on 28x28 / 32x32 images on two CPU cores in minutes.
VIT_PRESETS: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    # sized for 28x28 Fashion-MNIST / 32x32 CIFAR-10 with patch 4 on a laptop CPU
    "micro": dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, patch_size=4, img_size=28),
    "nano": dict(embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, patch_size=4, img_size=28),
}


def vit_config(name: str, **overrides) -> ViTConfig:
    """The config of preset ``vit-<size>`` or ``deit-<size>``, with numbers overridden."""
    family, _, size = name.partition("-")
    if family not in ("vit", "deit") or size not in VIT_PRESETS:
        raise VitcompressError(f"unknown ViT preset {name!r}")
    args = dict(VIT_PRESETS[size])
    args["distilled"] = family == "deit"
    check_known_fields(ViTConfig, overrides, "ViT")
    args.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig(**args)
