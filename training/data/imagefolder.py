"""`imagefolder`: `<root>/<class>/<image>` (or `<root>/{train,val[,test]}/<class>/<image>`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data.arrays import channel_stats, chunks, params_digest, stratified_split
from training.data.bundle import DataBundle, channel_order
from training.data.datasets import ImageFileDataset, TensorImageDataset, decode_image
from training.data.spec import DataError, DataSpec

IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
_AUTO_IN_MEMORY_BYTES = 512 * 2**20  # decode up front when all splits fit in this much memory
_DECODE_CHUNK = 256


@dataclass(frozen=True)
class _Split:
    paths: tuple[Path, ...]
    labels: tuple[int, ...]


def load_imagefolder_bundle(spec: DataSpec) -> DataBundle:
    """Scan the folder, split it (or use its train/val/test), build lazy or in-memory splits."""
    root = Path(spec.path or "").expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    class_names, splits, layout = _scan_root(root, spec)
    channels = spec.channels or 3
    fingerprint = _fingerprint(
        root, splits, spec.split_params() | {"class_names": class_names, "layout": layout}
    )
    n_images = sum(len(s.paths) for s in splits)
    in_memory = spec.in_memory
    if in_memory is None:
        in_memory = n_images * channels * spec.image_size**2 <= _AUTO_IN_MEMORY_BYTES
    datasets = [_make_dataset(s, spec.image_size, channels, in_memory) for s in splits]
    train = datasets[0]
    if isinstance(train, TensorImageDataset):
        mean, std = channel_stats(chunks(train.images))
    else:
        mean, std = channel_stats(_sampled_batches(train, spec.stats_samples, spec.seed))
    return DataBundle(
        spec=spec,
        train=train,
        val=datasets[1],
        test=datasets[2],
        class_names=tuple(class_names),
        in_channels=channels,
        image_size=spec.image_size,
        mean=mean,
        std=std,
        channel_order=channel_order(channels),
        fingerprint=fingerprint,
        augment=spec.augment or "imagenet",
    )


def _scan_root(root: Path, spec: DataSpec) -> tuple[list[str], list[_Split], str]:
    """Class names, [train, val, test] file lists, and the layout name ("split" or "presplit")."""
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        present, absent = ("train", "val") if has_train else ("val", "train")
        raise DataError(
            f"{root} has a {present}/ sub-folder but no {absent}/: a pre-split folder needs "
            "train/ and val/ (test/ optional); otherwise put class folders directly in it"
        )
    if not has_train:
        class_names, pool = _scan_classes(root, None)
        parts = stratified_split(
            np.asarray(pool.labels, dtype=np.int64),
            val_fraction=spec.val_fraction,
            test_fraction=spec.test_fraction,
            seed=spec.seed,
            class_names=class_names,
        )
        return class_names, [_take(pool, idx) for idx in parts], "split"
    class_names, train = _scan_classes(root / "train", None)
    _, val = _scan_classes(root / "val", class_names)
    if (root / "test").is_dir():
        _, test = _scan_classes(root / "test", class_names)
    else:  # carve a held-out test split from train so val stays the model-selection set
        train_idx, test_idx, _ = stratified_split(
            np.asarray(train.labels, dtype=np.int64),
            val_fraction=spec.test_fraction,
            test_fraction=0.0,
            seed=spec.seed,
            class_names=class_names,
        )
        train, test = _take(train, train_idx), _take(train, test_idx)
    return class_names, [train, val, test], "presplit"


def _scan_classes(folder: Path, known: Sequence[str] | None) -> tuple[list[str], _Split]:
    """List `<folder>/<class>/**/<image>`; `known` fixes the class indices (val/test folders)."""
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class folders in {folder} (expected {folder}/<class name>/<image>)")
    names = [d.name for d in class_dirs]
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(f"{folder} has class folders not in train/: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(known if known is not None else names)}
    files = {d.name: _image_files(d) for d in class_dirs}
    if not any(files.values()):
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    empty = [d for d in class_dirs if not files[d.name]]
    if empty:
        raise DataError(f"class folder {empty[0]} has no images ({', '.join(IMAGE_SUFFIXES)})")
    paths = [p for name in names for p in files[name]]
    labels = [index[name] for name in names for _ in files[name]]
    return names, _Split(tuple(paths), tuple(labels))


def _image_files(class_dir: Path) -> list[Path]:
    found = (
        p
        for p in class_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        and p.is_file()
    )
    return sorted(found, key=lambda p: p.relative_to(class_dir).as_posix())


def _take(split: _Split, idx: np.ndarray) -> _Split:
    return _Split(tuple(split.paths[i] for i in idx), tuple(split.labels[i] for i in idx))


def _fingerprint(root: Path, splits: Sequence[_Split], params: dict[str, object]) -> str:
    """sha256 over split parameters + sorted (relative path, size, content sha256) of every image."""
    hasher = hashlib.sha256()
    params_digest(hasher, params)
    for path in sorted((p for s in splits for p in s.paths), key=lambda p: p.relative_to(root).as_posix()):
        with path.open("rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        hasher.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0{content}\n".encode())
    return hasher.hexdigest()


def _make_dataset(
    split: _Split, size: int, channels: int, in_memory: bool
) -> ImageFileDataset | TensorImageDataset:
    lazy = ImageFileDataset(split.paths, split.labels, image_size=size, channels=channels)
    if not in_memory:
        return lazy
    images = torch.empty((len(lazy), channels, size, size), dtype=torch.uint8)
    for i, path in enumerate(lazy.paths):
        images[i] = decode_image(path, size, channels)
    return TensorImageDataset(images, lazy.labels)


def _sampled_batches(dataset: ImageFileDataset, limit: int, seed: int) -> Iterator[torch.Tensor]:
    """Decode a deterministic sample of up to `limit` images, in uint8 batches (for mean/std)."""
    n = len(dataset)
    chosen = (
        np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    )
    for start in range(0, len(chosen), _DECODE_CHUNK):
        batch = chosen[start : start + _DECODE_CHUNK]
        yield torch.stack(
            [decode_image(dataset.paths[i], dataset.image_size, dataset.channels) for i in batch]
        )
