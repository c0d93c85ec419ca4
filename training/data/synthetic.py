"""`synthetic`: procedural oriented stripes for tests, learnable by a tiny CNN in a few epochs."""

from __future__ import annotations

import math

import torch

from training.data.bundle import DataBundle, tensor_bundle
from training.data.spec import DataSpec

_ORIENTATIONS = 6  # classes beyond this reuse an angle at a higher stripe frequency
_NOISE = 0.12  # pixel noise std on the [0,1] scale: enough that the set is not trivial
_CHUNK = 2048


def load_synthetic_bundle(spec: DataSpec) -> DataBundle:
    """Balanced synthetic set (`spec.num_samples` over `spec.num_classes`), split stratified."""
    labels = torch.arange(spec.num_samples, dtype=torch.int64) % spec.num_classes
    images = make_stripes(labels, spec.image_size, spec.channels or 1, seed=spec.seed)
    return tensor_bundle(
        spec,
        pool=(images, labels),
        test=None,
        class_names=tuple(f"class_{k}" for k in range(spec.num_classes)),
        # Flips and rotations would change a stripe's orientation, i.e. its class.
        default_augment="none",
    )


def make_stripes(labels: torch.Tensor, size: int, channels: int, *, seed: int) -> torch.Tensor:
    """uint8 [N,C,size,size] sinusoidal stripes whose angle and frequency encode the label.

    Phase, contrast, per-channel gain and pixel noise are random (from `seed`), so a model must
    learn orientation/frequency rather than memorise pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    angle = (labels % _ORIENTATIONS).float() * (math.pi / _ORIENTATIONS)
    cycles = 2.0 + 1.5 * (labels // _ORIENTATIONS).float()  # stripe periods across the image
    phase = torch.rand(n, generator=gen) * 2 * math.pi
    contrast = 0.25 + 0.2 * torch.rand(n, generator=gen)
    gain = 0.6 + 0.4 * torch.rand(n, channels, generator=gen)
    coords = torch.linspace(-0.5, 0.5, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):  # bounded float temporaries for large sets
        sl = slice(start, start + _CHUNK)
        projection = torch.cos(angle[sl])[:, None, None] * xx + torch.sin(angle[sl])[:, None, None] * yy
        wave = torch.sin(2 * math.pi * cycles[sl, None, None] * projection + phase[sl, None, None])
        pattern = 0.5 + contrast[sl, None, None] * wave  # [n,H,W] in [0.05, 0.95]
        noise = _NOISE * torch.randn(wave.shape[0], channels, size, size, generator=gen)
        pixels = pattern[:, None] * gain[sl, :, None, None] + noise
        out[sl] = (pixels * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out
