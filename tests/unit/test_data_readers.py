"""Readers of training.data on data the tests write: digits, synthetic, CIFAR-10 batches, image folders."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DataBundle, DataError, DataSpec, ImageFileDataset, TensorImageDataset, load_dataset
from training.data.arrays import stratified_split

# ----------------------------------------------------------------------------- spec


def test_spec_round_trips_through_json() -> None:
    spec = DataSpec(name="synthetic", image_size=16, seed=3, num_classes=4, num_samples=40, channels=3)
    again = DataSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "mnist"}, "unknown dataset name 'mnist'"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"test_fraction": 1.0}, "test_fraction=1.0"),
        ({"val_fraction": -0.1}, "val_fraction=-0.1"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction + test_fraction"),
        ({"image_size": 4}, "image_size=4"),
        ({"image_size": True}, "image_size=True"),
        ({"channels": 2}, "channels=2"),
        ({"name": "cifar10"}, "needs a path"),
        ({"name": "imagefolder", "path": ""}, "needs a path"),
        ({"path": "/tmp/x"}, "takes no path"),
        ({"augment": "mixup"}, "unknown augment policy 'mixup'"),
        ({"name": "synthetic", "num_classes": 10, "num_samples": 20}, "num_samples=20"),
    ],
)
def test_spec_rejects_bad_values(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(DataError, match=None) as info:
        DataSpec(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_spec_from_dict_names_unknown_keys() -> None:
    with pytest.raises(DataError, match="unknown data spec keys: colour, zoom"):
        DataSpec.from_dict({"name": "digits", "zoom": 2, "colour": "red"})


# ----------------------------------------------------------------------------- split helper


def test_stratified_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    names = ("a", "b", "c", "d")
    first = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=7, class_names=names)
    again = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=7, class_names=names)
    other = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=8, class_names=names)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    train, val, test = first
    assert np.array_equal(np.sort(np.concatenate(first)), np.arange(labels.size))  # disjoint, complete
    assert (len(train), len(val), len(test)) == (140, 20, 40)
    for part, fraction in ((val, 0.1), (test, 0.2)):
        counts = np.bincount(labels[part], minlength=4)
        assert np.all(np.abs(counts - fraction * np.bincount(labels)) <= 1)


def test_stratified_split_names_a_class_too_small_to_split() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    with pytest.raises(DataError, match="class 'rare' has 2 image"):
        stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=0, class_names=("common", "rare"))


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_dataset(DataSpec(name="digits"))


def test_digits_bundle_shape_and_metadata(digits: DataBundle) -> None:
    sizes = [len(s) for s in (digits.train, digits.val, digits.test)]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(0.2 * 1797, abs=1) and sizes[1] == pytest.approx(0.1 * 1797, abs=2)
    assert isinstance(digits.train, TensorImageDataset)
    assert digits.train.images.shape == (sizes[0], 1, 32, 32) and digits.train.images.dtype == torch.uint8
    assert digits.class_names == tuple("0123456789")
    assert (digits.in_channels, digits.image_size, digits.channel_order) == (1, 32, "L")
    assert digits.augment == "digits" and len(digits.fingerprint) == 64
    image, label = digits.val[0]
    assert image.shape == (1, 32, 32) and isinstance(label, int)
    for split in (digits.train, digits.val, digits.test):
        assert set(split.labels.tolist()) == set(range(10))  # stratified: every class everywhere


def test_digits_mean_std_come_from_train_only(digits: DataBundle) -> None:
    train = digits.train.images.double() / 255
    assert digits.mean[0] == pytest.approx(train.mean().item(), rel=1e-9)
    assert digits.std[0] == pytest.approx(train.std(unbiased=False).item(), rel=1e-9)
    everything = torch.cat([s.images for s in (digits.train, digits.val, digits.test)]).double() / 255
    assert digits.mean[0] != pytest.approx(everything.mean().item(), rel=1e-9)


def test_digits_at_native_size_are_the_real_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    bundle = load_dataset(DataSpec(name="digits", image_size=8))
    ours = torch.cat([s.images for s in (bundle.train, bundle.val, bundle.test)]).reshape(-1, 64).numpy()
    theirs = np.rint(load_digits().images.reshape(-1, 64) * 255 / 16).astype(np.uint8)
    assert sorted(map(bytes, ours)) == sorted(map(bytes, theirs))


def test_digits_split_and_fingerprint_depend_on_seed_only(digits: DataBundle) -> None:
    again = load_dataset(DataSpec(name="digits"))
    assert again.fingerprint == digits.fingerprint
    assert torch.equal(again.train.images, digits.train.images)
    reseeded = load_dataset(DataSpec(name="digits", seed=1))
    assert reseeded.fingerprint != digits.fingerprint
    assert not torch.equal(reseeded.train.labels, digits.train.labels)


def test_digits_rgb_and_resize() -> None:
    bundle = load_dataset(DataSpec(name="digits", image_size=16, channels=3))
    assert bundle.train.images.shape[1:] == (3, 16, 16) and bundle.channel_order == "RGB"
    assert len(bundle.mean) == 3 and bundle.mean[0] == pytest.approx(bundle.mean[2])


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_configurable_deterministic_and_balanced() -> None:
    spec = DataSpec(name="synthetic", num_classes=5, num_samples=100, channels=3, image_size=12, seed=2)
    bundle = load_dataset(spec)
    assert sum(len(s) for s in (bundle.train, bundle.val, bundle.test)) == 100
    assert bundle.train.images.shape[1:] == (3, 12, 12) and bundle.num_classes == 5
    labels = torch.cat([s.labels for s in (bundle.train, bundle.val, bundle.test)])
    assert torch.bincount(labels).tolist() == [20] * 5
    assert load_dataset(spec).fingerprint == bundle.fingerprint
    other = load_dataset(
        DataSpec(name="synthetic", num_classes=5, num_samples=100, channels=3, image_size=12)
    )
    assert other.fingerprint != bundle.fingerprint


def test_synthetic_is_learnable_by_a_tiny_cnn() -> None:
    bundle = load_dataset(DataSpec(name="synthetic", num_classes=4, num_samples=400, image_size=16, seed=0))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 4),
    )
    mean, std = bundle.mean[0], bundle.std[0]
    x = (bundle.train.images.float() / 255 - mean) / std
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only add contention on a shared CPU
    try:
        for _ in range(4):
            for batch in torch.randperm(len(x)).split(32):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), bundle.train.labels[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        val = (bundle.val.images.float() / 255 - mean) / std
        accuracy = (model(val).argmax(1) == bundle.val.labels).float().mean().item()
    assert accuracy >= 0.9


# ----------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, *, per_batch: int = 20, protocol: int = 2) -> dict[str, np.ndarray]:
    """Write the official python-batch layout with tiny batches; return the test batch arrays."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    test = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        test = batch
    return {"data": test[b"data"], "labels": np.array(test[b"labels"])}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_official_layout(tmp_path: Path, protocol: int) -> None:
    test = _write_cifar(tmp_path / "cifar", protocol=protocol)
    bundle = load_dataset(DataSpec(name="cifar10", path=str(tmp_path / "cifar"), val_fraction=0.1))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (90, 10, 20)
    assert bundle.class_names[0] == "airplane" and bundle.class_names[-1] == "truck"
    assert bundle.channel_order == "RGB" and bundle.augment == "cifar"
    # Rows are R plane, G plane, B plane: the test split must match that layout exactly.
    assert torch.equal(bundle.test.images, torch.from_numpy(test["data"].reshape(-1, 3, 32, 32)))
    assert bundle.test.labels.tolist() == test["labels"].tolist()
    assert set(bundle.val.labels.tolist()) == set(range(10))


