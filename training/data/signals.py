"""Fixed-length signal sets: the in-memory dataset, input checks, statistics (`bundle.py`'s
`tensor_bundle` splits them into a `DataBundle`, as it does images).

A signal sample is float32 [C, L] (C channels of L samples each), the model input layout NCL.
Signals are kept as the float values they were read as (no uint8 quantisation), so a bundle's
`input_scale` is 1.0 and `mean`/`std` are on the raw scale.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.datasets import checked_tensors
from training.data.spec import DataError


class TensorSignalDataset(Dataset[tuple[torch.Tensor, int]]):
    """Signals in memory: `.signals` float32 [N,C,L] and `.labels` int64 [N].

    `.images` is the same tensor under the name `training.batches` looks for, so the batched
    in-memory path serves signals unchanged.
    """

    def __init__(self, signals: torch.Tensor, labels: torch.Tensor) -> None:
        self.signals, self.labels = checked_tensors(signals, labels, "signals", torch.float32, "N,C,L")

    @property
    def images(self) -> torch.Tensor:
        """Alias of `.signals` for the trainer's batched path (which reads `.images`)."""
        return self.signals

    def __len__(self) -> int:
        return int(self.signals.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.signals[index], int(self.labels[index])


def signal_stats(signals: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std over samples and positions of float [N,C,L]."""
    if signals.shape[0] == 0:
        raise DataError("cannot compute normalisation statistics: the training split is empty")
    values = signals.to(torch.float64)
    mean = values.mean(dim=(0, 2))
    std = values.std(dim=(0, 2), correction=0)
    # A constant channel would divide by zero at normalisation time; 1.0 leaves it unscaled.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def check_signals(signals: np.ndarray, what: str) -> np.ndarray:
    """float32 [N,C,L] copy of numeric [N,L] or [N,C,L]; non-finite values raise `DataError`."""
    if signals.ndim == 2:
        signals = signals[:, None, :]
    if signals.ndim != 3 or 0 in signals.shape:
        raise DataError(f"{what} must be [N, L] or [N, C, L] with N, C, L >= 1, got shape {signals.shape}")
    if not (np.issubdtype(signals.dtype, np.number) and not np.issubdtype(signals.dtype, np.complexfloating)):
        raise DataError(f"{what} must hold real numbers, got dtype {signals.dtype}")
    out = np.ascontiguousarray(signals, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0][0])
        raise DataError(f"{what} holds a NaN or infinite value (sample {bad})")
    return out
