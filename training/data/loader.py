"""`load_dataset`: one entry point from a `DataSpec` to a `DataBundle`."""

from __future__ import annotations

from collections.abc import Callable

from training.data.bundle import DataBundle
from training.data.spec import DATASET_NAMES, DataError, DataSpec


def _readers() -> dict[str, Callable[[DataSpec], DataBundle]]:
    # Imported here so that importing training.data does not pull in every reader's dependencies.
    from training.data.cifar import load_cifar10_bundle
    from training.data.digits import load_digits_bundle
    from training.data.imagefolder import load_imagefolder_bundle
    from training.data.mnist1d import load_mnist1d_bundle
    from training.data.signal_files import load_signals_bundle
    from training.data.synthetic import load_synthetic_bundle

    return {
        "cifar10": load_cifar10_bundle,
        "digits": load_digits_bundle,
        "imagefolder": load_imagefolder_bundle,
        "mnist1d": load_mnist1d_bundle,
        "signals": load_signals_bundle,
        "synthetic": load_synthetic_bundle,
    }


def load_dataset(spec: DataSpec) -> DataBundle:
    """Load, split and describe the dataset `spec` names. Raises `DataError` on any bad input."""
    if not isinstance(spec, DataSpec):
        raise DataError(f"load_dataset needs a DataSpec, got {type(spec).__name__}")
    reader = _readers().get(spec.name)
    if reader is None:  # unreachable for a validated spec; kept for a clear message
        raise DataError(f"unknown dataset name {spec.name!r}; expected one of: {', '.join(DATASET_NAMES)}")
    return reader(spec)
