"""Pure (torch-free) shape rules of AlexNet, GoogLeNet and DenseNet: defaults and checks.

As in `layouts.py`, validation and building share these functions, so a config that validates
is one that builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.models.errors import ModelConfigError

if TYPE_CHECKING:
    from training.models.config import ModelConfig

ALEXNET_DEPTH = 8  # 5 convolutions + 3 linear layers
GOOGLENET_DEPTH = 22  # the paper's count of layers with parameters on the deepest path
REFERENCE_WIDTH = 64  # the stem channels of all three at their published size

# torchvision densenet.py: depth -> (growth rate, dense layers per block).
DENSENET_BLOCKS: dict[int, tuple[int, tuple[int, ...]]] = {
    121: (32, (6, 12, 24, 16)),
    161: (48, (6, 12, 36, 24)),
    169: (32, (6, 12, 32, 32)),
    201: (32, (6, 12, 48, 32)),
}
DENSENET_BN_SIZE = 4  # bottleneck width = bn_size x growth rate
DENSENET_COMPRESSION = 0.5  # transitions halve the channels (DenseNet-BC)


@dataclass(frozen=True, kw_only=True)
class DenseNetLayout:
    """Resolved shape of a DenseNet."""

    blocks: tuple[int, ...]  # dense layers per block
    growth_rate: int
    init_features: int  # channels of the stem convolution


def _fixed_depth(config: ModelConfig, depth: int) -> None:
    if config.depth is not None and config.depth != depth:
        raise ModelConfigError(f"{config.arch} has depth {depth}, not depth={config.depth} (leave depth out)")


def alexnet_width(config: ModelConfig) -> int:
    """Channels of AlexNet's first convolution (torchvision: 64)."""
    _fixed_depth(config, ALEXNET_DEPTH)
    return config.width if config.width is not None else REFERENCE_WIDTH


def googlenet_width(config: ModelConfig) -> int:
    """Stem channels of GoogLeNet (torchvision: 64); every layer scales by width / 64."""
    _fixed_depth(config, GOOGLENET_DEPTH)
    return config.width if config.width is not None else REFERENCE_WIDTH


def densenet_layout(config: ModelConfig) -> DenseNetLayout:
    """Blocks, growth rate and stem width of a DenseNet of a torchvision depth."""
    if config.depth not in DENSENET_BLOCKS:
        known = ", ".join(map(str, DENSENET_BLOCKS))
        raise ModelConfigError(f"densenet needs a depth of {known}, got depth={config.depth}")
    default_growth, blocks = DENSENET_BLOCKS[config.depth]
    growth = config.growth_rate if config.growth_rate is not None else default_growth
    init = config.width if config.width is not None else 2 * growth
    return DenseNetLayout(blocks=blocks, growth_rate=growth, init_features=init)
