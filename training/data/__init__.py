"""Datasets for Kiln: bundled digits, image folders, CIFAR-10 batches and a synthetic set.

`load_dataset(DataSpec(...))` returns a `DataBundle` (train/val/test splits of uint8 images,
class names, train-split normalisation statistics, a fingerprint); `make_augment(policy,
image_size)` returns a batched augmentation driven only by a `torch.Generator`.
"""

from training.data.augment import AugmentFn, make_augment
from training.data.bundle import DataBundle
from training.data.datasets import ImageFileDataset, TensorImageDataset
from training.data.loader import load_dataset
from training.data.spec import AUGMENT_POLICIES, DATASET_NAMES, DataError, DataSpec

__all__ = [
    "AUGMENT_POLICIES",
    "DATASET_NAMES",
    "AugmentFn",
    "DataBundle",
    "DataError",
    "DataSpec",
    "ImageFileDataset",
    "TensorImageDataset",
    "load_dataset",
    "make_augment",
]
