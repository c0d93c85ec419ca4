"""Plain VGG-style CNN: stages of 3x3 conv [-BN] -ReLU, each closed by a 2x2 max-pool, then an
adaptive average pool and a fully connected head (Linear-ReLU-Dropout per hidden layer).

Follows torchvision's `vgg.py` (features / avgpool / classifier, conv bias kept even with BN,
init), so the VGG presets have torchvision's parameter counts. One difference: the max-pools use
`ceil_mode=True`, so tiny inputs (8x8 through five stages) shrink to 1x1 instead of to nothing;
on even sizes (224 = 7 * 32) the result is the same as torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.config import ModelConfig
from training.models.layouts import PlainLayout, plain_layout


class PlainCNN(nn.Module):
    """`features` (conv stages), `avgpool` (adaptive, pool_size^2), `classifier` (FC head)."""

    def __init__(
        self,
        *,
        layout: PlainLayout,
        in_channels: int,
        num_classes: int,
        batch_norm: bool,
        dropout: float,
        pool_size: int,
    ) -> None:
        super().__init__()
        self.features = _features(layout, in_channels, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = _classifier(layout, layout.channels[-1] * pool_size**2, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _features(layout: PlainLayout, in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels, count in zip(layout.channels, layout.convs, strict=True):
        for _ in range(count):
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
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
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def build(config: ModelConfig) -> PlainCNN:
    """Build a plain CNN from a validated config (registry entry point)."""
    model = PlainCNN(
        layout=plain_layout(config),
        in_channels=config.in_channels,
        num_classes=config.num_classes,
        batch_norm=config.batch_norm,
        dropout=config.dropout,
        pool_size=config.pool_size,
    )
    _init(model)
    return model
