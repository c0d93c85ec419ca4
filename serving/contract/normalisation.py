"""The one host normalisation: (x·scale − mean) ÷ std per channel, in float32.

kiln.json's normalisation record (`Normalisation`: scale, mean, std; an image's `Preprocessing` is
one) is applied by this function wherever it runs on the host: export's reference inputs, images
and signals alike (export/inputs.py), and serving's host-preprocessed images
(runtime/preprocess.py). It keeps the order and float32 arithmetic of the in-graph emitter
(export/onnx_export.py `_normalisation_nodes`: Mul → Sub → Div), so host and graph agree to the
bit. Training keeps its own torch copy (training/evaluate.py `Normalizer`): it runs on the training
device inside autograd-free batches, and training may not import serving (the import boundary).
"""

from __future__ import annotations

import numpy as np

from serving.contract.io_spec import Normalisation

__all__ = ["normalise"]


def normalise(
    values: np.ndarray,
    record: Normalisation,
    *,
    channel_axis: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(values·scale − mean) ÷ std with `record`'s mean/std per channel along `channel_axis`, as
    float32 (whatever `record.in_graph` says: the caller has decided the host runs it).

    `values` may be uint8 pixels or float32 signals; `out` (float32, values' shape) avoids an
    allocation on the serving path.
    """
    scale, mean, std = record.scale, record.mean, record.std
    shape = [1] * values.ndim
    shape[channel_axis] = len(mean)
    if values.shape[channel_axis] != len(mean):
        raise ValueError(
            f"mean/std have {len(mean)} values for {values.shape[channel_axis]} channels "
            f"(axis {channel_axis} of shape {values.shape})"
        )
    if out is None:
        out = np.empty(values.shape, np.float32)
    np.multiply(values, np.float32(scale), out=out, casting="unsafe")
    np.subtract(out, np.asarray(mean, np.float32).reshape(shape), out=out)
    np.divide(out, np.asarray(std, np.float32).reshape(shape), out=out)
    return out
