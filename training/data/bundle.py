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
from training.data.signals import TensorSignalDataset, signal_stats
from training.data.spec import DataError, DataSpec

ImageDataset = Dataset[tuple[torch.Tensor, int]]
_Split = TypeVar("_Split", bound=Dataset)
IMAGE_LAYOUT, SIGNAL_LAYOUT = "NCHW", "NCL"
IMAGE_SCALE = 1.0 / 255.0  # uint8 image values to [0, 1]; signals keep their raw values (1.0)


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
    layout: str = IMAGE_LAYOUT  # SIGNAL_LAYOUT for signals
    signal_length: int | None = None  # samples per channel of each signal; None for images
    input_scale: float = IMAGE_SCALE  # stored value x input_scale is what mean/std describe

    @property
    def is_signal(self) -> bool:
        """True when the samples are signals [C, L] (layout NCL)."""
        return self.layout == SIGNAL_LAYOUT

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
    extra_params: Mapping[str, Any] | None = None,
) -> DataBundle:
    """Split in-memory inputs into a bundle (stratified), for either kind `spec` names: uint8
    images [N,C,H,W] already at `spec.image_size`, or (`spec.is_signal`) float32 signals [N,C,L].

    Without a given `test`, `pool` is split three ways; with one, only val is carved from `pool`.
    `extra_params` (e.g. generator settings) go into the fingerprint with the split parameters.
    """
    values, signal = pool[0], spec.is_signal
    if test is not None and test[0].shape[1:] != values.shape[1:]:
        kind = "signals" if signal else "images"
        raise DataError(
            f"test {kind} are [N, {', '.join(map(str, test[0].shape[1:]))}] but training {kind} "
            f"are [N, {', '.join(map(str, values.shape[1:]))}]"
        )
    dataset = TensorSignalDataset if signal else TensorImageDataset
    (train, val, test_set), fingerprint = _split_pool(spec, pool, test, class_names, dataset, extra_params)
    # Both dataset classes expose `.images` (signals under that alias too).
    mean, std = signal_stats(train.images) if signal else channel_stats(chunks(train.images))
    channels = int(values.shape[1])
    return DataBundle(
        spec=spec,
        train=train,
        val=val,
        test=test_set,
        class_names=class_names,
        in_channels=channels,
        image_size=None if signal else spec.image_size,
        mean=mean,
        std=std,
        channel_order=None if signal else channel_order(channels),
        fingerprint=fingerprint,
        augment=spec.augment or default_augment,
        layout=SIGNAL_LAYOUT if signal else IMAGE_LAYOUT,
        signal_length=int(values.shape[2]) if signal else None,
        input_scale=1.0 if signal else IMAGE_SCALE,
    )


def _split_pool(
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
    tensors = [t for split in splits for t in (split.images, split.labels)]
    params = spec.split_params() | {"class_names": list(class_names)} | dict(extra_params or {})
    return splits, fingerprint_tensors(params, tensors)
