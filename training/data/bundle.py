"""`DataBundle`: the three splits of a dataset plus everything recorded about them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.arrays import channel_stats, chunks, fingerprint_tensors, stratified_split
from training.data.datasets import TensorImageDataset
from training.data.spec import DataSpec

ImageDataset = Dataset[tuple[torch.Tensor, int]]
_Split = TypeVar("_Split", bound=Dataset)


@dataclass(frozen=True, kw_only=True, eq=False)
class DataBundle:
    """A loaded dataset. Image splits yield `(uint8 tensor [C,H,W], int label)`; signal splits
    (layout "NCL": mnist1d, signals) yield `(float32 tensor [C,L], int label)`.

    `mean`/`std` are per channel on the scale `input_scale` maps stored values to (images: uint8
    x 1/255, i.e. [0,1]; signals: 1.0, the raw values), from the train split only.
    `augment` names the policy suited to the set (or the spec's override): a `make_augment`
    policy for images, a `make_signal_augment` one for signals (`augment_for` picks).
    """

    spec: DataSpec
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    class_names: tuple[str, ...]
    in_channels: int
    image_size: int | None  # square side of the images; None for signals
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str | None  # "L" or "RGB"; None for signals
    fingerprint: str
    augment: str
    layout: str = "NCHW"  # "NCL" for signals
    signal_length: int | None = None  # samples per channel of each signal; None for images
    input_scale: float = 1.0 / 255.0  # stored value x input_scale is what mean/std describe

    @property
    def is_signal(self) -> bool:
        """True when the samples are signals [C, L] (layout NCL)."""
        return self.layout == "NCL"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's model input shape without the batch: (C, H, W) or (C, L)."""
        if self.is_signal:
            assert self.signal_length is not None
            return (self.in_channels, self.signal_length)
        assert self.image_size is not None
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of `class_names`)."""
        return len(self.class_names)

    def summary(self) -> dict[str, object]:
        """JSON-able description for logs and run metadata (no tensors)."""
        return {
            "spec": self.spec.to_dict(),
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},  # type: ignore[arg-type]
            "class_names": list(self.class_names),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
            "fingerprint": self.fingerprint,
            "augment": self.augment,
            "layout": self.layout,
            "signal_length": self.signal_length,
            "input_scale": self.input_scale,
        }


def channel_order(channels: int) -> str:
    """ "L" for one channel, "RGB" for three."""
    return "L" if channels == 1 else "RGB"


def tensor_bundle(
    spec: DataSpec,
    *,
    pool: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    class_names: tuple[str, ...],
    default_augment: str,
) -> DataBundle:
    """Split in-memory images (uint8 [N,C,H,W], already at `spec.image_size`) into a bundle.

    Without a given `test`, `pool` is split three ways; with one, only val is carved from `pool`.
    """
    images = pool[0]
    (train, val, test_set), fingerprint = split_pool(spec, pool, test, class_names, TensorImageDataset)
    mean, std = channel_stats(chunks(train.images))
    return DataBundle(
        spec=spec,
        train=train,
        val=val,
        test=test_set,
        class_names=class_names,
        in_channels=int(images.shape[1]),
        image_size=spec.image_size,
        mean=mean,
        std=std,
        channel_order=channel_order(int(images.shape[1])),
        fingerprint=fingerprint,
        augment=spec.augment or default_augment,
    )


def split_pool(
    spec: DataSpec,
    pool: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    class_names: tuple[str, ...],
    dataset: Callable[[torch.Tensor, torch.Tensor], _Split],
    extra_params: Mapping[str, Any] | None = None,
) -> tuple[tuple[_Split, _Split, _Split], str]:
    """The stratified (train, val, test) datasets of in-memory inputs (images or signals: the
    `dataset` class is told which) and their fingerprint.

    Without a given `test`, `pool` is split three ways; with one, only val is carved from `pool`.
    `extra_params` (e.g. generator settings) go into the fingerprint with the split parameters.
    """
    values, labels = pool
    train_idx, val_idx, test_idx = stratified_split(
        labels.numpy(),
        val_fraction=spec.val_fraction,
        test_fraction=0.0 if test is not None else spec.test_fraction,
        seed=spec.seed,
        class_names=class_names,
    )

    def subset(idx: np.ndarray) -> _Split:
        index = torch.from_numpy(idx)
        return dataset(values[index], labels[index])

    splits = (subset(train_idx), subset(val_idx), dataset(*test) if test is not None else subset(test_idx))
    # Both dataset classes expose `.images` (signals under that alias too).
    tensors = [t for split in splits for t in (split.images, split.labels)]
    params = spec.split_params() | {"class_names": list(class_names)} | dict(extra_params or {})
    return splits, fingerprint_tensors(params, tensors)
