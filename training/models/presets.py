"""Named configurations of the published networks: `preset("resnet56", num_classes=100)`."""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from training.models.config import ModelConfig
from training.models.errors import ModelConfigError

# torchvision VGG configurations A, B, D, E (Simonyan & Zisserman 2014): convs per stage.
_VGG_CONVS: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
_CIFAR = {"style": "cifar", "num_classes": 10}
# The seed model of the MNIST-1D chapter (Prince, "Understanding Deep Learning", notebook 10.2):
# three Conv1d(15 channels, kernel 3, stride 2, no padding)-ReLU, flatten, one linear layer.
# At length 40 the maps are 19, 9, 4 long; the adaptive pool to 4 is then the identity and the
# linear layer reads 4 x 15 = 60 features (2,050 parameters), while other lengths still work.
_MNIST1D_CNN = {
    "arch": "plain_cnn",
    "spatial_dims": 1,
    "in_channels": 1,
    "num_classes": 10,
    "channels": (15, 15, 15),
    "convs_per_stage": 1,
    "conv_stride": 2,
    "padding": "valid",
    "stage_pool": "none",
    "batch_norm": False,
    "hidden": (),
    "pool_size": 4,
}
_IMAGENET = {"style": "imagenet", "num_classes": 1000}


@cache
def _presets() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for depth in (20, 32, 44, 56, 110, 1202):  # He et al. 2015, sec. 4.2: option A
        table[f"resnet{depth}"] = {"arch": "resnet", "depth": depth, "shortcut": "A", **_CIFAR}
    for depth in (164, 1001):  # He et al. 2016: bottleneck, projection shortcuts
        table[f"resnet{depth}"] = {"arch": "resnet", "depth": depth, "block": "bottleneck", **_CIFAR}
    for depth in (20, 32, 44, 56, 110, 164, 1001):
        table[f"preact_resnet{depth}"] = {"arch": "preact_resnet", "depth": depth, **_CIFAR}
    for depth in (18, 34, 50, 101, 152, 200):
        table[f"resnet{depth}"] = {"arch": "resnet", "depth": depth, **_IMAGENET}
        table[f"preact_resnet{depth}"] = {"arch": "preact_resnet", "depth": depth, **_IMAGENET}
    table["plain_cnn"] = {"arch": "plain_cnn", "num_classes": 10}
    for depth, convs in _VGG_CONVS.items():
        vgg = {
            "arch": "plain_cnn",
            "channels": (64, 128, 256, 512, 512),
            "convs_per_stage": convs,
            "hidden": (4096, 4096),
            "pool_size": 7,
            "dropout": 0.5,
            "num_classes": 1000,
        }
        table[f"vgg{depth}"] = {**vgg, "batch_norm": False}
        table[f"vgg{depth}_bn"] = {**vgg, "batch_norm": True}
    # torchvision's definitions (and dropout rates) of the other classic ImageNet networks.
    table["alexnet"] = {"arch": "alexnet", "dropout": 0.5, "num_classes": 1000}
    table["googlenet"] = {"arch": "googlenet", "dropout": 0.2, "num_classes": 1000}
    for depth in (121, 161, 169, 201):
        table[f"densenet{depth}"] = {"arch": "densenet", "depth": depth, "num_classes": 1000}
    table["mnist1d_cnn"] = _MNIST1D_CNN
    return table


def preset_names() -> list[str]:
    """Names `preset` accepts, sorted."""
    return sorted(_presets())


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of a named network, with any fields replaced (validated together).

    CIFAR presets default to 10 classes, ImageNet ones (resnet18..200, vgg*, alexnet, googlenet,
    densenet*) to 1000; "mnist1d_cnn" is a 1-D net for [N, 1, 40] signals and 10 classes.
    """
    table = _presets()
    if name not in table:
        raise ModelConfigError(f"unknown model preset {name!r}; expected one of: {', '.join(preset_names())}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelConfigError(f"unknown model config keys for preset {name!r}: {', '.join(unknown)}")
    return ModelConfig(**{**table[name], **overrides})
