"""Building blocks shared by the families: dimension-generic layers, shortcuts, initialisation.

`spatial_dims` (1 or 2) picks the 1-D (signals, [N,C,L]) or 2-D (images, [N,C,H,W]) variant of
each layer, so one network definition serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from training.models.config import ModelConfig

_Net = TypeVar("_Net", bound=nn.Module)

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_ADAPTIVE_AVG: dict[int, type[nn.Module]] = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}
CONV_TYPES = (nn.Conv1d, nn.Conv2d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def conv(in_ch: int, out_ch: int, kernel_size: int, *, dims: int = 2, **kwargs: object) -> nn.Module:
    """`nn.Conv1d` or `nn.Conv2d` (by `dims`) with the given arguments."""
    return _CONV[dims](in_ch, out_ch, kernel_size, **kwargs)


def batch_norm(channels: int, *, dims: int = 2) -> nn.Module:
    """`nn.BatchNorm1d` or `nn.BatchNorm2d`."""
    return _BN[dims](channels)


def max_pool(kernel_size: int, stride: int, *, dims: int = 2, **kwargs: object) -> nn.Module:
    """`nn.MaxPool1d` or `nn.MaxPool2d`."""
    return _MAXPOOL[dims](kernel_size, stride=stride, **kwargs)


def adaptive_avg_pool(size: int, *, dims: int = 2) -> nn.Module:
    """`nn.AdaptiveAvgPool1d(size)` or `nn.AdaptiveAvgPool2d((size, size))`."""
    return _ADAPTIVE_AVG[dims](size if dims == 1 else (size, size))


def conv3x3(
    in_planes: int, out_planes: int, stride: int = 1, *, dilation: int = 1, dims: int = 2
) -> nn.Module:
    """3x3 (1-D: 3-tap) convolution, padding = dilation (size kept at stride 1), no bias
    (a BatchNorm follows or precedes it)."""
    return conv(
        in_planes, out_planes, 3, dims=dims, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, *, dims: int = 2) -> nn.Module:
    """1x1 (1-D: 1-tap) convolution without bias."""
    return conv(in_planes, out_planes, 1, dims=dims, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: parameter-free identity that subsamples and zero-pads new channels.

    Subsampling takes every `stride`-th pixel (as fb.resnet.torch's 1x1 average pool with stride),
    which gives ceil(H / stride) rows: the same as a padded 3x3 stride-2 conv, for odd sizes too.
    The zero channels go after the identity ones (fb.resnet.torch concatenates zeros).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, *, dims: int = 2) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A cannot shrink channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.pad = out_planes - in_planes
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride] if self.dims == 1 else x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            # F.pad reads pairs from the last dim backwards; the channel pair comes after the
            # spatial ones.
            x = F.pad(x, (0, 0) * self.dims + (0, self.pad))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


def make_shortcut(
    kind: str, in_planes: int, out_planes: int, stride: int, *, norm: bool, dims: int = 2
) -> nn.Module | None:
    """Shortcut of one residual block; None is the plain identity.

    A: identity, or `PadShortcut` where the shape changes. B: identity, or a 1x1 projection where
    the shape changes. C: a 1x1 projection in every block. `norm` adds the BatchNorm that v1
    (torchvision `downsample`) puts after the projection; v2 projects the pre-activated input
    without one.
    """
    changes = stride != 1 or in_planes != out_planes
    if kind == "A":
        return PadShortcut(in_planes, out_planes, stride, dims=dims) if changes else None
    if kind == "B" and not changes:
        return None
    layers: list[nn.Module] = [conv1x1(in_planes, out_planes, stride, dims=dims)]
    if norm:
        layers.append(batch_norm(out_planes, dims=dims))
    return nn.Sequential(*layers)


def build_from_config(
    net: Callable[..., _Net],
    config: ModelConfig,
    *,
    init: Callable[[nn.Module], None] | None = None,
    **layout: object,
) -> _Net:
    """`net(**layout)` given the fields every family reads from `config` (`in_channels`,
    `num_classes`, `dropout`), then `init(model)` where given (None keeps PyTorch's defaults).
    A family's `build` so states only its own layout and its initialisation."""
    common = {"in_channels": config.in_channels, "num_classes": config.num_classes, "dropout": config.dropout}
    model = net(**layout, **common)
    if init is not None:
        init(model)
    return model


def init_weights(model: nn.Module) -> None:
    """He (kaiming) normal init of convolutions (fan_out, as torchvision), BN to identity."""
    for m in model.modules():
        if isinstance(m, CONV_TYPES):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (*BN_TYPES, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
