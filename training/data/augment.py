"""Batched, vectorised augmentation, driven only by a torch.Generator, of either kind of input:
images float [N,C,H,W] in [0,1] (`make_augment`) or signals float [N,C,L] (`make_signal_augment`);
`augment_for(bundle)` picks the one a bundle's kind needs.

Every random number comes from the generator passed in, so a resumed run that restores the
generator's state sees exactly the same augmentations. Random draws are made on the generator's
device and moved to the batch's device, so a CPU generator can drive a GPU batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from training.data.spec import (
    AUGMENT_POLICIES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    SIGNAL_AUGMENT_POLICIES,
    DataError,
)

if TYPE_CHECKING:
    from training.data.bundle import DataBundle

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
_REFERENCE_SIZE = 32  # magnitudes below are stated for 32x32 images and scale with image size
SHIFT_FRACTION = 0.1  # signal "shift": up to 10 % of the length either way (4 samples at MNIST-1D's 40)


def augment_for(bundle: DataBundle) -> AugmentFn:
    """The augmentation `bundle.augment` names, for its kind of samples (images or signals)."""
    if bundle.is_signal:
        if bundle.signal_length is None:
            raise DataError("a signal bundle needs a signal_length")
        return make_signal_augment(bundle.augment, bundle.signal_length)
    if bundle.image_size is None:
        raise DataError("an image bundle needs an image_size")
    return make_augment(bundle.augment, bundle.image_size)


def make_augment(policy: str, image_size: int) -> AugmentFn:
    """Return the augmentation `policy` for square images of side `image_size`.

    Policies: "none" (identity); "digits" (shift up to 2.5 px at 32², rotation up to 10°,
    scale 0.9-1.1, never a flip); "cifar" (reflect-pad 4 px at 32² + random crop, horizontal
    flip); "imagenet" (random resized crop of 35-100 % area, aspect 3/4-4/3, horizontal flip).
    """
    if policy not in AUGMENT_POLICIES:
        raise DataError(f"unknown augment policy {policy!r}; expected one of: {', '.join(AUGMENT_POLICIES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise DataError(f"image_size={image_size!r} must be an int")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(f"image_size={image_size} is out of range [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    scale = image_size / _REFERENCE_SIZE
    if policy == "digits":
        return DigitsAugment(size=image_size, max_shift_px=2.5 * scale)
    if policy == "cifar":
        return CifarAugment(size=image_size, pad=max(1, round(4 * scale)))
    if policy == "imagenet":
        return ImagenetAugment(size=image_size)
    return Augment(size=image_size)


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
        return SignalShift(size=length, max_shift=max(1, round(SHIFT_FRACTION * length)))
    return Augment(size=length, signal=True)


@dataclass(frozen=True, kw_only=True)
class Augment:
    """The identity ("none"), and the base of every policy: a call checks that the batch is the
    kind of input (`signal`) and the `size` (image side, or signal length) the policy was made
    for, then `apply`s the policy to it."""

    size: int
    signal: bool = False

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        (_check_signal_batch if self.signal else _check_image_batch)(x, self.size)
        return self.apply(x, gen)

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The policy on a checked batch (here: the batch unchanged)."""
        return x


@dataclass(frozen=True, kw_only=True)
class DigitsAugment(Augment):
    """Small random affine (shift, rotation, scale) with zero fill; no flips (a flipped 2 is no 2)."""

    max_shift_px: float
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        angle = _uniform(gen, n, -math.radians(self.max_rotation_deg), math.radians(self.max_rotation_deg))
        zoom = _uniform(gen, n, *self.scale_range)
        # affine_grid works in normalised coordinates where one pixel is 2 / size wide.
        shift = _uniform(gen, 2 * n, -self.max_shift_px, self.max_shift_px).view(n, 2) * (2.0 / self.size)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        return _warp(x, theta, padding_mode="zeros")


@dataclass(frozen=True, kw_only=True)
class CifarAugment(Augment):
    """Reflect-pad by `pad`, crop a random image-sized window (whole pixels), flip half the batch."""

    pad: int

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        padded = F.pad(x, (self.pad,) * 4, mode="reflect")
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=gen, device=gen.device).to(x.device)
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [N,H] source rows
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [N,W] source cols
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
        out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
        flip = _uniform(gen, n, 0.0, 1.0) < 0.5
        return torch.where(flip.to(x.device)[:, None, None, None], out.flip(3), out)


@dataclass(frozen=True, kw_only=True)
class ImagenetAugment(Augment):
    """Random resized crop (bilinear, back to full size) plus horizontal flip, in one affine warp."""

    area_range: tuple[float, float] = (0.35, 1.0)
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3)

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        area = _uniform(gen, n, *self.area_range)
        log_ratio = _uniform(gen, n, math.log(self.ratio_range[0]), math.log(self.ratio_range[1]))
        ratio = torch.exp(log_ratio)
        # Crop width/height as fractions of the image; clamped so the crop stays inside it.
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        centre_x = _uniform(gen, n, -1.0, 1.0) * (1.0 - width)
        centre_y = _uniform(gen, n, -1.0, 1.0) * (1.0 - height)
        flip = torch.where(_uniform(gen, n, 0.0, 1.0) < 0.5, -1.0, 1.0)
        zeros = torch.zeros_like(width)
        theta = torch.stack(
            [torch.stack([width * flip, zeros, centre_x], 1), torch.stack([zeros, height, centre_y], 1)], 1
        )
        return _warp(x, theta, padding_mode="border")


@dataclass(frozen=True, kw_only=True)
class SignalShift(Augment):
    """Per-sample circular shift of signals by up to `max_shift` samples either way."""

    max_shift: int
    signal: bool = True

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, channels, length = x.shape
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (n,), generator=gen, device=gen.device)
        positions = torch.arange(length, device=x.device)
        # out[i, :, t] = x[i, :, (t - shift_i) mod L]: a positive shift moves the signal right.
        index = (positions[None, :] - shifts.to(x.device)[:, None]).remainder(length)
        return x.gather(2, index[:, None, :].expand(n, channels, length))


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """n float32 draws in [low, high) on the generator's device."""
    return torch.rand(n, generator=gen, device=gen.device) * (high - low) + low


def _warp(x: torch.Tensor, theta: torch.Tensor, *, padding_mode: str) -> torch.Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _check_image_batch(x: torch.Tensor, image_size: int) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise DataError(f"augmentation needs a float [N,C,H,W] batch, got {x.dtype} {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (image_size, image_size):
        raise DataError(
            f"augmentation was made for {image_size}x{image_size} images, got {tuple(x.shape[-2:])}"
        )


def _check_signal_batch(x: torch.Tensor, length: int) -> None:
    if x.ndim != 3 or not x.is_floating_point():
        raise DataError(f"signal augmentation needs a float [N,C,L] batch, got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] != length:
        raise DataError(f"signal augmentation was made for length {length}, got length {x.shape[-1]}")
