"""DenseNet-BC (Huang et al. 2017) as torchvision defines it (`densenet.py`).

Each dense layer is BN-ReLU-conv1x1 (to 4 x growth) then BN-ReLU-conv3x3 (to growth) on the
concatenation of every earlier feature map of its block; transitions are BN-ReLU-conv1x1
(halving the channels) then a 2x2 average pool; a final BN (`norm5`), ReLU, global average pool
and one linear layer. Module names follow torchvision (`features.denseblock1.denselayer1.conv1`),
so the state_dict keys and parameter counts (DenseNet-121: 7,978,856) are torchvision's.

Where this follows torchvision rather than the paper: the ImageNet stem (7x7/2 conv, 3x3/2
max-pool with padding 1), 2 x growth stem channels (DenseNet-161: 96), dropout only before the
classifier (the paper's 0.2 dense-layer dropout is for its non-augmented CIFAR runs), no
memory-efficient checkpointing (it changes no result, and would defeat fx tracing).
Transition pools floor odd sizes as torchvision's; the smallest input is 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.classic_layouts import DENSENET_BN_SIZE, DENSENET_COMPRESSION, densenet_layout
from training.models.config import ModelConfig
from training.models.layers import build_from_config


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck), BN-ReLU-conv3x3; returns only the `growth` new channels."""

    def __init__(self, in_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu1 may run in place: norm1 made a fresh tensor, the concatenated input is untouched.
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.ModuleDict):
    """`denselayer1..K`; each reads the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, in_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compressing the channels), 2x2/2 average pool."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """`features` (stem, dense blocks, transitions, norm5), ReLU, pool, dropout, `classifier`."""

    def __init__(
        self,
        *,
        blocks: tuple[int, ...],
        growth_rate: int,
        init_features: int,
        in_channels: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module(
            "conv0", nn.Conv2d(in_channels, init_features, kernel_size=7, stride=2, padding=3, bias=False)
        )
        self.features.add_module("norm0", nn.BatchNorm2d(init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        features = init_features
        for i, num_layers in enumerate(blocks):
            block = DenseBlock(num_layers, features, growth_rate, DENSENET_BN_SIZE)
            self.features.add_module(f"denseblock{i + 1}", block)
            features += num_layers * growth_rate
            if i != len(blocks) - 1:
                out = int(features * DENSENET_COMPRESSION)
                self.features.add_module(f"transition{i + 1}", Transition(features, out))
                features = out
        self.features.add_module("norm5", nn.BatchNorm2d(features))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.relu(self.features(x)))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def _init(model: nn.Module) -> None:
    """torchvision DenseNet init: He normal convs (fan_in), BN identity, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def build(config: ModelConfig) -> DenseNet:
    """Build a DenseNet from a validated config (registry entry point)."""
    layout = densenet_layout(config)
    return build_from_config(
        DenseNet,
        config,
        init=_init,
        blocks=layout.blocks,
        growth_rate=layout.growth_rate,
        init_features=layout.init_features,
    )