def test_cifar10_accepts_archive_folder_resizes_and_converts(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    spec = DataSpec(name="cifar10", path=str(tmp_path), image_size=16, channels=1)
    bundle = load_dataset(spec)
    assert bundle.train.images.shape[1:] == (1, 16, 16) and bundle.channel_order == "L"
    assert load_dataset(spec).fingerprint == bundle.fingerprint


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="CIFAR-10 folder not found"):
        load_dataset(DataSpec(name="cifar10", path=str(tmp_path / "absent")))
    folder = tmp_path / "cifar"
    _write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks: data_batch_3"):
        load_dataset(DataSpec(name="cifar10", path=str(folder)))
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DataError, match=r"data_batch_3.*3072"):
        load_dataset(DataSpec(name="cifar10", path=str(folder)))


class _Hostile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.target),)


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    _write_cifar(folder)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Hostile(marker)}))
    with pytest.raises(DataError, match=r"test_batch.*not allowed"):
        load_dataset(DataSpec(name="cifar10", path=str(folder)))
    assert not marker.exists()


# ----------------------------------------------------------------------------- image folders


def _write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels).save(path, **options)


def _write_folder(root: Path, counts: dict[str, int]) -> None:
    seed = 0
    for name, count in counts.items():
        for i in range(count):
            seed += 1
            suffix = ".png" if i % 2 else ".jpg"
            _write_image(root / name / f"{i:03d}{suffix}", seed, size=(40 + i % 3, 30 + i % 5))


