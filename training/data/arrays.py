"""Array helpers shared by the readers: resize, channel conversion, split, statistics, hashing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.data.spec import DataError

_CHUNK = 4096  # images per chunk: bounds the float copies made while resizing / summing
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights Pillow uses for RGB -> L


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of uint8 [N,C,H,W] to [N,C,size,size] (antialiased where shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < max(images.shape[-2:])
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].float()
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking
        )
        out[start : start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 [N,C,H,W] between 1 (L) and 3 (RGB) channels."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor(_LUMA).view(1, 3, 1, 1)
        out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.uint8)
        for start in range(0, images.shape[0], _CHUNK):
            luma = (images[start : start + _CHUNK].float() * weights).sum(1, keepdim=True)
            out[start : start + _CHUNK] = luma.round_().clamp_(0, 255).to(torch.uint8)
        return out
    raise DataError(f"cannot convert images with {have} channels to {channels}")


def stratified_split(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/val/test index arrays (each sorted ascending).

    Fractions are of all images, rounded, with at least one image per class in val and test.
    `test_fraction` may be 0 (no test split wanted, e.g. the set brings its own).
    """
    from sklearn.model_selection import train_test_split  # slow import, only when splitting

    counts = np.bincount(labels, minlength=len(class_names))
    need = 3 if test_fraction > 0 else 2
    smallest = int(np.argmin(counts))
    if counts[smallest] < need:
        raise DataError(
            f"class {class_names[smallest]!r} has {counts[smallest]} image(s); a stratified "
            f"split needs at least {need} per class"
        )
    n, k = labels.shape[0], len(class_names)
    # Absolute sizes, at least one image per class, so small sets still split (sklearn refuses a
    # stratified split smaller than the number of classes).
    n_test = max(k, round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = max(k, round(val_fraction * n))
    indices = np.arange(n)
    try:
        if n - n_test - n_val < k:
            raise ValueError(f"{n_val} val + {n_test} test images leave fewer than {k} to train on")
        rest, test = indices, indices[:0]
        if n_test:
            rest, test = train_test_split(indices, test_size=n_test, random_state=seed, stratify=labels)
        train, val = train_test_split(rest, test_size=n_val, random_state=seed, stratify=labels[rest])
    except ValueError as exc:
        raise DataError(
            f"cannot split {labels.shape[0]} images in {len(class_names)} classes with "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: {exc}"
        ) from exc
    return np.sort(train), np.sort(val), np.sort(test)


def channel_stats(images: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std on the [0,1] scale over uint8 [N,C,H,W] chunks."""
    total = sq_total = None
    count = 0
    for chunk in images:
        pixels = chunk.to(torch.float64).div_(255.0)
        sums, sq_sums = pixels.sum(dim=(0, 2, 3)), pixels.square().sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        sq_total = sq_sums if sq_total is None else sq_total + sq_sums
        count += pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    if total is None or sq_total is None or count == 0:
        raise DataError("cannot compute normalisation statistics: the training split is empty")
    mean = total / count
    std = (sq_total / count - mean.square()).clamp_(min=0).sqrt_()
    # A constant channel would divide by zero at normalisation time; 1.0 leaves it unscaled.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def chunks(images: torch.Tensor) -> Iterable[torch.Tensor]:
    """Yield bounded slices of a large uint8 tensor (for `channel_stats`)."""
    for start in range(0, images.shape[0], _CHUNK):
        yield images[start : start + _CHUNK]


def params_digest(hasher: Any, params: dict[str, Any]) -> None:
    """Feed a canonical JSON of `params` into `hasher`."""
    hasher.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())


def fingerprint_tensors(params: dict[str, Any], tensors: Sequence[torch.Tensor]) -> str:
    """sha256 over the split parameters and the exact bytes, dtype and shape of each tensor."""
    hasher = hashlib.sha256()
    params_digest(hasher, params)
    for tensor in tensors:
        array = tensor.contiguous().numpy()
        hasher.update(f"{array.dtype.str}{array.shape}".encode())
        hasher.update(memoryview(array).cast("B"))
    return hasher.hexdigest()
