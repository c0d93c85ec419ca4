"""ResNet v1 (He et al. 2015) in torchvision's layout, CIFAR and ImageNet styles.

Module names follow torchvision's `resnet.py` (conv1/bn1/relu/maxpool/layerN/avgpool/fc and
`downsample` shortcuts), so an ImageNet-style state_dict has torchvision's keys. Bottlenecks put
the stride on the 3x3 convolution ("v1.5", as torchvision); this changes no parameter count.
`output_stride` replaces the stride of the last stage(s) by dilation exactly as torchvision's
`replace_stride_with_dilation` (a dilated stage's first block keeps the previous dilation); basic
blocks dilate both 3x3 convolutions (torchvision refuses dilation there). `spatial_dims=1` builds
the same network from Conv1d layers for signals [N, C, L].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layers import (
    adaptive_avg_pool,
    batch_norm,
    conv,
    conv1x1,
    conv3x3,
    init_weights,
    make_shortcut,
    max_pool,
)
from training.models.layouts import ResNetLayout, resnet_layout

_Net = TypeVar("_Net", bound=nn.Module)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        *,
        dilation: int = 1,
        dims: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride, dilation=dilation, dims=dims)
        self.bn1 = batch_norm(planes, dims=dims)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation, dims=dims)
        self.bn2 = batch_norm(planes, dims=dims)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)

    def last_bn(self) -> nn.Module:
        """The BN whose gamma `zero_init_residual` zeroes."""
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; BN after each, ReLU after the sum."""

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        *,
        dilation: int = 1,
        dims: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes, dims=dims)
        self.bn1 = batch_norm(planes, dims=dims)
        self.conv2 = conv3x3(planes, planes, stride, dilation=dilation, dims=dims)
        self.bn2 = batch_norm(planes, dims=dims)
        self.conv3 = conv1x1(planes, planes * self.expansion, dims=dims)
        self.bn3 = batch_norm(planes * self.expansion, dims=dims)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)

    def last_bn(self) -> nn.Module:
        """The BN whose gamma `zero_init_residual` zeroes."""
        return self.bn3


BLOCK_TYPES: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Stem, stages `layer1..layerK` (stride 2 from the second, or dilation instead), global
    average pool, dropout, fc."""

    def __init__(
        self,
        *,
        block: type[BasicBlock | Bottleneck],
        layout: ResNetLayout,
        style: str,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.0,
        dims: int = 2,
    ) -> None:
        super().__init__()
        width = layout.width
        self.in_planes = width
        self.dims = dims
        if style == "imagenet":
            self.conv1 = conv(in_channels, width, 7, dims=dims, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_channels, width, dims=dims)
        self.bn1 = batch_norm(width, dims=dims)
        self.relu = nn.ReLU(inplace=True)
        # CIFAR style has no max-pool; Identity keeps one forward for both styles.
        self.maxpool = max_pool(3, 2, dims=dims, padding=1) if style == "imagenet" else nn.Identity()
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(layout.stages)))
        previous_dilation = 1
        for i, name in enumerate(self.stage_names):
            dilations = (previous_dilation, layout.dilations[i])
            layer = self._make_layer(
                block, width * 2**i, layout.stages[i], layout.strides[i], dilations, layout.shortcut
            )
            self.add_module(name, layer)
            previous_dilation = layout.dilations[i]
        self.avgpool = adaptive_avg_pool(1, dims=dims)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.in_planes, num_classes)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        count: int,
        stride: int,
        dilations: tuple[int, int],
        shortcut: str,
    ) -> nn.Sequential:
        """One stage; `dilations` = (first block's, the others'), as torchvision."""
        blocks = []
        for i in range(count):
            s = stride if i == 0 else 1
            out_planes = planes * block.expansion
            downsample = make_shortcut(shortcut, self.in_planes, out_planes, s, norm=True, dims=self.dims)
            dilation = dilations[0] if i == 0 else dilations[1]
            blocks.append(block(self.in_planes, planes, s, downsample, dilation=dilation, dims=self.dims))
            self.in_planes = out_planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def build_residual_net(
    net: Callable[..., _Net],
    block_types: Mapping[str, type[nn.Module]],
    config: ModelConfig,
    residual_end: Callable[[nn.Module], nn.Parameter | None],
) -> _Net:
    """A v1 or v2 ResNet from a validated config: the layout, the net, He init, and with
    `zero_init_residual` the weight `residual_end(module)` names in each block zeroed (None for
    modules that are not blocks), so that every block starts as identity."""
    layout = resnet_layout(config)
    model = net(
        block=block_types[layout.block],
        layout=layout,
        style=config.style,
        in_channels=config.in_channels,
        num_classes=config.num_classes,
        dropout=config.dropout,
        dims=config.spatial_dims,
    )
    init_weights(model)
    if config.zero_init_residual:
        for m in model.modules():
            if (weight := residual_end(m)) is not None:
                nn.init.zeros_(weight)
    return model


def build(config: ModelConfig) -> ResNet:
    """Build a v1 ResNet from a validated config (registry entry point)."""

    def last_bn_weight(m: nn.Module) -> nn.Parameter | None:
        # Goyal et al. 2017: each residual branch ends in this BN; zero gamma, zero branch.
        return m.last_bn().weight if isinstance(m, BasicBlock | Bottleneck) else None

    return build_residual_net(ResNet, BLOCK_TYPES, config, last_bn_weight)
