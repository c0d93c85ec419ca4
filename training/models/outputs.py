"""What a zoo model returns: logits, or in training mode with auxiliary heads `AuxLogits`.

Torch-free at import, so the package can export `split_logits` without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

AUX_LOSS_WEIGHT = 0.3  # GoogLeNet (Szegedy et al. 2014): the auxiliary losses' discount weight


class AuxLogits(NamedTuple):
    """Training-mode output of a network with auxiliary classifiers (GoogLeNet `aux_heads`)."""

    logits: torch.Tensor
    aux: tuple[torch.Tensor, ...]


def split_logits(output: torch.Tensor | AuxLogits) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(main logits, auxiliary logits) of any zoo model's output; aux is () for a plain tensor.

    Training loss with heads: `CE(logits) + AUX_LOSS_WEIGHT * sum(CE(a) for a in aux)`.
    """
    if isinstance(output, AuxLogits):
        return output.logits, output.aux
    return output, ()
