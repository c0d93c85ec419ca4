"""Evaluation: loss, accuracy, per-class accuracy and the confusion matrix of one split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from training.batches import iterate_batches


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one split."""

    loss: float
    accuracy: float
    per_class_accuracy: tuple[float, ...]
    confusion: np.ndarray  # [true, predicted] counts
    predictions: np.ndarray
    labels: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.labels.size)


class Normalizer(torch.nn.Module):
    """uint8 [N,C,H,W] -> float, scaled to [0,1], minus mean, over std (the model's input contract)."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        spatial_dims: int = 2,
        from_uint8: bool = True,
    ) -> None:
        super().__init__()
        view = (1, -1) + (1,) * spatial_dims
        self.from_uint8 = from_uint8
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(view))

    def scale(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div_(255.0) if self.from_uint8 else images.float()

    def forward(self, scaled: torch.Tensor) -> torch.Tensor:
        return (scaled - self.mean) / self.std


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    normalizer: Normalizer,
    *,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
) -> EvalResult:
    """Run the model over a split in eval mode (no augmentation)."""
    model.eval()
    losses, preds, truth = [], [], []
    for images, labels in iterate_batches(dataset, batch_size=batch_size, device=device):
        inputs = normalizer(normalizer.scale(images))
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = model(inputs).float()
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item())
        preds.append(logits.argmax(dim=1).cpu())
        truth.append(labels.cpu())
    predictions = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    labels_np = torch.cat(truth).numpy() if truth else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels_np, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros(num_classes), where=support > 0)
    count = max(1, labels_np.size)
    return EvalResult(
        loss=float(sum(losses) / count),
        accuracy=float((predictions == labels_np).sum() / count),
        per_class_accuracy=tuple(float(x) for x in per_class),
        confusion=confusion,
        predictions=predictions,
        labels=labels_np,
    )
