"""Family registry: arch name -> how to validate a config and (lazily) build the module.

A family is its validator (pure), the config fields it reads, and a module exposing
`build(config) -> torch.nn.Module`. The module is imported only when a model is built, so
configs validate without torch. New families plug in with `register_family` plus, where they
need them, new `ModelConfig` fields.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.models.classic_layouts import alexnet_width, densenet_layout, googlenet_width
from training.models.errors import ModelConfigError
from training.models.layouts import plain_layout, resnet_layout

if TYPE_CHECKING:
    import torch

    from training.models.config import ModelConfig

# Fields every family reads; any other field must keep its default unless the family lists it.
COMMON_FIELDS = frozenset({"arch", "depth", "num_classes", "in_channels", "dropout"})
RESNET_FIELDS = frozenset(
    {"style", "block", "width", "shortcut", "zero_init_residual", "output_stride", "spatial_dims"}
)
PLAIN_FIELDS = frozenset(
    {
        "channels",
        "convs_per_stage",
        "batch_norm",
        "hidden",
        "pool_size",
        "spatial_dims",
        "kernel_size",
        "conv_stride",
        "padding",
        "stage_pool",
        "dilation",
    }
)
ALEXNET_FIELDS = frozenset({"width"})
GOOGLENET_FIELDS = frozenset({"width", "aux_heads"})
DENSENET_FIELDS = frozenset({"width", "growth_rate"})


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """One model family of the zoo."""

    name: str  # the config's `arch`
    module: str  # importable module with `build(config: ModelConfig) -> torch.nn.Module`
    fields: frozenset[str]  # family-specific ModelConfig fields (beyond COMMON_FIELDS)
    validate: Callable[[ModelConfig], object]  # raises ModelConfigError naming the bad value
    summary: str = ""


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, *, replace: bool = False) -> None:
    """Add a family; registering a taken name raises unless `replace` is set (tests, plugins)."""
    if spec.name in _FAMILIES and not replace:
        raise ValueError(f"model family {spec.name!r} is already registered")
    _FAMILIES[spec.name] = spec


def family_names() -> list[str]:
    """Registered arch names, sorted."""
    return sorted(_FAMILIES)


def get_family(arch: str) -> FamilySpec:
    """The family registered as `arch`; unknown names raise `ModelConfigError` listing the known."""
    try:
        return _FAMILIES[arch]
    except KeyError:
        raise ModelConfigError(
            f"unknown arch {arch!r}; expected one of: {', '.join(family_names())}"
        ) from None


def families_using(field: str) -> list[str]:
    """Names of the families that read a family-specific config field."""
    return [name for name, spec in sorted(_FAMILIES.items()) if field in spec.fields]


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Build the network a (validated) config describes: weights freshly initialised, train mode.

    Works under `with torch.device("meta"):` too (no memory: for counting big models).
    """
    spec = get_family(config.arch)
    spec.validate(config)  # cheap; guards configs whose fields were mutated behind the dataclass
    module = importlib.import_module(spec.module)
    return module.build(config)


register_family(
    FamilySpec(
        name="plain_cnn",
        module="training.models.plain_cnn",
        fields=PLAIN_FIELDS,
        validate=plain_layout,
        summary="VGG-style: 3x3 conv stages + max-pool, adaptive pool, FC head",
    )
)
register_family(
    FamilySpec(
        name="resnet",
        module="training.models.resnet",
        fields=RESNET_FIELDS,
        validate=resnet_layout,
        summary="ResNet v1 (torchvision layout, stride on the bottleneck 3x3: v1.5)",
    )
)
register_family(
    FamilySpec(
        name="preact_resnet",
        module="training.models.preact_resnet",
        fields=RESNET_FIELDS,
        validate=resnet_layout,
        summary="ResNet v2, pre-activation (He et al. 2016)",
    )
)
register_family(
    FamilySpec(
        name="alexnet",
        module="training.models.alexnet",
        fields=ALEXNET_FIELDS,
        validate=alexnet_width,
        summary="AlexNet as torchvision (Krizhevsky 2014 one-GPU variant, no LRN)",
    )
)
register_family(
    FamilySpec(
        name="googlenet",
        module="training.models.googlenet",
        fields=GOOGLENET_FIELDS,
        validate=googlenet_width,
        summary="GoogLeNet / Inception v1 as torchvision (BN after each conv, optional aux heads)",
    )
)
register_family(
    FamilySpec(
        name="densenet",
        module="training.models.densenet",
        fields=DENSENET_FIELDS,
        validate=densenet_layout,
        summary="DenseNet-BC 121/161/169/201 as torchvision (BN-ReLU-conv dense layers)",
    )
)
