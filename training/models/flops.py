"""Parameter and multiply-accumulate (MAC) counts.

MACs are counted by forward hooks on convolutions and linear layers only: one MAC per weight
use, i.e. conv: out_elements * (in_channels / groups) * kernel_elements; linear: out_elements *
in_features. Bias adds, BatchNorm, activations, pooling and residual sums are not counted (they
are O(activations), not O(weights x activations), and fold or fuse at export). This is the
convention behind the usual figures (torchvision's ResNet-50 "4.09 GFLOPS" is 4.09 GMACs).
Multiply by 2 for FLOPs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def macs_by_layer(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs of each convolution/linear module for one sample, keyed by module name.

    `input_shape` is one sample's shape without the batch dimension, e.g. (3, 224, 224), or
    (channels, length) for a 1-D model (`spatial_dims=1`). The
    model runs once in eval mode under no_grad on zeros with the dtype and device of its first
    parameter (a model built under `torch.device("meta")` is counted without any memory).
    """
    import torch
    from torch import nn

    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape):
        raise ValueError(f"input_shape={input_shape!r} must be positive integers, e.g. (3, 224, 224)")
    counts: dict[str, int] = {}

    def hook(name: str) -> object:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            counts[name] = counts.get(name, 0) + _layer_macs(module, inputs[0], output)

        return record

    layers = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, layers)]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
    except RuntimeError as exc:
        raise ValueError(
            f"cannot run the model on one sample of shape {shape} (give the shape without the "
            f"batch dimension): {exc}"
        ) from exc
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Total multiply-accumulates of one forward pass for one sample of shape `input_shape`
    (no batch dimension, e.g. (3, 224, 224), or (1, 40) for a 1-D model); see the module
    docstring for what is counted."""
    return sum(macs_by_layer(model, input_shape).values())


def _layer_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    from torch import nn

    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    if module.transposed:  # each input element is scattered through the kernel
        return x.numel() * (module.out_channels // module.groups) * kernel
    return out.numel() * (module.in_channels // module.groups) * kernel