def test_imagefolder_split_lazy_matches_in_memory(tmp_path: Path) -> None:
    _write_folder(tmp_path / "pets", {"dog": 10, "cat": 12})
    spec = dict(name="imagefolder", path=str(tmp_path / "pets"), image_size=16)
    lazy = load_dataset(DataSpec(**spec, in_memory=False))  # type: ignore[arg-type]
    eager = load_dataset(DataSpec(**spec))  # type: ignore[arg-type]
    assert isinstance(lazy.train, ImageFileDataset) and isinstance(eager.train, TensorImageDataset)
    assert lazy.class_names == ("cat", "dog") and lazy.augment == "imagenet" and lazy.channel_order == "RGB"
    parts = [set(s.paths) for s in (lazy.train, lazy.val, lazy.test)]  # type: ignore[attr-defined]
    assert sum(map(len, parts)) == 22 and len(set().union(*parts)) == 22  # disjoint and complete
    for split in (lazy.train, lazy.val, lazy.test):
        assert {p.parent.name for p in split.paths} == {"cat", "dog"}  # type: ignore[attr-defined]
        for path, label in zip(split.paths, split.labels.tolist(), strict=True):  # type: ignore[attr-defined]
            assert lazy.class_names[label] == path.parent.name
    image, label = lazy.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert torch.equal(image, eager.train.images[0]) and label == eager.train[0][1]  # type: ignore[attr-defined]
    assert lazy.mean == pytest.approx(eager.mean) and lazy.fingerprint == eager.fingerprint


def test_imagefolder_grayscale_and_mean_std(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", {"a": 6, "b": 6})
    bundle = load_dataset(DataSpec(name="imagefolder", path=str(tmp_path / "set"), channels=1, image_size=8))
    assert bundle.train.images.shape[1:] == (1, 8, 8) and bundle.channel_order == "L"  # type: ignore[attr-defined]
    train = bundle.train.images.double() / 255  # type: ignore[attr-defined]
    assert bundle.mean[0] == pytest.approx(train.mean().item()) and len(bundle.std) == 1


def test_imagefolder_presplit_uses_its_folders_and_train_only_stats(tmp_path: Path) -> None:
    root = tmp_path / "pre"
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("x", "y"):
            for i in range(count):
                value = 20 + 10 * i if split == "train" else 250  # val/test are bright; train is dark
                path = root / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 12), (value, value, value)).save(path)
    bundle = load_dataset(DataSpec(name="imagefolder", path=str(root), image_size=12, in_memory=False))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 4, 4)  # type: ignore[arg-type]
    assert all(p.parts[-3] == "val" for p in bundle.val.paths)  # type: ignore[attr-defined]
    assert bundle.mean[0] == pytest.approx((20 + 30 + 40 + 50) / 4 / 255)


