"""Pure (torch-free) shape rules of each family: depth -> blocks per stage, defaults, checks.

Validation and building share these functions, so a config that validates is one that builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.models.errors import ModelConfigError

if TYPE_CHECKING:
    from training.models.config import ModelConfig

# ImageNet-style depths (He et al. 2015, Table 1; 200 from He et al. 2016 / fb.resnet.torch).
IMAGENET_STAGES: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
DEFAULT_WIDTH = {"cifar": 16, "imagenet": 64}
CIFAR_STAGES = 3
# Where 6n+2 and 9n+2 both fit (56, 110, 164, ...) the papers use basic blocks below 164 and
# bottlenecks from 164 on (ResNet-164, ResNet-1001); inference follows them.
CIFAR_BOTTLENECK_FROM = 164


@dataclass(frozen=True, kw_only=True)
class ResNetLayout:
    """Resolved shape of a residual network: every None of the config filled in."""

    block: str  # "basic" | "bottleneck"
    stages: tuple[int, ...]  # blocks per stage
    width: int  # planes of the first stage; stage i has width * 2**i
    shortcut: str  # "A" | "B" | "C"
    strides: tuple[int, ...]  # first-block stride of each stage (1 where dilation replaced it)
    dilations: tuple[int, ...]  # dilation of each stage's blocks (its first block: the previous one's)


@dataclass(frozen=True, kw_only=True)
class PlainLayout:
    """Resolved shape of a plain (VGG-style) CNN."""

    channels: tuple[int, ...]  # output channels of each conv stage
    convs: tuple[int, ...]  # convolutions in each stage
    hidden: tuple[int, ...]  # hidden fully connected sizes
    depth: int  # weight layers: convolutions + linear layers
    dilations: tuple[int, ...]  # dilation of each convolution, in order (sum(convs) entries)


def resnet_layout(config: ModelConfig) -> ResNetLayout:
    """Resolve blocks per stage, block kind, width and shortcut of a (pre-activation) ResNet."""
    arch, depth, style = config.arch, config.depth, config.style
    if depth is None:
        raise ModelConfigError(
            f"{arch} needs a depth (cifar style: 6n+2 or 9n+2, e.g. 20, 56, 110, 164; "
            f"imagenet style: {', '.join(map(str, IMAGENET_STAGES))})"
        )
    if style == "imagenet":
        block, stages = _imagenet_stages(arch, depth, config.block)
    else:
        block, per_stage = _cifar_blocks(arch, depth, config.block)
        stages = (per_stage,) * CIFAR_STAGES
    shortcut = config.shortcut or _default_shortcut(arch, style, block)
    width = config.width if config.width is not None else DEFAULT_WIDTH[style]
    strides, dilations = _stage_dilations(arch, style, len(stages), config.output_stride)
    return ResNetLayout(
        block=block, stages=stages, width=width, shortcut=shortcut, strides=strides, dilations=dilations
    )


def natural_output_stride(style: str, num_stages: int) -> int:
    """Input size / final feature map size without dilation: stem (imagenet 4, cifar 1) x 2 per
    stage after the first."""
    return (4 if style == "imagenet" else 1) * 2 ** (num_stages - 1)


def _stage_dilations(
    arch: str, style: str, num_stages: int, output_stride: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and dilations per stage for an output stride (torchvision's
    replace_stride_with_dilation, from the last stage backwards): each stage that loses its
    stride 2 doubles the dilation, so the receptive field is kept while the maps stay larger."""
    natural = natural_output_stride(style, num_stages)
    allowed = [natural >> k for k in range(num_stages)]  # natural, /2, ... down to the stem's
    wanted = natural if output_stride is None else output_stride
    if wanted not in allowed:
        raise ModelConfigError(
            f"{arch} output_stride={output_stride} is not possible for the {style} style with "
            f"{num_stages} stages; expected one of {', '.join(map(str, allowed))}"
        )
    dilated = allowed.index(wanted)  # stages, counted from the last, whose stride becomes dilation
    strides, dilations, dilation = [], [], 1
    for i in range(num_stages):
        stride = 1 if i == 0 else 2
        if i >= num_stages - dilated:
            dilation *= stride
            stride = 1
        strides.append(stride)
        dilations.append(dilation)
    return tuple(strides), tuple(dilations)


