"""Batched augmentation of signals float [N,C,L], driven only by a torch.Generator, and
`augment_for(bundle)`, which picks the image or the signal augmentation a bundle needs.

As for images (`augment.py`), every random number comes from the generator passed in (drawn on
its device, moved to the batch's), so a resumed run sees exactly the same augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from training.data.augment import AugmentFn, NoAugment, check_signal_batch, make_augment
from training.data.spec import SIGNAL_AUGMENT_POLICIES, DataError

if TYPE_CHECKING:
    from training.data.bundle import DataBundle

SHIFT_FRACTION = 0.1  # "shift": up to 10 % of the length either way (4 samples at MNIST-1D's 40)


def make_signal_augment(policy: str, length: int) -> AugmentFn:
    """Return the signal augmentation `policy` for signals of `length` samples per channel.

    Policies: "none" (identity); "shift" (each signal rolled circularly by a random whole number
    of samples in [-s, s], s = max(1, round(0.1 x length)); all channels of a sample move
    together). Circular, as MNIST-1D's own generator translates its digits.
    """
    if policy not in SIGNAL_AUGMENT_POLICIES:
        raise DataError(
            f"unknown signal augment policy {policy!r}; expected one of: {', '.join(SIGNAL_AUGMENT_POLICIES)}"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise DataError(f"length={length!r} must be a positive int")
    if policy == "shift":
        return SignalShift(length=length, max_shift=max(1, round(SHIFT_FRACTION * length)))
    return NoAugment(size=length, signal=True)


def augment_for(bundle: DataBundle) -> AugmentFn:
    """The augmentation `bundle.augment` names, for its kind of samples (images or signals)."""
    if bundle.is_signal:
        if bundle.signal_length is None:
            raise DataError("a signal bundle needs a signal_length")
        return make_signal_augment(bundle.augment, bundle.signal_length)
    if bundle.image_size is None:
        raise DataError("an image bundle needs an image_size")
    return make_augment(bundle.augment, bundle.image_size)


@dataclass(frozen=True, kw_only=True)
class SignalShift:
    """Per-sample circular shift by up to `max_shift` samples either way."""

    length: int
    max_shift: int

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        check_signal_batch(x, self.length)
        n, channels, length = x.shape
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (n,), generator=gen, device=gen.device)
        positions = torch.arange(length, device=x.device)
        # out[i, :, t] = x[i, :, (t - shift_i) mod L]: a positive shift moves the signal right.
        index = (positions[None, :] - shifts.to(x.device)[:, None]).remainder(length)
        return x.gather(2, index[:, None, :].expand(n, channels, length))