def test_imagefolder_presplit_without_test_carves_it_from_train(tmp_path: Path) -> None:
    _write_folder(tmp_path / "p" / "train", {"x": 10, "y": 10})
    _write_folder(tmp_path / "p" / "val", {"x": 2, "y": 2})
    bundle = load_dataset(
        DataSpec(name="imagefolder", path=str(tmp_path / "p"), test_fraction=0.2, image_size=8)
    )
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 4, 4)  # type: ignore[arg-type]


def test_imagefolder_fingerprint_tracks_content_and_split_not_location(tmp_path: Path) -> None:
    root = tmp_path / "a"
    _write_folder(root, {"c1": 5, "c2": 5})
    spec = DataSpec(name="imagefolder", path=str(root), image_size=8)
    base = load_dataset(spec).fingerprint
    assert load_dataset(spec).fingerprint == base
    shutil.copytree(root, tmp_path / "b")
    assert (
        load_dataset(DataSpec(name="imagefolder", path=str(tmp_path / "b"), image_size=8)).fingerprint == base
    )
    assert (
        load_dataset(DataSpec(name="imagefolder", path=str(root), image_size=8, seed=1)).fingerprint != base
    )
    _write_image(root / "c1" / "001.png", seed=999)  # same name, different pixels
    assert load_dataset(spec).fingerprint != base


def test_imagefolder_error_cases(tmp_path: Path) -> None:
    def load(path: Path) -> DataBundle:
        return load_dataset(DataSpec(name="imagefolder", path=str(path), image_size=8))

    with pytest.raises(DataError, match=r"image folder not found: .*nowhere"):
        load(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    _write_image(flat / "loose.png", 1)
    with pytest.raises(DataError, match="no class folders in"):
        load(flat)
    texts = tmp_path / "texts"
    for cls in ("a", "b"):
        (texts / cls).mkdir(parents=True)
        (texts / cls / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load(texts)
    empty = tmp_path / "empty"
    _write_folder(empty, {"full": 6})
    (empty / "hollow").mkdir()
    with pytest.raises(DataError, match=r"class folder .*hollow has no images"):
        load(empty)
    half = tmp_path / "half"
    _write_folder(half / "train", {"a": 4})
    with pytest.raises(DataError, match="train/ sub-folder but no val/"):
        load(half)
    _write_folder(half / "val", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match="class folders not in train/: zebra"):
        load(half)


def test_imagefolder_corrupt_image_named_at_load_time(tmp_path: Path) -> None:
    root = tmp_path / "pre"
    _write_folder(root / "train", {"a": 4, "b": 4})
    _write_folder(root / "val", {"a": 2, "b": 2})
    _write_folder(root / "test", {"a": 1, "b": 1})
    bad = root / "val" / "b" / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    # Scanning does not decode; a lazy set reports the file when the item is read ...
    lazy = load_dataset(DataSpec(name="imagefolder", path=str(root), image_size=8, in_memory=False))
    index = lazy.val.paths.index(bad)  # type: ignore[attr-defined]
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        lazy.val[index]
    # ... and an in-memory set when it is loaded.
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_dataset(DataSpec(name="imagefolder", path=str(root), image_size=8, in_memory=True))


def test_lazy_stats_sample_is_deterministic(tmp_path: Path) -> None:
    _write_folder(tmp_path / "s", {"a": 8, "b": 8})
    spec = DataSpec(
        name="imagefolder", path=str(tmp_path / "s"), image_size=8, in_memory=False, stats_samples=3
    )
    first, second = load_dataset(spec), load_dataset(spec)
    assert first.mean == second.mean and first.std == second.std
    full = load_dataset(DataSpec(name="imagefolder", path=str(tmp_path / "s"), image_size=8, in_memory=False))
    assert full.mean != first.mean


def test_load_dataset_rejects_non_spec() -> None:
    with pytest.raises(DataError, match="needs a DataSpec, got dict"):
        load_dataset({"name": "digits"})  # type: ignore[arg-type]
