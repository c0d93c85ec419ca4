"""Building blocks shared by the residual families: convolutions, shortcuts, initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: parameter-free identity that subsamples and zero-pads new channels.

    Subsampling takes every `stride`-th pixel (as fb.resnet.torch's 1x1 average pool with stride),
    which gives ceil(H / stride) rows: the same as a padded 3x3 stride-2 conv, for odd sizes too.
    The zero channels go after the identity ones (fb.resnet.torch concatenates zeros).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A cannot shrink channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.pad = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


def make_shortcut(kind: str, in_planes: int, out_planes: int, stride: int, *, norm: bool) -> nn.Module | None:
    """Shortcut of one residual block; None is the plain identity.

    A: identity, or `PadShortcut` where the shape changes. B: identity, or a 1x1 projection where
    the shape changes. C: a 1x1 projection in every block. `norm` adds the BatchNorm that v1
    (torchvision `downsample`) puts after the projection; v2 projects the pre-activated input
    without one.
    """
    changes = stride != 1 or in_planes != out_planes
    if kind == "A":
        return PadShortcut(in_planes, out_planes, stride) if changes else None
    if kind == "B" and not changes:
        return None
    layers: list[nn.Module] = [conv1x1(in_planes, out_planes, stride)]
    if norm:
        layers.append(nn.BatchNorm2d(out_planes))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """He (kaiming) normal init of convolutions (fan_out, as torchvision), BN to identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
