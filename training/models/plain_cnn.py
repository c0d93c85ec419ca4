"""Plain VGG-style CNN: stages of conv [-BN] -ReLU, each closed by a 2x2 max-pool, then an
adaptive average pool and a fully connected head (Linear-ReLU-Dropout per hidden layer).

Follows torchvision's `vgg.py` (features / avgpool / classifier, conv bias kept even with BN,
init), so the VGG presets have torchvision's parameter counts. One difference: the max-pools use
`ceil_mode=True`, so tiny inputs (8x8 through five stages) shrink to 1x1 instead of to nothing;
on even sizes (224 = 7 * 32) the result is the same as torchvision's.

Beyond VGG (all defaults keep VGG): `spatial_dims=1` builds the same network from Conv1d layers
for signals [N,C,L]; `kernel_size`, `conv_stride`, `padding` ("same"/"valid") and per-conv
`dilation` set every convolution's geometry; `stage_pool="none"` drops the pools (the MNIST-1D
seed model: three stride-2 valid convolutions, no pooling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layers import (
    adaptive_avg_pool,
    batch_norm,
    build_from_config,
    conv,
    init_weights,
    max_pool,
)
from training.models.layouts import PlainLayout, plain_layout


@dataclass(frozen=True, kw_only=True)
class ConvGeometry:
    """What every convolution of a plain CNN shares."""

    dims: int  # 1 or 2
    kernel_size: int
    stride: int
    same_padding: bool  # "same": dilation * (k-1)/2; else "valid" (0)
    batch_norm: bool
    stage_pool: bool  # a 2x2/2 max-pool after each stage


class PlainCNN(nn.Module):
    """`features` (conv stages), `avgpool` (adaptive, pool_size^dims), `classifier` (FC head)."""

    def __init__(
        self,
        *,
        layout: PlainLayout,
        geometry: ConvGeometry,
        in_channels: int,
        num_classes: int,
        dropout: float,
        pool_size: int,
    ) -> None:
        super().__init__()
        self.features = _features(layout, geometry, in_channels)
        self.avgpool = adaptive_avg_pool(pool_size, dims=geometry.dims)
        pooled = layout.channels[-1] * pool_size**geometry.dims
        self.classifier = _classifier(layout, pooled, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _features(layout: PlainLayout, geo: ConvGeometry, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    dilations = iter(layout.dilations)
    for out_channels, count in zip(layout.channels, layout.convs, strict=True):
        for _ in range(count):
            dilation = next(dilations)
            padding = dilation * (geo.kernel_size - 1) // 2 if geo.same_padding else 0
            layers.append(
                conv(
                    in_channels,
                    out_channels,
                    geo.kernel_size,
                    dims=geo.dims,
                    stride=geo.stride,
                    padding=padding,
                    dilation=dilation,
                )
            )
            if geo.batch_norm:
                layers.append(batch_norm(out_channels, dims=geo.dims))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
        if geo.stage_pool:
            layers.append(max_pool(2, 2, dims=geo.dims, ceil_mode=True))
    return nn.Sequential(*layers)


def _classifier(layout: PlainLayout, in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in layout.hidden:
        # Dropout is kept at p=0 too, so state_dict keys do not depend on the dropout rate.
        layers += [nn.Linear(in_features, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = size
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _init(model: nn.Module) -> None:
    """torchvision VGG init: He normal convs (fan_out), BN identity, N(0, 0.01) linear layers."""
    init_weights(model)
    # The classifier follows every conv, so drawing its weights second keeps seeded values.
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def build(config: ModelConfig) -> PlainCNN:
    """Build a plain CNN from a validated config (registry entry point)."""
    return build_from_config(
        PlainCNN,
        config,
        init=_init,
        layout=plain_layout(config),
        geometry=ConvGeometry(
            dims=config.spatial_dims,
            kernel_size=config.kernel_size,
            stride=config.conv_stride,
            same_padding=config.padding == "same",
            batch_norm=config.batch_norm,
            stage_pool=config.stage_pool == "max",
        ),
        pool_size=config.pool_size,
    )
