"""`cifar10`: the CIFAR-10 "python version" batches from a local folder (no download)."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.arrays import convert_channels, resize_images
from training.data.bundle import DataBundle, tensor_bundle
from training.data.spec import DataError, DataSpec

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
_SIDE = 32
_SUBDIR = "cifar-10-batches-py"  # the folder name inside the official archive

# The only globals a CIFAR batch pickle needs (numpy arrays, and bytes under protocol 2).
# numpy.core.* names come from the official files (written by numpy 1); numpy 2 moved them.
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Refuses every global outside `_ALLOWED_GLOBALS`, so a hostile file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        where, attr = target
        if where in ("multiarray", "numeric"):
            where = _numpy_core(where)
        return getattr(importlib.import_module(where), attr)


def _numpy_core(submodule: str) -> str:
    try:  # numpy >= 2
        importlib.import_module(f"numpy._core.{submodule}")
        return f"numpy._core.{submodule}"
    except ImportError:  # numpy 1.x
        return f"numpy.core.{submodule}"


def load_cifar10_bundle(spec: DataSpec) -> DataBundle:
    """CIFAR-10: test = `test_batch`; val carved (stratified) from the five training batches."""
    folder = _find_folder(Path(spec.path or "").expanduser())
    class_names = _read_meta(folder / META_FILE)
    train_parts = [_read_batch(folder / name, len(class_names)) for name in TRAIN_FILES]
    train_images = torch.cat([images for images, _ in train_parts])
    train_labels = torch.cat([labels for _, labels in train_parts])
    test_images, test_labels = _read_batch(folder / TEST_FILE, len(class_names))
    channels = spec.channels or 3
    return tensor_bundle(
        spec,
        pool=(_prepare(train_images, channels, spec.image_size), train_labels),
        test=(_prepare(test_images, channels, spec.image_size), test_labels),
        class_names=class_names,
        default_augment="cifar",
    )


def _prepare(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    return resize_images(convert_channels(images, channels), size)


def _find_folder(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"CIFAR-10 folder not found: {path}")
    if not (path / META_FILE).exists() and (path / _SUBDIR).is_dir():
        path = path / _SUBDIR  # accept the folder the archive was extracted into
    missing = [n for n in (*TRAIN_FILES, TEST_FILE, META_FILE) if not (path / n).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {path} lacks: {', '.join(missing)}")
    return path


def _unpickle(path: Path) -> dict[bytes, Any]:
    # pickle is the CIFAR-10 dataset's own file format; this reads DATA files only, never weights,
    # and through an unpickler that only admits numpy-array globals.
    try:
        with path.open("rb") as f:
            data = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"CIFAR-10 file {path} does not hold a dict (got {type(data).__name__})")
    return data


def _read_meta(path: Path) -> tuple[str, ...]:
    names = _unpickle(path).get(b"label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"CIFAR-10 file {path} has no valid b'label_names' list")
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


def _read_batch(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"CIFAR-10 file {path}: b'data' must be a uint8 [N, 3072] array")
    if data.shape[1] != 3 * _SIDE * _SIDE:
        raise DataError(f"CIFAR-10 file {path}: b'data' rows have {data.shape[1]} values, expected 3072")
    try:
        label_array = np.asarray(labels if labels is not None else [], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"CIFAR-10 file {path}: b'labels' is not a list of integers") from exc
    if label_array.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 file {path}: {label_array.size} labels for {data.shape[0]} images")
    if label_array.size and not 0 <= label_array.min() <= label_array.max() < num_classes:
        raise DataError(f"CIFAR-10 file {path}: labels outside 0..{num_classes - 1}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major: i.e. CHW.
    images = torch.from_numpy(data.reshape(-1, 3, _SIDE, _SIDE).copy())
    return images, torch.from_numpy(label_array)
