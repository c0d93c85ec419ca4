"""The 1-D path through the project's ONNX exporter: a signal model exports with a dynamic batch
and ONNX Runtime reproduces PyTorch (image families are covered by export's own tests)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import check_onnx, export_onnx
from training.models import build_model, preset


def test_mnist1d_seed_model_exports_with_dynamic_batch() -> None:
    torch.manual_seed(0)
    model = build_model(preset("mnist1d_cnn")).eval()
    proto = check_onnx(export_onnx(model, (1, 40)))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()
    assert spec.shape[1:] == [1, 40] and not isinstance(spec.shape[0], int)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 40)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {spec.name: x.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
