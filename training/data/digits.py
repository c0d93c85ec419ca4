"""`digits`: scikit-learn's bundled 1,797 real 8x8 handwritten digits (no download)."""

from __future__ import annotations

import numpy as np
import torch

from training.data.arrays import convert_channels, resize_images
from training.data.bundle import DataBundle, tensor_bundle
from training.data.spec import DataSpec

_MAX_VALUE = 16  # load_digits pixels are ink counts 0..16 (bright ink on a dark background)


def load_digits_bundle(spec: DataSpec) -> DataBundle:
    """Digits resized to `spec.image_size`, split stratified into train/val/test."""
    from sklearn.datasets import load_digits  # slow import, only when this set is used

    raw = load_digits()
    pixels = np.asarray(raw.images, dtype=np.float64).reshape(-1, 1, 8, 8)
    images = torch.from_numpy(np.rint(pixels * (255.0 / _MAX_VALUE)).astype(np.uint8))
    images = resize_images(convert_channels(images, spec.channels or 1), spec.image_size)
    labels = torch.from_numpy(np.asarray(raw.target, dtype=np.int64))
    return tensor_bundle(
        spec,
        pool=(images, labels),
        test=None,
        class_names=tuple(str(d) for d in range(10)),
        default_augment="digits",
    )
