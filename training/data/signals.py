"""Fixed-length signal sets: the in-memory dataset, the split into a `DataBundle`, statistics.

A signal sample is float32 [C, L] (C channels of L samples each), the model input layout NCL.
Signals are kept as the float values they were read as (no uint8 quantisation), so a bundle's
`input_scale` is 1.0 and `mean`/`std` are on the raw scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.bundle import DataBundle, split_pool
from training.data.datasets import checked_tensors
from training.data.spec import DataError, DataSpec

SIGNAL_LAYOUT = "NCL"


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


def signal_bundle(
    spec: DataSpec,
    *,
    pool: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    class_names: tuple[str, ...],
    default_augment: str,
    extra_params: dict[str, Any] | None = None,
) -> DataBundle:
    """Split float32 [N,C,L] signals into a bundle (stratified, as images are split).

    Without a given `test`, `pool` is split three ways; with one, only val is carved from `pool`.
    `extra_params` (e.g. generator settings) go into the fingerprint with the split parameters.
    """
    signals = pool[0]
    if test is not None and test[0].shape[1:] != signals.shape[1:]:
        raise DataError(
            f"test signals are [N, {', '.join(map(str, test[0].shape[1:]))}] but training signals "
            f"are [N, {', '.join(map(str, signals.shape[1:]))}]"
        )
    (train, val, test_set), fingerprint = split_pool(
        spec, pool, test, class_names, TensorSignalDataset, extra_params
    )
    mean, std = signal_stats(train.signals)
    return DataBundle(
        spec=spec,
        train=train,
        val=val,
        test=test_set,
        class_names=class_names,
        in_channels=int(signals.shape[1]),
        image_size=None,
        mean=mean,
        std=std,
        channel_order=None,
        fingerprint=fingerprint,
        augment=spec.augment or default_augment,
        layout=SIGNAL_LAYOUT,
        signal_length=int(signals.shape[2]),
        input_scale=1.0,
    )
