"""Datasets for Kiln: bundled digits, image folders, CIFAR-10 batches and a synthetic set
(images), MNIST-1D and .npz/.csv files of fixed-length signals (signals, layout NCL).

`load_dataset(DataSpec(...))` returns a `DataBundle` (train/val/test splits of uint8 images or
float32 signals, class names, train-split normalisation statistics, a fingerprint);
`make_augment(policy, image_size)` / `make_signal_augment(policy, length)` return a batched
augmentation driven only by a `torch.Generator`; `augment_for(bundle)` picks the right one.
"""

from training.data.augment import AugmentFn, augment_for, make_augment, make_signal_augment
from training.data.bundle import DataBundle
from training.data.datasets import ImageFileDataset, TensorImageDataset
from training.data.loader import load_dataset
from training.data.signals import TensorSignalDataset
from training.data.spec import (
    AUGMENT_POLICIES,
    DATASET_NAMES,
    SIGNAL_AUGMENT_POLICIES,
    SIGNAL_DATASETS,
    DataError,
    DataSpec,
)

__all__ = [
    "AUGMENT_POLICIES",
    "DATASET_NAMES",
    "SIGNAL_AUGMENT_POLICIES",
    "SIGNAL_DATASETS",
    "AugmentFn",
    "DataBundle",
    "DataError",
    "DataSpec",
    "ImageFileDataset",
    "TensorImageDataset",
    "TensorSignalDataset",
    "augment_for",
    "load_dataset",
    "make_augment",
    "make_signal_augment",
]
