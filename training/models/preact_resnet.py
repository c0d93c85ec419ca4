"""ResNet v2, pre-activation (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Each block computes BN-ReLU before each convolution and adds an untouched identity; the net ends
with a final BN-ReLU (`bn_final`) before pooling. Projection shortcuts (B/C) are a bare 1x1
convolution on the pre-activated input, as the authors' code; option A pads the raw input.
CIFAR style: the stem is one 3x3 conv and every block pre-activates (resnet-1k-layers).
ImageNet style: conv-BN-ReLU-maxpool stem, so the first block skips its own pre-activation
(fb.resnet.torch preresnet.lua). Bottlenecks put the stride on the 3x3 conv, as our v1.
`output_stride` (dilation) and `spatial_dims=1` (Conv1d, signals) work as in `resnet.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layers import (
    PadShortcut,
    adaptive_avg_pool,
    batch_norm,
    conv,
    conv1x1,
    conv3x3,
    make_shortcut,
    max_pool,
)
from training.models.layouts import ResNetLayout
from training.models.resnet import build_residual_net


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

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        preactivate: bool = True,
        *,
        dilation: int = 1,
        dims: int = 2,
    ) -> None:
        super().__init__(in_planes, preactivate, downsample, dims)
        self.conv1 = conv3x3(in_planes, planes, stride, dilation=dilation, dims=dims)
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

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        preactivate: bool = True,
        *,
        dilation: int = 1,
        dims: int = 2,
    ) -> None:
        super().__init__(in_planes, preactivate, downsample, dims)
        self.conv1 = conv1x1(in_planes, planes, dims=dims)
        self.bn2 = batch_norm(planes, dims=dims)
        self.conv2 = conv3x3(planes, planes, stride, dilation=dilation, dims=dims)
        self.bn3 = batch_norm(planes, dims=dims)
        self.conv3 = conv1x1(planes, planes * self.expansion, dims=dims)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.relu(self.bn3(out)))

    def last_conv(self) -> nn.Module:
        return self.conv3


@dataclass(frozen=True, kw_only=True)
class _Stage:
    planes: int
    count: int
    stride: int
    dilations: tuple[int, int]  # first block's, the others' (torchvision's dilation rule)
    preact_first: bool


BLOCK_TYPES: dict[str, type[PreActBasicBlock | PreActBottleneck]] = {
    "basic": PreActBasicBlock,
    "bottleneck": PreActBottleneck,
}


class PreActResNet(nn.Module):
    """Stem, stages `layer1..layerK`, final BN-ReLU, global average pool, dropout, fc."""

    def __init__(
        self,
        *,
        block: type[PreActBasicBlock | PreActBottleneck],
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
        imagenet = style == "imagenet"
        if imagenet:
            self.conv1 = conv(in_channels, width, 7, dims=dims, stride=2, padding=3, bias=False)
            self.bn1 = batch_norm(width, dims=dims)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = max_pool(3, 2, dims=dims, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, width, dims=dims)
        self.stem_activates = imagenet
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(layout.stages)))
        previous_dilation = 1
        for i, name in enumerate(self.stage_names):
            # After a conv-BN-ReLU stem the first block's own pre-activation would repeat it.
            preact_first = not (imagenet and i == 0)
            stage = _Stage(
                planes=width * 2**i,
                count=layout.stages[i],
                stride=layout.strides[i],
                dilations=(previous_dilation, layout.dilations[i]),
                preact_first=preact_first,
            )
            self.add_module(name, self._make_layer(block, stage, layout.shortcut))
            previous_dilation = layout.dilations[i]
        self.bn_final = batch_norm(self.in_planes, dims=dims)
        self.relu_final = nn.ReLU(inplace=True)
        self.avgpool = adaptive_avg_pool(1, dims=dims)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.in_planes, num_classes)

    def _make_layer(
        self, block: type[PreActBasicBlock | PreActBottleneck], stage: _Stage, shortcut: str
    ) -> nn.Sequential:
        blocks = []
        for i in range(stage.count):
            s = stage.stride if i == 0 else 1
            out_planes = stage.planes * block.expansion
            downsample = make_shortcut(shortcut, self.in_planes, out_planes, s, norm=False, dims=self.dims)
            blocks.append(
                block(
                    self.in_planes,
                    stage.planes,
                    s,
                    downsample,
                    stage.preact_first or i > 0,
                    dilation=stage.dilations[0] if i == 0 else stage.dilations[1],
                    dims=self.dims,
                )
            )
            self.in_planes = out_planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.stem_activates:
            x = self.maxpool(self.relu(self.bn1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.relu_final(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def build(config: ModelConfig) -> PreActResNet:
    """Build a v2 (pre-activation) ResNet from a validated config (registry entry point)."""

    def last_conv_weight(m: nn.Module) -> nn.Parameter | None:
        # No BN ends a v2 residual branch; zeroing its last conv makes each block start as identity.
        return m.last_conv().weight if isinstance(m, _PreActBlock) else None

    return build_residual_net(PreActResNet, BLOCK_TYPES, config, last_conv_weight)
