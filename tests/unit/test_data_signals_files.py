"""The generic signal reader (`signals`: .npz and CSV files the tests write), the signal bundle,
and the signal augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    DataBundle,
    DataError,
    DataSpec,
    TensorSignalDataset,
    augment_for,
    load_dataset,
    make_signal_augment,
)
from training.data.signal_files import encode_labels, read_signal_file


def _signals(n: int, channels: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = rng.normal(size=(n, channels, length)) + labels[:, None, None]  # class shifts the mean
    return x, labels


def _write_csv(path: Path, x: np.ndarray, labels: list[str], label_first: bool = True) -> None:
    n, channels, length = x.shape
    names = [f"c{c}_t{t}" for c in range(channels) for t in range(length)]
    header = ["label", *names] if label_first else [*names, "label"]
    rows = [",".join(header)]
    for row, label in zip(x.reshape(n, -1), labels, strict=True):
        values = [repr(float(v)) for v in row]
        rows.append(",".join([label, *values] if label_first else [*values, label]))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_npz_bundle_describes_signals(tmp_path: Path) -> None:
    x, y = _signals(60, 2, 50)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    bundle = load_dataset(DataSpec(name="signals", path=str(tmp_path / "set.npz"), seed=1))
    assert isinstance(bundle, DataBundle) and bundle.is_signal
    assert (bundle.layout, bundle.signal_length, bundle.in_channels) == ("NCL", 50, 2)
    assert bundle.input_shape == (2, 50) and bundle.image_size is None and bundle.channel_order is None
    assert bundle.input_scale == 1.0 and bundle.class_names == ("0", "1", "2") and bundle.augment == "none"
    sizes = [len(s) for s in (bundle.train, bundle.val, bundle.test)]
    assert sum(sizes) == 60 and sizes[1] == 6 and sizes[2] == 12
    assert isinstance(bundle.train, TensorSignalDataset) and bundle.train.images is bundle.train.signals
    signal, label = bundle.test[0]
    assert signal.dtype == torch.float32 and signal.shape == (2, 50) and isinstance(label, int)
    everything = torch.cat([s.signals for s in (bundle.train, bundle.val, bundle.test)])
    assert sorted(everything.flatten().tolist()) == pytest.approx(
        sorted(x.astype(np.float32).flatten().tolist())
    )
    train = bundle.train.signals.double()
    assert bundle.mean == pytest.approx(train.mean(dim=(0, 2)).tolist())
    assert bundle.std == pytest.approx(train.std(dim=(0, 2), correction=0).tolist())
    again = load_dataset(DataSpec(name="signals", path=str(tmp_path / "set.npz"), seed=1))
    other = load_dataset(DataSpec(name="signals", path=str(tmp_path / "set.npz"), seed=2))
    assert again.fingerprint == bundle.fingerprint != other.fingerprint


def test_npz_with_test_split_and_class_names(tmp_path: Path) -> None:
    x, y = _signals(30, 1, 40)
    xt, yt = _signals(9, 1, 40, seed=1)
    np.savez(
        tmp_path / "s.npz", x=x[:, 0], y=y, x_test=xt[:, 0], y_test=yt, class_names=np.array(["a", "b", "c"])
    )
    bundle = load_dataset(DataSpec(name="signals", path=str(tmp_path / "s.npz")))
    assert bundle.class_names == ("a", "b", "c") and bundle.input_shape == (1, 40)
    assert len(bundle.test) == 9 and len(bundle.train) + len(bundle.val) == 30
    assert torch.equal(bundle.test.signals[:, 0], torch.from_numpy(xt[:, 0].astype(np.float32)))
    assert bundle.test.labels.tolist() == yt.tolist()


@pytest.mark.parametrize("label_first", [True, False])
def test_csv_channel_major_rows_and_string_labels(tmp_path: Path, label_first: bool) -> None:
    x, y = _signals(45, 2, 8)
    names = ["walk", "run", "sit"]
    _write_csv(tmp_path / "s.csv", x, [names[k] for k in y], label_first)
    arrays = read_signal_file(tmp_path / "s.csv", channels=2)
    assert arrays.x.shape == (45, 2, 8) and arrays.x.dtype == np.float32
    np.testing.assert_allclose(arrays.x, x.astype(np.float32))
    bundle = load_dataset(DataSpec(name="signals", path=str(tmp_path / "s.csv"), channels=2, augment="shift"))
    assert bundle.class_names == ("run", "sit", "walk") and bundle.input_shape == (2, 8)
    assert bundle.augment == "shift"


def test_integer_labels_sort_numerically() -> None:
    encoded, test, names = encode_labels(np.array(["10", "9", "2", "10"]), np.array(["2"]), None)
    assert names == ("2", "9", "10") and encoded.tolist() == [2, 1, 0, 2] and test.tolist() == [0]
    _, _, names = encode_labels(np.array(["07", "7"]), None, None)  # not canonical: names
    assert names == ("07", "7")
    with pytest.raises(DataError, match=r"test labels \['x'\] do not occur"):
        encode_labels(np.array(["a", "b"]), np.array(["x"]), None)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((4, 5))}, "lacks array(s) y"),
        ({"x": np.zeros((4, 5)), "y": np.zeros(3, dtype=int)}, "must be [N=4] labels"),
        ({"x": np.zeros((4, 5)), "y": np.zeros(4)}, "must hold integers or strings, got dtype float64"),
        ({"x": np.zeros((4, 2, 2, 2)), "y": np.zeros(4, dtype=int)}, "must be [N, L] or [N, C, L]"),
        ({"x": np.full((4, 5), np.nan), "y": np.arange(4)}, "NaN or infinite value (sample 0)"),
        ({"x": np.array([["a"] * 5] * 4), "y": np.arange(4)}, "must hold real numbers"),
        ({"x": np.zeros((4, 5)), "y": np.arange(4), "x_test": np.zeros((2, 5))}, "both x_test and y_test"),
        ({"x": np.zeros((4, 5)), "y": np.zeros(4, dtype=int)}, "at least 2 classes, found 1"),
        (
            {"x": np.zeros((4, 5)), "y": np.arange(4) % 2, "class_names": np.array(["a"])},
            "does not fit 1 class_names",
        ),
    ],
)
def test_bad_npz_files(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(name="signals", path=str(path)))
    assert needle in str(info.value)


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.zeros((4, 5)), y=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(DataError, match="plain arrays"):
        read_signal_file(path)


@pytest.mark.parametrize(
    ("text", "kwargs", "needle"),
    [
        ("a,b\n1,2\n", {}, "no label column 'label'"),
        ("label,a,b\nx,1,oops\n", {}, "column 'b' is not numeric"),
        ("label,a,b\nx,1,\ny,2,3\n", {}, "column 'b' has 1 empty value(s)"),
        ("label,a,b,c\nx,1,2,3\n", {"channels": 2}, "3 value columns do not split into channels=2"),
        ("label\nx\n", {}, "at least one row and one value column"),
        ("klass,a\nx,1\ny,2\n", {"label_column": "class"}, "no label column 'class'"),
    ],
)
def test_bad_csv_files(tmp_path: Path, text: str, kwargs: dict[str, object], needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_signal_file(path, **kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_file_and_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_signal_file(tmp_path / "missing.npz")
    (tmp_path / "s.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"must end in \.npz or \.csv, not '\.txt'"):
        read_signal_file(tmp_path / "s.txt")
    x, y = _signals(12, 2, 5)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    with pytest.raises(DataError, match="signals have 2 channels, but channels=3"):
        read_signal_file(tmp_path / "s.npz", channels=3)
    with pytest.raises(DataError, match="needs a path"):
        DataSpec(name="signals")
    with pytest.raises(DataError, match="unknown augment policy 'cifar' for dataset 'signals'"):
        DataSpec(name="signals", path="x.npz", augment="cifar")
    with pytest.raises(DataError, match="unknown augment policy 'shift' for dataset 'digits'"):
        DataSpec(name="digits", augment="shift")
    assert DataSpec(name="signals", path="x.csv", channels=12).channels == 12


def test_shift_augment_rolls_each_signal_deterministically() -> None:
    augment = make_signal_augment("shift", 40)
    x = torch.arange(40, dtype=torch.float32).repeat(6, 2, 1)  # [6, 2, 40], both channels 0..39
    out = augment(x, torch.Generator().manual_seed(5))
    again = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(out, again) and out.shape == x.shape
    shifts = set()
    for row in out:
        assert torch.equal(row[0], row[1])  # channels move together
        shift = int((-row[0, 0]).remainder(40))  # the value now at position 0 was at -shift
        assert torch.equal(row[0], torch.roll(x[0, 0], shift))
        assert shift <= 4 or shift >= 36  # at most 10 % of the length either way
        shifts.add(shift)
    assert len(shifts) > 1
    assert torch.equal(make_signal_augment("none", 40)(x, torch.Generator()), x)


def test_signal_augment_errors_and_dispatch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown signal augment policy 'cifar'"):
        make_signal_augment("cifar", 40)
    with pytest.raises(DataError, match="made for length 40, got length 41"):
        make_signal_augment("shift", 40)(torch.zeros(2, 1, 41), torch.Generator())
    with pytest.raises(DataError, match=r"float \[N,C,L\] batch"):
        make_signal_augment("none", 40)(torch.zeros(2, 1, 4, 40), torch.Generator())
    x, y = _signals(30, 1, 16)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    bundle = load_dataset(DataSpec(name="signals", path=str(tmp_path / "s.npz"), augment="shift"))
    batch = bundle.train.signals[:4]
    assert torch.equal(
        augment_for(bundle)(batch, torch.Generator().manual_seed(1)),
        make_signal_augment("shift", 16)(batch, torch.Generator().manual_seed(1)),
    )
