"""Turning a dataset split into device batches: a fast path for in-memory sets, DataLoader otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset


def _in_memory(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        return images, labels
    return None


def iterate_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    workers: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images [N,C,H,W], int64 labels [N]) on `device`.

    With a generator the order is shuffled by it (and only by it), which keeps resumed runs exact;
    without one the order is the dataset's.
    """
    tensors = _in_memory(dataset)
    if tensors is not None:
        images, labels = tensors
        count = len(labels)
        order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
        stop = count - (count % batch_size) if drop_last and count >= batch_size else count
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield images[index].to(device, non_blocking=True), labels[index].to(device, non_blocking=True)
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for images, labels in loader:
        yield images.to(device, non_blocking=True), torch.as_tensor(labels).to(device, non_blocking=True)
