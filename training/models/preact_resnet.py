"""ResNet v2, pre-activation (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Each block computes BN-ReLU before each convolution and adds an untouched identity; the net ends
with a final BN-ReLU (`bn_final`) before pooling. Projection shortcuts (B/C) are a bare 1x1
convolution on the pre-activated input, as the authors' code; option A pads the raw input.
CIFAR style: the stem is one 3x3 conv and every block pre-activates (resnet-1k-layers).
ImageNet style: conv-BN-ReLU-maxpool stem, so the first block skips its own pre-activation
(fb.resnet.torch preresnet.lua). Bottlenecks put the stride on the 3x3 conv, as our v1.
`output_stride` (dilation) and `spatial_dims=1` (Conv1d, signals) work as in `resnet.py`; the
stage loop and head live in `residual.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layers import PadShortcut, batch_norm, conv1x1, conv3x3, max_pool
from training.models.residual import BlockGeometry, ResidualNet, build_residual_net


class _PreActBlock(nn.Module):
    """Shared pre-activation and shortcut logic; subclasses define `residual` and `last_conv`."""

    expansion = 1

    def __init__(
        self, in_planes: int, preactivate: bool, downsample: nn.Module | None, dims: int = 2
    ) -> None:
        super().__init__()
        self.preactivate = preactivate
        self.bn1 = batch_norm(in_planes, dims=dims) if preactivate else None
        self.relu = nn.ReLU(inplace=True)  # only ever applied to fresh BN outputs
        self.downsample = downsample
        # Projections read the pre-activated input; identity and option A the raw one.
        self.project = downsample is not None and not isinstance(downsample, PadShortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x)) if self.bn1 is not None else x
        identity = x if self.downsample is None else self.downsample(out if self.project else x)
        return self.residual(out) + identity

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def last_conv(self) -> nn.Module:
        raise NotImplementedError


class PreActBasicBlock(_PreActBlock):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the identity."""

    expansion = 1

    def __init__(self, geo: BlockGeometry, downsample: nn.Module | None, preactivate: bool = True) -> None:
        super().__init__(geo.in_planes, preactivate, downsample, geo.dims)
        planes, dilation, dims = geo.planes, geo.dilation, geo.dims
        self.conv1 = conv3x3(geo.in_planes, planes, geo.stride, dilation=dilation, dims=dims)
        self.bn2 = batch_norm(planes, dims=dims)
        self.conv2 = conv3x3(planes, planes, dilation=dilation, dims=dims)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        out = self.conv1(out)
        return self.conv2(self.relu(self.bn2(out)))

    def last_conv(self) -> nn.Module:
        return self.conv2


class PreActBottleneck(_PreActBlock):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 (x4), plus the identity."""

    expansion = 4

    def __init__(self, geo: BlockGeometry, downsample: nn.Module | None, preactivate: bool = True) -> None:
        super().__init__(geo.in_planes, preactivate, downsample, geo.dims)
        planes, dims = geo.planes, geo.dims
        self.conv1 = conv1x1(geo.in_planes, planes, dims=dims)
        self.bn2 = batch_norm(planes, dims=dims)
        self.conv2 = conv3x3(planes, planes, geo.stride, dilation=geo.dilation, dims=dims)
        self.bn3 = batch_norm(planes, dims=dims)
        self.conv3 = conv1x1(planes, planes * self.expansion, dims=dims)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.relu(self.bn3(out)))

    def last_conv(self) -> nn.Module:
        return self.conv3


BLOCK_TYPES: dict[str, type[PreActBasicBlock | PreActBottleneck]] = {
    "basic": PreActBasicBlock,
    "bottleneck": PreActBottleneck,
}


class PreActResNet(ResidualNet):
    """Stem, stages `layer1..layerK`, final BN-ReLU, global average pool, dropout, fc."""

    norm_shortcut = False

    def _build_stem(self, width: int) -> None:
        if self.imagenet:
            self.bn1 = batch_norm(width, dims=self.dims)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = max_pool(3, 2, dims=self.dims, padding=1)

    def _make_block(
        self, block: type[nn.Module], geo: BlockGeometry, downsample: nn.Module | None, first: bool
    ) -> nn.Module:
        # After a conv-BN-ReLU stem the first block's own pre-activation would repeat it.
        return block(geo, downsample, preactivate=not (self.imagenet and first))

    def _build_neck(self, channels: int) -> None:
        self.bn_final = batch_norm(channels, dims=self.dims)
        self.relu_final = nn.ReLU(inplace=True)

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_final(self.bn_final(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.imagenet:
            x = self.maxpool(self.relu(self.bn1(x)))
        return self._stages_and_head(x)


def build(config: ModelConfig) -> PreActResNet:
    """Build a v2 (pre-activation) ResNet from a validated config (registry entry point)."""

    def last_conv_weight(m: nn.Module) -> nn.Parameter | None:
        # No BN ends a v2 residual branch; zeroing its last conv makes each block start as identity.
        return m.last_conv().weight if isinstance(m, _PreActBlock) else None

    return build_residual_net(PreActResNet, BLOCK_TYPES, config, last_conv_weight)
