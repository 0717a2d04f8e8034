"""ResNet teacher for DeiT distillation (He et al.), BasicBlock and Bottleneck variants.

Layer names follow torchvision/timm (``conv1``, ``bn1``, ``layerN.M.conv1``, ``fc``). For small
images (<= 64 px) the stem is a 3x3 stride-1 convolution without max-pool, as is usual for
CIFAR-sized inputs; a 7x7 stride-2 stem with max-pool otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitcompress.config import check_known_fields
from vitcompress.errors import VitcompressError


@dataclass(frozen=True)
class ResNetConfig:
    block: str = "basic"  # "basic" or "bottleneck"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.block not in ("basic", "bottleneck"):
            raise VitcompressError(
                f"ResNet block must be 'basic' or 'bottleneck', not {self.block!r}"
            )
        if len(self.layers) != len(self.widths) or not 1 <= len(self.layers) <= 8:
            raise VitcompressError("ResNet layers and widths must have the same length, 1 to 8")
        checks = [("img_size", self.img_size, 8192), ("in_chans", self.in_chans, 64),
                  ("num_classes", self.num_classes, 100_000)]  # fmt: skip
        checks += [("layers", n, 64) for n in self.layers]
        checks += [("widths", w, 8192) for w in self.widths]
        for k, v, most in checks:  # a config.json must not ask for gigabytes (ViTConfig too)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise VitcompressError(f"ResNet {k} must be integers in [1, {most:,}], got {v!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"], d["widths"] = list(self.layers), list(self.widths)
        return d


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(x + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes)
    )


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        w0 = cfg.widths[0]
        small = cfg.img_size <= 64
        if small:
            self.conv1 = nn.Conv2d(cfg.in_chans, w0, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(cfg.in_chans, w0, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        inplanes = w0
        for i, (n, w) in enumerate(zip(cfg.layers, cfg.widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(block(inplanes, w, stride))
                inplanes = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(cfg.layers)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # zero-init the last BN of each block: every block starts as identity (Goyal et al.)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.global_pool(x).flatten(1)  # (B, C)
        return self.fc(x)


RESNET_PRESETS: dict[str, dict] = {
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3), widths=(64, 128, 256, 512)),
    # a narrow ResNet-20-style teacher that trains on 28x28 images on two CPU cores in minutes
    "resnet-micro": dict(block="basic", layers=(3, 3, 3), widths=(16, 32, 64)),
}


def resnet_config(name: str, **overrides) -> ResNetConfig:
    if name not in RESNET_PRESETS:
        raise VitcompressError(f"unknown ResNet preset {name!r}")
    args = dict(RESNET_PRESETS[name])
    check_known_fields(ResNetConfig, overrides, "ResNet")
    args.update({k: v for k, v in overrides.items() if v is not None})
    if "layers" in args:
        args["layers"] = tuple(args["layers"])
    if "widths" in args:
        args["widths"] = tuple(args["widths"])
    return ResNetConfig(**args)
