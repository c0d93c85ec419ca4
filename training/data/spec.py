"""`DataSpec`: the JSON-able description of a dataset and its split, and `DataError`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from training.config_keys import checked_keys

DATASET_NAMES: tuple[str, ...] = ("cifar10", "digits", "imagefolder", "mnist1d", "signals", "synthetic")
# Sets of fixed-length signals [C, L] (layout NCL) rather than images.
SIGNAL_DATASETS = frozenset({"mnist1d", "signals"})
AUGMENT_POLICIES: tuple[str, ...] = ("none", "digits", "cifar", "imagenet")
SIGNAL_AUGMENT_POLICIES: tuple[str, ...] = ("none", "shift")
_NEEDS_PATH = frozenset({"cifar10", "imagefolder", "signals"})
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
MNIST1D_CLASSES = 10


class DataError(ValueError):
    """A dataset cannot be specified, found, read or split; the message names the bad value."""


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """What to load and how to split it. Everything that changes the data is in here.

    Fields used by one set only are ignored by the others (and documented per field).
    """

    name: str = "digits"
    # cifar10: folder of python batches; imagefolder: root folder; signals: a .npz or .csv file
    path: str | None = None
    image_size: int = 32  # square side after resize (+ centre crop for image folders)
    val_fraction: float = 0.1  # of all images (cifar10: of the training batches)
    test_fraction: float = 0.2  # of all images (ignored by cifar10 and by folders with test/)
    seed: int = 0  # drives the split (and the synthetic images; not mnist1d's generator: 42)
    # Images: 1 or 3; None = the set's own (digits/synthetic 1, others 3). signals: channels of
    # each sample (CSV rows hold C x L values, channel-major; npz: must match x); mnist1d: 1.
    channels: int | None = None
    num_classes: int = 10  # synthetic only
    num_samples: int = 1000  # synthetic only: images over all splits
    augment: str | None = None  # augmentation policy; None = the one suited to the set
    in_memory: bool | None = None  # imagefolder: decode everything at load; None = when small
    stats_samples: int = 2000  # imagefolder lazy sets: train images sampled for mean/std
    mnist1d_samples: int | None = None  # mnist1d: samples generated (None = its default 5000)
    label_column: str = "label"  # signals CSV: the column holding the class (names or integers)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `DataError` naming the first bad field."""
        _check_types(self)
        if self.name not in DATASET_NAMES:
            raise DataError(
                f"unknown dataset name {self.name!r}; expected one of: {', '.join(DATASET_NAMES)}"
            )
        if self.name in _NEEDS_PATH and not self.path:
            raise DataError(f"dataset {self.name!r} needs a path (a local folder)")
        if self.name not in _NEEDS_PATH and self.path is not None:
            raise DataError(f"dataset {self.name!r} takes no path (got path={self.path!r})")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise DataError(
                f"image_size={self.image_size} is out of range [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"
            )
        for field in ("val_fraction", "test_fraction"):
            value = getattr(self, field)
            if not 0.0 < value < 1.0:
                raise DataError(f"{field}={value} must be strictly between 0 and 1")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DataError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "must be below 1 (nothing would be left to train on)"
            )
        _check_channels(self)
        if not 2 <= self.num_classes <= 1000:
            raise DataError(f"num_classes={self.num_classes} is out of range [2, 1000]")
        if self.num_samples < 3 * self.num_classes:
            raise DataError(
                f"num_samples={self.num_samples} is too small: need at least 3 per class "
                f"({3 * self.num_classes} for num_classes={self.num_classes})"
            )
        policies = SIGNAL_AUGMENT_POLICIES if self.is_signal else AUGMENT_POLICIES
        if self.augment is not None and self.augment not in policies:
            raise DataError(
                f"unknown augment policy {self.augment!r} for dataset {self.name!r}; "
                f"expected one of: {', '.join(policies)}"
            )
        if self.stats_samples < 1:
            raise DataError(f"stats_samples={self.stats_samples} must be at least 1")
        _check_mnist1d_samples(self.mnist1d_samples)
        if not self.label_column:
            raise DataError("label_column='' must name a CSV column")

    @property
    def is_signal(self) -> bool:
        """True for sets of fixed-length signals [C, L] (mnist1d, signals), False for images."""
        return self.name in SIGNAL_DATASETS

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        """Inverse of `to_dict`; unknown keys raise `DataError` naming them."""
        return cls(**checked_keys(cls, data, "data spec", DataError))

    def split_params(self) -> dict[str, Any]:
        """The fields that decide which images land in which split, at what size (for fingerprints)."""
        params: dict[str, Any] = {
            "name": self.name,
            "image_size": self.image_size,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "channels": self.channels,
        }
        if self.name == "synthetic":
            params |= {"num_classes": self.num_classes, "num_samples": self.num_samples}
        if self.name == "mnist1d":
            params["mnist1d_samples"] = self.mnist1d_samples
        if self.name == "signals":
            params["label_column"] = self.label_column
        if self.is_signal:
            del params["image_size"]  # no meaning for signals; their length is in the data
        return params


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "path": (str, type(None)),
    "image_size": (int,),
    "val_fraction": (float, int),
    "test_fraction": (float, int),
    "seed": (int,),
    "channels": (int, type(None)),
    "num_classes": (int,),
    "num_samples": (int,),
    "augment": (str, type(None)),
    "in_memory": (bool, type(None)),
    "stats_samples": (int,),
    "mnist1d_samples": (int, type(None)),
    "label_column": (str,),
}


def _check_channels(spec: DataSpec) -> None:
    if spec.channels is None:
        return
    if spec.name == "signals":
        if spec.channels < 1:
            raise DataError(f"channels={spec.channels} must be a positive integer")
    elif spec.name == "mnist1d":
        if spec.channels != 1:
            raise DataError(f"channels={spec.channels}: mnist1d signals have 1 channel")
    elif spec.channels not in (1, 3):
        raise DataError(f"channels={spec.channels} must be 1, 3 or None")


def _check_mnist1d_samples(samples: int | None) -> None:
    # make_dataset makes samples // 10 per digit; 10 per digit keeps every class in each split.
    if samples is not None and (samples < 10 * MNIST1D_CLASSES or samples % MNIST1D_CLASSES):
        raise DataError(
            f"mnist1d_samples={samples} must be a multiple of {MNIST1D_CLASSES} and at least "
            f"{10 * MNIST1D_CLASSES}"
        )


def _check_types(spec: DataSpec) -> None:
    for field, types in _FIELD_TYPES.items():
        value = getattr(spec, field)
        # bool is an int subclass; a JSON `true` must not pass as a size or a seed.
        bad_bool = isinstance(value, bool) and bool not in types
        if bad_bool or not isinstance(value, types):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise DataError(f"data spec field {field}={value!r} must be {names}")
