"""ResNet v1 (He et al. 2015) in torchvision's layout, CIFAR and ImageNet styles.

Module names follow torchvision's `resnet.py` (conv1/bn1/relu/maxpool/layerN/avgpool/fc and
`downsample` shortcuts), so an ImageNet-style state_dict has torchvision's keys. Bottlenecks put
the stride on the 3x3 convolution ("v1.5", as torchvision); this changes no parameter count.
`output_stride` replaces the stride of the last stage(s) by dilation exactly as torchvision's
`replace_stride_with_dilation` (a dilated stage's first block keeps the previous dilation); basic
blocks dilate both 3x3 convolutions (torchvision refuses dilation there). `spatial_dims=1` builds
the same network from Conv1d layers for signals [N, C, L]. The stage loop and head live in
`residual.py`, shared with v2.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layers import batch_norm, conv1x1, conv3x3, max_pool
from training.models.residual import BlockGeometry, ResidualNet, build_residual_net


class _Block(nn.Module):
    """Shared sum and shortcut; subclasses define `residual` (the branch up to its last BN)."""

    relu: nn.Module
    downsample: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.residual(x)
        out += identity
        return self.relu(out)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BasicBlock(_Block):
    """Two 3x3 convolutions; out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, geo: BlockGeometry, downsample: nn.Module | None) -> None:
        super().__init__()
        planes, dilation, dims = geo.planes, geo.dilation, geo.dims
        self.conv1 = conv3x3(geo.in_planes, planes, geo.stride, dilation=dilation, dims=dims)
        self.bn1 = batch_norm(planes, dims=dims)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation, dims=dims)
        self.bn2 = batch_norm(planes, dims=dims)
        self.downsample = downsample

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def last_bn(self) -> nn.Module:
        """The BN whose gamma `zero_init_residual` zeroes."""
        return self.bn2


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; BN after each, ReLU after the sum."""

    expansion = 4

    def __init__(self, geo: BlockGeometry, downsample: nn.Module | None) -> None:
        super().__init__()
        planes, dims = geo.planes, geo.dims
        self.conv1 = conv1x1(geo.in_planes, planes, dims=dims)
        self.bn1 = batch_norm(planes, dims=dims)
        self.conv2 = conv3x3(planes, planes, geo.stride, dilation=geo.dilation, dims=dims)
        self.bn2 = batch_norm(planes, dims=dims)
        self.conv3 = conv1x1(planes, planes * self.expansion, dims=dims)
        self.bn3 = batch_norm(planes * self.expansion, dims=dims)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def last_bn(self) -> nn.Module:
        """The BN whose gamma `zero_init_residual` zeroes."""
        return self.bn3


BLOCK_TYPES: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(ResidualNet):
    """Stem conv-BN-ReLU(-maxpool), stages `layer1..layerK`, global average pool, dropout, fc."""

    norm_shortcut = True

    def _build_stem(self, width: int) -> None:
        self.bn1 = batch_norm(width, dims=self.dims)
        self.relu = nn.ReLU(inplace=True)
        # CIFAR style has no max-pool; Identity keeps one forward for both styles.
        self.maxpool = max_pool(3, 2, dims=self.dims, padding=1) if self.imagenet else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self._stages_and_head(x)


def build(config: ModelConfig) -> ResNet:
    """Build a v1 ResNet from a validated config (registry entry point)."""

    def last_bn_weight(m: nn.Module) -> nn.Parameter | None:
        # Goyal et al. 2017: each residual branch ends in this BN; zero gamma, zero branch.
        return m.last_bn().weight if isinstance(m, BasicBlock | Bottleneck) else None

    return build_residual_net(ResNet, BLOCK_TYPES, config, last_bn_weight)
