"""`signals`: a generic reader of fixed-length signals from a .npz or a CSV file.

.npz (read with allow_pickle=False): `x` [N, L] or [N, C, L] numbers, `y` [N] integer or string
labels; optionally `x_test` + `y_test` (a given test split) and `class_names` [K] (then `y`
holds indices 0..K-1).
.csv: a header row, one row per sample; the `label_column` holds the class (names or
integers), every other column one value, channel-major when `channels` > 1 (all L values of
channel 0, then channel 1, ...), in file order.
Labels other than given indices are sorted (numerically when all are integers) into classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data.bundle import DataBundle, tensor_bundle
from training.data.signals import check_signals
from training.data.spec import DataError, DataSpec


@dataclass(frozen=True, kw_only=True)
class SignalArrays:
    """What a signal file holds, before splitting: float32 [N,C,L] and raw labels [N]."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None


def load_signals_bundle(spec: DataSpec) -> DataBundle:
    """Read `spec.path` (.npz or .csv), encode the labels, split stratified into a bundle."""
    arrays = read_signal_file(Path(str(spec.path)), label_column=spec.label_column, channels=spec.channels)
    labels, test_labels, class_names = encode_labels(arrays.y, arrays.y_test, arrays.class_names)
    test = None
    if arrays.x_test is not None and test_labels is not None:
        test = (torch.from_numpy(arrays.x_test), torch.from_numpy(test_labels))
    return tensor_bundle(
        spec,
        pool=(torch.from_numpy(arrays.x), torch.from_numpy(labels)),
        test=test,
        class_names=class_names,
        default_augment="none",  # shifting or flipping is not safe for every kind of signal
    )


def read_signal_file(path: Path, *, label_column: str = "label", channels: int | None = None) -> SignalArrays:
    """Read a .npz or .csv signal file (see the module docstring); `DataError` names what is wrong."""
    if not path.is_file():
        raise DataError(f"signal file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix == ".csv":
        arrays = _read_csv(path, label_column, channels or 1)
    else:
        raise DataError(f"signal file {path} must end in .npz or .csv, not {suffix or 'nothing'!r}")
    if channels is not None and arrays.x.shape[1] != channels:
        raise DataError(f"{path}: signals have {arrays.x.shape[1]} channels, but channels={channels}")
    return arrays


def _read_npz(path: Path) -> SignalArrays:
    try:
        with np.load(path, allow_pickle=False) as data:
            found = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:  # ValueError: object arrays (pickles) or a corrupt file
        raise DataError(f"cannot read {path} as a .npz of plain arrays: {exc}") from exc
    missing = [key for key in ("x", "y") if key not in found]
    if missing:
        raise DataError(f"{path} lacks array(s) {', '.join(missing)} (has: {', '.join(sorted(found))})")
    if ("x_test" in found) != ("y_test" in found):
        raise DataError(f"{path} must hold both x_test and y_test, or neither")
    x = check_signals(found["x"], f"{path}: x")
    y = _check_labels(found["y"], x.shape[0], f"{path}: y")
    x_test = y_test = None
    if "x_test" in found:
        x_test = check_signals(found["x_test"], f"{path}: x_test")
        y_test = _check_labels(found["y_test"], x_test.shape[0], f"{path}: y_test")
    names = None
    if "class_names" in found:
        names = tuple(str(n) for n in np.asarray(found["class_names"]).reshape(-1))
    return SignalArrays(x=x, y=y, x_test=x_test, y_test=y_test, class_names=names)


def _read_csv(path: Path, label_column: str, channels: int) -> SignalArrays:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        options = pacsv.ConvertOptions(column_types={label_column: pa.string()})
        table = pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read {path} as CSV: {exc}") from exc
    if label_column not in table.column_names:
        raise DataError(
            f"{path} has no label column {label_column!r} (columns: {', '.join(table.column_names[:8])}"
            f"{', ...' if table.num_columns > 8 else ''})"
        )
    value_columns = [name for name in table.column_names if name != label_column]
    if not value_columns or table.num_rows == 0:
        raise DataError(f"{path} must hold at least one row and one value column besides {label_column!r}")
    if len(value_columns) % channels:
        raise DataError(f"{path}: {len(value_columns)} value columns do not split into channels={channels}")
    for name in value_columns:
        column = table.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise DataError(f"{path}: column {name!r} is not numeric (read as {column.type})")
        if column.null_count:
            raise DataError(f"{path}: column {name!r} has {column.null_count} empty value(s)")
    labels = table.column(label_column)
    if labels.null_count:
        raise DataError(f"{path}: label column {label_column!r} has {labels.null_count} empty value(s)")
    x = np.column_stack([table.column(name).to_numpy() for name in value_columns])
    x = x.reshape(table.num_rows, channels, len(value_columns) // channels)
    y = np.asarray(labels.to_pylist(), dtype=str)
    return SignalArrays(x=check_signals(x, str(path)), y=y)


def _check_labels(labels: np.ndarray, count: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # a column vector is a common export shape
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != count:
        raise DataError(f"{what} must be [N={count}] labels, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype.kind in "US"):
        raise DataError(f"{what} must hold integers or strings, got dtype {labels.dtype}")
    return labels


def encode_labels(
    y: np.ndarray, y_test: np.ndarray | None, class_names: tuple[str, ...] | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    """int64 class indices for train (+ test) labels and the class names, in index order.

    With `class_names` the labels must already be indices below their count. Otherwise the
    distinct training labels, sorted (numerically when all are integers), are the classes; a
    test label outside them is an error.
    """
    if class_names is not None:
        return (
            _given_indices(y, class_names),
            None if y_test is None else _given_indices(y_test, class_names),
            class_names,
        )
    keys = _sort_keys(y)
    classes = sorted(set(keys.tolist()))
    if len(classes) < 2:
        raise DataError(f"signal labels must name at least 2 classes, found {len(classes)}")
    index = {value: i for i, value in enumerate(classes)}
    encoded = np.asarray([index[k] for k in keys.tolist()], dtype=np.int64)
    encoded_test = None
    if y_test is not None:
        test_keys = _sort_keys(y_test).tolist()
        unknown = sorted({k for k in test_keys if k not in index}, key=str)
        if unknown:
            raise DataError(f"test labels {unknown[:5]} do not occur in the training labels")
        encoded_test = np.asarray([index[k] for k in test_keys], dtype=np.int64)
    return encoded, encoded_test, tuple(str(c) for c in classes)


def _sort_keys(labels: np.ndarray) -> np.ndarray:
    """Labels as sortable keys: integers (also from all-integer strings) or strings."""
    if np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64)
    values = labels.astype(str).tolist()
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        return labels.astype(str)
    # "07" and "7" are different names: only canonical integers sort as numbers.
    if all(str(n) == v for n, v in zip(numbers, values, strict=True)):
        return np.asarray(numbers, dtype=np.int64)
    return labels.astype(str)


def _given_indices(labels: np.ndarray, class_names: tuple[str, ...]) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"with class_names the labels must be integer indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"labels range {int(labels.min())}..{int(labels.max())} does not fit "
            f"{len(class_names)} class_names"
        )
    return labels.astype(np.int64)
