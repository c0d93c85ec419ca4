"""ResNet v1 (He et al. 2015) in torchvision's layout, CIFAR and ImageNet styles.

Module names follow torchvision's `resnet.py` (conv1/bn1/relu/maxpool/layerN/avgpool/fc and
`downsample` shortcuts), so an ImageNet-style state_dict has torchvision's keys. Bottlenecks put
the stride on the 3x3 convolution ("v1.5", as torchvision); this changes no parameter count.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layers import conv1x1, conv3x3, init_weights, make_shortcut
from training.models.layouts import resnet_layout


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN whose gamma `zero_init_residual` zeroes."""
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; BN after each, ReLU after the sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN whose gamma `zero_init_residual` zeroes."""
        return self.bn3


BLOCK_TYPES: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Stem, stages `layer1..layerK` (stride 2 from the second), global average pool, dropout, fc."""

    def __init__(
        self,
        *,
        block: type[BasicBlock | Bottleneck],
        stages: tuple[int, ...],
        width: int,
        shortcut: str,
        style: str,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_planes = width
        if style == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # CIFAR style has no max-pool; Identity keeps one forward for both styles.
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if style == "imagenet" else nn.Identity()
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(stages)))
        for i, (name, count) in enumerate(zip(self.stage_names, stages, strict=True)):
            layer = self._make_layer(block, width * 2**i, count, 1 if i == 0 else 2, shortcut)
            self.add_module(name, layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.in_planes, num_classes)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, count: int, stride: int, shortcut: str
    ) -> nn.Sequential:
        blocks = []
        for i in range(count):
            s = stride if i == 0 else 1
            out_planes = planes * block.expansion
            downsample = make_shortcut(shortcut, self.in_planes, out_planes, s, norm=True)
            blocks.append(block(self.in_planes, planes, s, downsample))
            self.in_planes = out_planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def build(config: ModelConfig) -> ResNet:
    """Build a v1 ResNet from a validated config (registry entry point)."""
    layout = resnet_layout(config)
    model = ResNet(
        block=BLOCK_TYPES[layout.block],
        stages=layout.stages,
        width=layout.width,
        shortcut=layout.shortcut,
        style=config.style,
        in_channels=config.in_channels,
        num_classes=config.num_classes,
        dropout=config.dropout,
    )
    init_weights(model)
    if config.zero_init_residual:
        # Goyal et al. 2017: each residual branch starts as zero, so each block starts as identity.
        for m in model.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                nn.init.zeros_(m.last_bn().weight)
    return model
