"""The two dataset kinds a `DataBundle` holds: in-memory uint8 tensors and lazily decoded files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.data.spec import DataError


def checked_tensors(
    values: torch.Tensor, labels: torch.Tensor, what: str, dtype: torch.dtype, dims: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous `values` (`dtype`, one axis per name in `dims`) and int64 `labels` [N]; anything
    else raises `DataError` naming `what` and the shape it got."""
    if values.dtype != dtype or values.ndim != len(dims.split(",")):
        expected = f"{str(dtype).removeprefix('torch.')} [{dims}]"
        raise DataError(f"{what} must be {expected}, got {values.dtype} {tuple(values.shape)}")
    if labels.ndim != 1 or labels.shape[0] != values.shape[0]:
        raise DataError(f"labels must be [N={values.shape[0]}], got {tuple(labels.shape)}")
    return values.contiguous(), labels.to(torch.int64).contiguous()


class TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images already decoded: `.images` uint8 [N,C,H,W] and `.labels` int64 [N].

    Trainers may use the two tensors directly (batched indexing) instead of per-item access.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = checked_tensors(images, labels, "images", torch.uint8, "N,C,H,W")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class ImageFileDataset(Dataset[tuple[torch.Tensor, int]]):
    """Image files decoded on access (so sets larger than memory work).

    Each image is converted to RGB or L, its shorter side resized to `image_size`, then centre
    cropped to a square. An unreadable file raises `DataError` naming it.
    """

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], *, image_size: int, channels: int
    ) -> None:
        if len(paths) != len(labels):
            raise DataError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths: tuple[Path, ...] = tuple(paths)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.paths[index], self.image_size, self.channels), int(self.labels[index])


def decode_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """Read one image file into uint8 [C, image_size, image_size] (shorter side + centre crop)."""
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    img = _resize_shorter_side(img, image_size)
    left = (img.width - image_size) // 2
    top = (img.height - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    short = min(img.width, img.height)
    if short == size:
        return img
    # round() keeps the aspect ratio; max() guarantees the crop fits even for extreme ratios.
    width = max(size, round(img.width * size / short))
    height = max(size, round(img.height * size / short))
    # Pillow's bilinear filter widens its support when shrinking, i.e. it antialiases.
    return img.resize((width, height), Image.Resampling.BILINEAR)
