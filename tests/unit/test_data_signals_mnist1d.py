"""MNIST-1D generated locally by the mnist1d package's own `make_dataset`: determinism,
fingerprints, the kept test split, and no effect on anyone else's random state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.data import DataError, DataSpec, load_dataset
from training.data.mnist1d import generate_mnist1d

SMALL = 200  # samples: 160 train / 40 test, enough to split 10 classes


def test_generation_is_deterministic_and_leaves_global_rngs_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    first, args = generate_mnist1d(SMALL)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    second, _ = generate_mnist1d(SMALL)
    for key in ("x", "y", "x_test", "y_test"):
        assert np.array_equal(first[key], second[key]), key
    assert first["x"].shape == (160, 40) and first["x_test"].shape == (40, 40)
    assert args["num_samples"] == SMALL and args["seed"] == 42 and args["final_seq_length"] == 40
    assert "url" not in args


def test_default_arguments_are_the_published_ones() -> None:
    from mnist1d.data import get_dataset_args

    defaults = get_dataset_args(as_dict=True)
    assert (defaults["num_samples"], defaults["train_split"], defaults["seed"]) == (5000, 0.8, 42)


def test_bundle_keeps_the_generators_test_split() -> None:
    spec = DataSpec(name="mnist1d", mnist1d_samples=SMALL, seed=3)
    bundle = load_dataset(spec)
    data, _ = generate_mnist1d(SMALL)
    assert (bundle.layout, bundle.input_shape, bundle.input_scale) == ("NCL", (1, 40), 1.0)
    assert bundle.class_names == tuple(str(d) for d in range(10)) and bundle.augment == "shift"
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (144, 16, 40)
    assert torch.equal(bundle.test.signals[:, 0], torch.from_numpy(data["x_test"].astype(np.float32)))
    assert bundle.test.labels.tolist() == data["y_test"].tolist()
    pool = torch.cat([bundle.train.signals, bundle.val.signals])[:, 0]
    assert sorted(map(tuple, pool.tolist())) == sorted(map(tuple, data["x"].astype(np.float32).tolist()))
    # The generator standardises the whole set: the train statistics are close to (0, 1).
    assert abs(bundle.mean[0]) < 0.1 and abs(bundle.std[0] - 1) < 0.1


def test_fingerprint_is_stable_and_tracks_split_and_size() -> None:
    first = load_dataset(DataSpec(name="mnist1d", mnist1d_samples=SMALL))
    assert load_dataset(DataSpec(name="mnist1d", mnist1d_samples=SMALL)).fingerprint == first.fingerprint
    assert (
        load_dataset(DataSpec(name="mnist1d", mnist1d_samples=SMALL, seed=1)).fingerprint != first.fingerprint
    )
    assert load_dataset(DataSpec(name="mnist1d", mnist1d_samples=300)).fingerprint != first.fingerprint


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mnist1d_samples": 95}, "mnist1d_samples=95 must be a multiple of 10 and at least 100"),
        ({"mnist1d_samples": 50}, "mnist1d_samples=50"),
        ({"channels": 3}, "channels=3: mnist1d signals have 1 channel"),
        ({"path": "/tmp/mnist1d.pkl"}, "takes no path"),
        ({"augment": "digits"}, "unknown augment policy 'digits' for dataset 'mnist1d'"),
    ],
)
def test_bad_mnist1d_specs(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(DataError) as info:
        DataSpec(name="mnist1d", **kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_default_set_is_4000_train_1000_test_of_length_40() -> None:
    bundle = load_dataset(DataSpec(name="mnist1d"))
    assert len(bundle.train) + len(bundle.val) == 4000 and len(bundle.test) == 1000
    assert bundle.test.signals.shape == (1000, 1, 40)
    assert bundle.test.labels.bincount(minlength=10).min() > 50
