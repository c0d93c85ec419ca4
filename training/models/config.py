"""`ModelConfig`: the small JSON-able description of a network that `build_model` turns into one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from training.config_keys import checked_keys
from training.models.errors import ModelConfigError
from training.models.registry import COMMON_FIELDS, families_using, get_family

STYLES: tuple[str, ...] = ("cifar", "imagenet")
BLOCKS: tuple[str, ...] = ("basic", "bottleneck")
SHORTCUTS: tuple[str, ...] = ("A", "B", "C")
PADDINGS: tuple[str, ...] = ("same", "valid")
STAGE_POOLS: tuple[str, ...] = ("max", "none")
SPATIAL_DIMS: tuple[int, ...] = (1, 2)
_TUPLE_FIELDS = ("channels", "convs_per_stage", "hidden", "dilation")

__all__ = ["BLOCKS", "PADDINGS", "SHORTCUTS", "STAGE_POOLS", "STYLES", "ModelConfig", "ModelConfigError"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of one classifier. Input float [N, in_channels, H, W] (or [N, in_channels, L]
    with spatial_dims=1) -> logits [N, num_classes].

    `arch` picks the family. A family-specific field left at its default is ignored by the other
    families; set to anything else for a family that does not read it, it is an error (a typo
    guard). None means "the family's default", resolved at build time (see `layouts.py`), so a
    stored config never changes meaning when only other fields are replaced.
    """

    arch: str  # "plain_cnn" | "resnet" | "preact_resnet" | "alexnet" | "googlenet" | "densenet"
    # residual nets, densenet: required; plain_cnn, alexnet (8), googlenet (22): optional, must match
    depth: int | None = None
    num_classes: int = 10
    in_channels: int = 3
    dropout: float = 0.0  # before the final linear layer (plain_cnn: after each hidden FC, as VGG)
    # -- residual families (resnet, preact_resnet)
    style: str = "cifar"  # "cifar": 3x3 stem, 3 stages; "imagenet": 7x7/2 stem + max-pool, 4 stages
    block: str | None = None  # "basic" | "bottleneck"; None = inferred from depth and style
    # resnet: planes of the first stage (doubling per stage; None = 16 / 64); alexnet: channels of
    # the first conv (None = 64; the rest scale with it); googlenet: stem channels (None = 64;
    # every layer scales by width/64); densenet: stem channels (None = 2 x growth_rate)
    width: int | None = None
    shortcut: str | None = None  # "A" zero-pad, "B" project on shape change, "C" always project
    zero_init_residual: bool = False  # last BN gamma (v2: last conv) of each block starts at 0
    # Dilate the last stage(s) instead of striding (DeepLab's "output stride"): input size / final
    # map size, e.g. 16 or 8 for the imagenet style (natural 32). None = no dilation.
    output_stride: int | None = None
    # -- plain_cnn, resnet, preact_resnet
    spatial_dims: int = 2  # 2: images [N,C,H,W] (Conv2d); 1: signals [N,C,L] (Conv1d)
    # -- plain_cnn (VGG-style)
    channels: tuple[int, ...] = (32, 64, 128)  # output channels per stage (one 2x2 max-pool each)
    convs_per_stage: int | tuple[int, ...] = 2  # 3x3 convs per stage: one for all or one per stage
    batch_norm: bool = True
    hidden: tuple[int, ...] = (256,)  # hidden FC sizes of the head
    pool_size: int = 1  # side of the adaptive average pool before the head (VGG: 7)
    kernel_size: int = 3  # of every convolution
    conv_stride: int = 1  # of every convolution
    padding: str = "same"  # "same": dilation x (kernel_size-1)/2, size kept at stride 1; "valid": 0
    stage_pool: str = "max"  # "max": a 2x2/2 max-pool closes each stage; "none": no pooling
    dilation: int | tuple[int, ...] = 1  # one for every convolution, or one per convolution
    # -- googlenet
    aux_heads: bool = False  # the two auxiliary classifiers (training only; unused in eval/export)
    # -- densenet
    growth_rate: int | None = None  # channels each dense layer adds; None = 32 (densenet161: 48)

    def __post_init__(self) -> None:
        # JSON has no tuples: accept lists (from json.load or callers) and store tuples, so
        # configs stay hashable and equal after a round trip.
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise `ModelConfigError` naming the first bad field."""
        _check_types(self)
        family = get_family(self.arch)
        _check_common(self)
        _check_foreign_fields(self, family.fields)
        family.validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (tuples as lists)."""
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys raise `ModelConfigError` naming them."""
        checked_keys(cls, data, "model config", ModelConfigError, name_known=True)
        if "arch" not in data:
            raise ModelConfigError("a model config needs an 'arch'")
        return cls(**data)


def _check_common(config: ModelConfig) -> None:
    for name in ("num_classes", "in_channels", "pool_size", "kernel_size", "conv_stride"):
        value = getattr(config, name)
        if value < 1:
            raise ModelConfigError(f"{name}={value} must be a positive integer")
    for name in ("depth", "width", "output_stride", "growth_rate"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ModelConfigError(f"{name}={value} must be a positive integer (or left out)")
    if not 0.0 <= config.dropout < 1.0:
        raise ModelConfigError(f"dropout={config.dropout} must be in [0, 1)")
    _check_choice("style", config.style, STYLES)
    _check_choice("padding", config.padding, PADDINGS)
    _check_choice("stage_pool", config.stage_pool, STAGE_POOLS)
    if config.spatial_dims not in SPATIAL_DIMS:
        raise ModelConfigError(f"spatial_dims={config.spatial_dims} must be 1 (signals) or 2 (images)")
    if config.block is not None:
        _check_choice("block", config.block, BLOCKS)
    if config.shortcut is not None:
        _check_choice("shortcut", config.shortcut, SHORTCUTS)
    if not config.channels:
        raise ModelConfigError("channels=[] must name at least one stage")
    for name in _TUPLE_FIELDS:
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else (value,)
        if any(v < 1 for v in items):
            raise ModelConfigError(f"{name}={_show(value)} must hold positive integers only")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ModelConfigError(f"unknown {name} {value!r}; expected one of: {', '.join(choices)}")


def _check_foreign_fields(config: ModelConfig, family_fields: frozenset[str]) -> None:
    """A field the family does not read must keep its default: catches misplaced settings."""
    for field in dataclasses.fields(config):
        if field.name in COMMON_FIELDS or field.name in family_fields:
            continue
        value = getattr(config, field.name)
        if value != field.default:
            users = ", ".join(families_using(field.name)) or "no family"
            raise ModelConfigError(
                f"{field.name}={_show(value)} does not apply to arch {config.arch!r} (used by: {users})"
            )


_INT = (int,)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,),
    "depth": (int, type(None)),
    "num_classes": _INT,
    "in_channels": _INT,
    "dropout": (float, int),
    "style": (str,),
    "block": (str, type(None)),
    "width": (int, type(None)),
    "shortcut": (str, type(None)),
    "zero_init_residual": (bool,),
    "channels": (tuple,),
    "convs_per_stage": (int, tuple),
    "batch_norm": (bool,),
    "hidden": (tuple,),
    "pool_size": _INT,
    "output_stride": (int, type(None)),
    "spatial_dims": _INT,
    "kernel_size": _INT,
    "conv_stride": _INT,
    "padding": (str,),
    "stage_pool": (str,),
    "dilation": (int, tuple),
    "aux_heads": (bool,),
    "growth_rate": (int, type(None)),
}


def _check_types(config: ModelConfig) -> None:
    for name, types in _FIELD_TYPES.items():
        value = getattr(config, name)
        # bool is an int subclass: a JSON `true` must not pass as a size.
        bad_bool = isinstance(value, bool) and bool not in types
        if bad_bool or not isinstance(value, types):
            names = " or ".join(_type_name(t) for t in types)
            raise ModelConfigError(f"model config field {name}={_show(value)} must be {names}")
        if isinstance(value, tuple) and not all(_is_int(v) for v in value):
            raise ModelConfigError(f"model config field {name}={_show(value)} must hold integers only")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(t: type) -> str:
    return {type(None): "None", tuple: "a list of integers"}.get(t, t.__name__)


def _show(value: object) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)
