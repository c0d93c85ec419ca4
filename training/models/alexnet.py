"""AlexNet as torchvision defines it (`alexnet.py`): the one-GPU variant of Krizhevsky's
"One weird trick" paper (2014), not the two-GPU network of the 2012 paper.

Differences from the 2012 paper: 64-192-384-256-256 channels (not 96-256-384-384-256), no
local response normalisation, no grouped convolutions, an adaptive 6x6 average pool before the
classifier (so inputs other than 224² work), dropout before each hidden layer. Module names,
parameter counts (61,100,840 at 1000 classes) and PyTorch's default initialisation are
torchvision's. `width` (the first conv's channels, 64) scales every layer, the hidden FC size
(4096 = 64 x width) included, for small test models.

The max-pools are plain (floor) 3x3/2 as torchvision's: the smallest input is 63x63.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.classic_layouts import alexnet_width
from training.models.config import ModelConfig
from training.models.layers import build_from_config

_POOL = 6  # side of the adaptive average pool


class AlexNet(nn.Module):
    """`features` (5 convs, 3 max-pools), `avgpool` (adaptive 6x6), `classifier` (3 linear)."""

    def __init__(self, *, width: int, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (width * k for k in (1, 3, 6, 4, 4))
        hidden = 64 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((_POOL, _POOL))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c5 * _POOL * _POOL, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build(config: ModelConfig) -> AlexNet:
    """Build AlexNet from a validated config (registry entry point)."""
    return build_from_config(AlexNet, config, width=alexnet_width(config))
