"""PNG figures of a run: learning curves and the test confusion matrix (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss (train/val) and accuracy (train/val) per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [row["train_loss"] for row in history], label="train")
    loss_ax.plot(epochs, [row["val_loss"] for row in history], label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy (log scale)", title="loss", yscale="log")
    acc_ax.plot(epochs, [100 * row["train_acc"] for row in history], label="train")
    acc_ax.plot(epochs, [100 * row["val_acc"] for row in history], label="val")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Counts of true (rows) vs predicted (columns) classes, annotated when small enough to read."""
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 10 else 0)
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    if len(class_names) <= 20:
        threshold = confusion.max() / 2 if confusion.size else 0
        for (row, col), count in np.ndenumerate(confusion):
            ax.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                color="white" if count > threshold else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
