"""GoogLeNet / Inception v1 (Szegedy et al. 2014) as torchvision defines it (`googlenet.py`).

Where this follows torchvision rather than the paper:
- every convolution is conv (no bias) - BatchNorm (eps 0.001) - ReLU (`BasicConv2d`); the paper
  predates BatchNorm;
- the "5x5" branch of each Inception module is a 3x3 convolution (a known torchvision quirk kept
  for its weights; the published 6,624,904 parameters count it);
- max-pools use ceil_mode, the pool branch's 3x3 max-pool included; no local response norm;
- dropout 0.2 before the classifier (the paper: 0.4); the auxiliary heads pool adaptively to 4x4.

The two auxiliary classifiers (after inception4a and 4d) exist only with `aux_heads=True` and
run only in training mode: then `forward` returns `AuxLogits(logits, aux)`, and the loss should be
`CE(logits) + AUX_LOSS_WEIGHT * sum(CE(a) for a in aux)` (see `training.models.outputs`).
In eval mode (and so in fx traces, ONNX export and serving) the output is the plain logits tensor
and the heads are dead weights. `width` (stem channels, 64) scales every layer by width / 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.classic_layouts import REFERENCE_WIDTH, googlenet_width
from training.models.config import ModelConfig
from training.models.layers import build_from_config
from training.models.outputs import AuxLogits

# torchvision's Inception modules: in, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool proj.
_INCEPTION: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}
_POOL_AFTER = {"inception3b": "maxpool3", "inception4e": "maxpool4"}
_AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}


class BasicConv2d(nn.Module):
    """conv (no bias) - BN (eps 0.001) - ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3; 3x3 max-pool-1x1) concatenated."""

    def __init__(self, in_channels: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, proj: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, c1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, c3r, kernel_size=1), BasicConv2d(c3r, c3, kernel_size=3, padding=1)
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, c5r, kernel_size=1), BasicConv2d(c5r, c5, kernel_size=3, padding=1)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, proj, kernel_size=1),
        )
        self.out_channels = c1 + c3 + c5 + proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: adaptive 4x4 average pool, 1x1 conv, two linear layers."""

    def __init__(self, in_channels: int, num_classes: int, *, scale: float) -> None:
        super().__init__()
        conv_channels, hidden = _scaled(128, scale), _scaled(1024, scale)
        self.conv = BasicConv2d(in_channels, conv_channels, kernel_size=1)
        self.fc1 = nn.Linear(conv_channels * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(p=0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4)))
        x = F.relu(self.fc1(torch.flatten(x, 1)), inplace=True)
        return self.fc2(self.dropout(x))


def _scaled(channels: int, scale: float) -> int:
    return max(1, round(channels * scale))


class GoogLeNet(nn.Module):
    """Stem (conv1, maxpool1, conv2, conv3, maxpool2), Inception 3a-5b, pool, dropout, fc."""

    def __init__(
        self, *, width: int, in_channels: int, num_classes: int, dropout: float, aux_heads: bool
    ) -> None:
        super().__init__()
        scale = width / REFERENCE_WIDTH
        self.conv1 = BasicConv2d(in_channels, width, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(width, width, kernel_size=1)
        self.conv3 = BasicConv2d(width, _scaled(192, scale), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        channels = _scaled(192, scale)
        self.aux1: InceptionAux | None = None
        self.aux2: InceptionAux | None = None
        for name, spec in _INCEPTION.items():
            module = Inception(channels, *(_scaled(c, scale) for c in spec))
            self.add_module(name, module)
            channels = module.out_channels
            if name in _POOL_AFTER:  # maxpool3: 3x3/2; maxpool4: 2x2/2 (as torchvision)
                kernel = 3 if name == "inception3b" else 2
                self.add_module(_POOL_AFTER[name], nn.MaxPool2d(kernel, stride=2, ceil_mode=True))
            if aux_heads and name in _AUX_AFTER:
                setattr(self, _AUX_AFTER[name], InceptionAux(channels, num_classes, scale=scale))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | AuxLogits:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        aux: list[torch.Tensor] = []
        for name in _INCEPTION:
            x = getattr(self, name)(x)
            if name in _POOL_AFTER:
                x = getattr(self, _POOL_AFTER[name])(x)
            head = getattr(self, _AUX_AFTER[name]) if name in _AUX_AFTER else None
            if head is not None and self.training:  # a Python bool: fx traces a constant
                aux.append(head(x))
        x = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(self.dropout(x))
        return AuxLogits(logits, tuple(aux)) if aux else logits


def _init(model: nn.Module) -> None:
    """torchvision GoogLeNet init: truncated N(0, 0.01) conv and linear weights, BN identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build(config: ModelConfig) -> GoogLeNet:
    """Build GoogLeNet from a validated config (registry entry point)."""
    return build_from_config(
        GoogLeNet, config, init=_init, width=googlenet_width(config), aux_heads=config.aux_heads
    )