def _imagenet_stages(arch: str, depth: int, block: str | None) -> tuple[str, tuple[int, ...]]:
    if depth not in IMAGENET_STAGES:
        known = ", ".join(map(str, IMAGENET_STAGES))
        raise ModelConfigError(
            f"{arch} depth {depth} is not an imagenet-style depth; expected one of {known}"
        )
    expected, stages = IMAGENET_STAGES[depth]
    if block is not None and block != expected:
        raise ModelConfigError(
            f"{arch} depth {depth} in the imagenet style uses {expected} blocks, not block={block!r}"
        )
    return expected, stages


def _cifar_blocks(arch: str, depth: int, block: str | None) -> tuple[str, int]:
    """Block kind and blocks per stage for depth = 6n+2 (basic) or 9n+2 (bottleneck), n >= 1."""
    basic_ok = depth >= 8 and (depth - 2) % 6 == 0
    bottleneck_ok = depth >= 11 and (depth - 2) % 9 == 0
    if block is None:
        if bottleneck_ok and (depth >= CIFAR_BOTTLENECK_FROM or not basic_ok):
            block = "bottleneck"
        elif basic_ok:
            block = "basic"
        else:
            raise ModelConfigError(
                f"{arch} depth {depth} is not of the form 6n+2 (basic) or 9n+2 (bottleneck) "
                "for the cifar style (n >= 1; e.g. 20, 32, 44, 56, 110, 164)"
            )
    if block == "basic" and not basic_ok:
        raise ModelConfigError(
            f"{arch} depth {depth} is not of the form 6n+2 (n >= 1) that basic blocks need "
            "for the cifar style (e.g. 20, 32, 56, 110)"
        )
    if block == "bottleneck" and not bottleneck_ok:
        raise ModelConfigError(
            f"{arch} depth {depth} is not of the form 9n+2 (n >= 1) that bottleneck blocks need "
            "for the cifar style (e.g. 164, 1001)"
        )
    per_stage = (depth - 2) // (6 if block == "basic" else 9)
    return block, per_stage


def _default_shortcut(arch: str, style: str, block: str) -> str:
    # Option A is the CIFAR recipe of He et al. 2015 (sec. 4.2) for the basic-block v1 nets;
    # the bottleneck and pre-activation nets of the papers project (B).
    return "A" if arch == "resnet" and style == "cifar" and block == "basic" else "B"


def _one_each(name: str, value: int | tuple[int, ...], count: int, expected: str) -> tuple[int, ...]:
    """`value` once per item (an int repeats); a tuple of another length raises, naming `expected`."""
    values = (value,) * count if isinstance(value, int) else tuple(value)
    if len(values) != count:
        raise ModelConfigError(f"{name}={list(values)} has {len(values)} entries but {expected}")
    return values


def plain_layout(config: ModelConfig) -> PlainLayout:
    """Resolve and check the stages of a plain CNN; a given depth must match its weight layers."""
    channels = config.channels
    stages = f"channels={list(channels)} has {len(channels)} stages"
    convs = _one_each("convs_per_stage", config.convs_per_stage, len(channels), stages)
    depth = sum(convs) + len(config.hidden) + 1
    if config.depth is not None and config.depth != depth:
        raise ModelConfigError(
            f"plain_cnn depth {config.depth} does not match its layers: {sum(convs)} convolutions + "
            f"{len(config.hidden) + 1} linear layers = {depth} (leave depth out to derive it)"
        )
    every_conv = f"the network has {sum(convs)} convolutions (give one value for all, or one per convolution)"
    dilations = _one_each("dilation", config.dilation, sum(convs), every_conv)
    if config.padding == "same" and config.kernel_size % 2 == 0:
        raise ModelConfigError(
            f"kernel_size={config.kernel_size} must be odd for padding 'same' (or use padding 'valid')"
        )
    return PlainLayout(channels=channels, convs=convs, hidden=config.hidden, depth=depth, dilations=dilations)
