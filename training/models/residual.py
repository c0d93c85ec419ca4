"""What ResNet v1 (`resnet.py`) and v2 (`preact_resnet.py`) share: the block geometry, the stage
loop (`layer1..layerK`, torchvision's stride and dilation rules), the pooled linear head and the
build from a config. Each net supplies its stem, its blocks and its forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layers import (
    adaptive_avg_pool,
    build_from_config,
    conv,
    conv3x3,
    init_weights,
    make_shortcut,
)
from training.models.layouts import ResNetLayout, resnet_layout

_Net = TypeVar("_Net", bound=nn.Module)


@dataclass(frozen=True, kw_only=True)
class BlockGeometry:
    """Where one residual block sits: its channels, stride, dilation and spatial dims."""

    in_planes: int
    planes: int
    stride: int
    dilation: int = 1
    dims: int = 2


class ResidualNet(nn.Module):
    """Stem (`_build_stem`), stages `layer1..layerK` (stride 2 from the second, or dilation
    instead), `_build_neck` (v2's final BN-ReLU), global average pool, dropout, fc. Modules are
    created in that order, so seeded initialisation draws the same numbers for every subclass."""

    norm_shortcut: bool  # whether projection shortcuts carry their own BN (v1) or not (v2)

    def __init__(
        self,
        *,
        block: type[nn.Module],
        layout: ResNetLayout,
        style: str,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.0,
        dims: int = 2,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.imagenet = style == "imagenet"
        # ImageNet style: 7x7 stride-2 stem (torchvision); CIFAR style: one 3x3 conv.
        if self.imagenet:
            self.conv1 = conv(in_channels, layout.width, 7, dims=dims, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_channels, layout.width, dims=dims)
        self._build_stem(layout.width)
        channels = self._add_stages(block, layout)
        self._build_neck(channels)
        self.avgpool = adaptive_avg_pool(1, dims=dims)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def _build_stem(self, width: int) -> None:
        """The stem's modules after `conv1`."""
        raise NotImplementedError

    def _build_neck(self, channels: int) -> None:
        """Modules between the last stage and the pool (none by default)."""

    def _make_block(
        self, block: type[nn.Module], geo: BlockGeometry, downsample: nn.Module | None, first: bool
    ) -> nn.Module:
        """One block; `first` is the net's first block (right after the stem)."""
        return block(geo, downsample)

    def _add_stages(self, block: type[nn.Module], layout: ResNetLayout) -> int:
        """Add `layer1..layerK`; return the channels the last stage puts out. A stage's first block
        keeps the previous stage's dilation, as torchvision's `replace_stride_with_dilation`."""
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(layout.stages)))
        in_planes, previous_dilation = layout.width, 1
        for i, name in enumerate(self.stage_names):
            planes = layout.width * 2**i
            out_planes = planes * block.expansion  # type: ignore[attr-defined]
            blocks = []
            for j in range(layout.stages[i]):
                stride = layout.strides[i] if j == 0 else 1
                downsample = make_shortcut(
                    layout.shortcut, in_planes, out_planes, stride, norm=self.norm_shortcut, dims=self.dims
                )
                dilation = previous_dilation if j == 0 else layout.dilations[i]
                geo = BlockGeometry(
                    in_planes=in_planes, planes=planes, stride=stride, dilation=dilation, dims=self.dims
                )
                blocks.append(self._make_block(block, geo, downsample, i == 0 and j == 0))
                in_planes = out_planes
            self.add_module(name, nn.Sequential(*blocks))
            previous_dilation = layout.dilations[i]
        return in_planes

    def _stages_and_head(self, x: torch.Tensor) -> torch.Tensor:
        """Forward from the stem's output to the logits."""
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(self._neck(x)), 1)
        return self.fc(self.dropout(x))

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        return x


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
    model = build_from_config(
        net,
        config,
        init=init_weights,
        block=block_types[layout.block],
        layout=layout,
        style=config.style,
        dims=config.spatial_dims,
    )
    if config.zero_init_residual:
        for m in model.modules():
            if (weight := residual_end(m)) is not None:
                nn.init.zeros_(weight)
    return model
