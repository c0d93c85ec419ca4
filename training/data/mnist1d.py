"""`mnist1d`: MNIST-1D (Greydanus 2020), generated locally by the `mnist1d` package's own
`make_dataset` with its default arguments (5,000 signals of length 40, 4,000 train / 1,000 test,
generator seed 42); its download path is never used.

The generator's own train/test split is kept: val is carved (stratified, `spec.seed`) from its
4,000 training signals, so the test set is the published one. The generator seeds NumPy's and
Python's global random state; both are restored afterwards, so loading the set has no effect
on other code's random numbers.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from training.data.bundle import DataBundle, tensor_bundle
from training.data.signals import check_signals
from training.data.spec import MNIST1D_CLASSES, DataError, DataSpec


def load_mnist1d_bundle(spec: DataSpec) -> DataBundle:
    """Generate MNIST-1D ([N, 1, 40] float32) and split val from its training part."""
    data, args = generate_mnist1d(spec.mnist1d_samples)
    train = (torch.from_numpy(check_signals(data["x"], "mnist1d x")), _labels(data["y"]))
    test = (torch.from_numpy(check_signals(data["x_test"], "mnist1d x_test")), _labels(data["y_test"]))
    return tensor_bundle(
        spec,
        pool=train,
        test=test,
        class_names=tuple(str(d) for d in range(MNIST1D_CLASSES)),
        # Position is the main nuisance the generator adds (it translates every digit), so a
        # small random shift is label-preserving; "none" reproduces the published protocol.
        default_augment="shift",
        extra_params={"generator": args},
    )


def generate_mnist1d(num_samples: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dict `mnist1d.data.make_dataset` returns (x, y, x_test, y_test, t, templates) and the
    arguments it ran with (its defaults, `num_samples` replaced when given)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from exc
    args = get_dataset_args()
    if num_samples is not None:
        args.num_samples = num_samples
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    recorded = {k: v for k, v in vars(args).items() if k != "url"}  # the URL is never used
    return data, recorded


def _labels(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int64))
