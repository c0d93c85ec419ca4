"""One normalisation: serving's host preprocessing, export's parity reference and the in-graph
emitter compute the same float32 values, to the bit (serving/contract/normalisation.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.inputs import HostPreprocess
from export.onnx_export import add_normalisation, check_onnx, save_onnx
from serving.contract.io_spec import InputSpec, Normalisation, Preprocessing
from serving.contract.normalisation import normalise
from serving.runtime.preprocess import Preprocessor

MEAN, STD, SIZE = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616), 6


def _pixels(count: int) -> np.ndarray:
    """Every uint8 value, in several channels and positions: uint8 [N, H, W, 3]."""
    values = np.arange(count * SIZE * SIZE * 3, dtype=np.int64) * 7 % 256
    return values.astype(np.uint8).reshape(count, SIZE, SIZE, 3)


def _spec(layout: str, datatype: str = "FP32") -> InputSpec:
    shape = (-1, 3, SIZE, SIZE) if layout == "NCHW" else (-1, SIZE, SIZE, 3)
    pre = Preprocessing(resize=None, crop=None, mean=MEAN, std=STD)
    return InputSpec(name="input", datatype=datatype, layout=layout, shape=shape, preprocessing=pre)


def _identity_nchw() -> onnx.ModelProto:
    shape = ["batch", 3, SIZE, SIZE]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_served_rows_are_exports_reference_and_the_graphs_to_the_bit(tmp_path: Path) -> None:
    nhwc = _pixels(12)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    host = HostPreprocess(mean=MEAN, std=STD, height=SIZE, width=SIZE)
    reference = host(nchw)
    served = Preprocessor(_spec("NCHW")).preprocess_batch(list(nhwc))
    np.testing.assert_array_equal(served, reference)
    served_nhwc = Preprocessor(_spec("NHWC")).preprocess_batch(list(nhwc))
    np.testing.assert_array_equal(served_nhwc, reference.transpose(0, 2, 3, 1))
    graph = check_onnx(add_normalisation(_identity_nchw(), host.input_spec(in_graph=True)))
    session = ort.InferenceSession(
        str(save_onnx(graph, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"]
    )
    (in_graph,) = session.run(None, {"input": nhwc})
    np.testing.assert_array_equal(in_graph, reference)


def test_fp16_rows_are_the_float32_values_rounded_once() -> None:
    nhwc = _pixels(3)
    want = normalise(nhwc, _spec("NHWC").preprocessing, channel_axis=-1).astype(np.float16)
    got = Preprocessor(_spec("NHWC", "FP16")).preprocess_batch(list(nhwc))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)


def test_mismatched_statistics_are_named() -> None:
    with pytest.raises(ValueError, match="mean/std have 2 values for 3 channels"):
        normalise(np.zeros((1, 3, 2, 2), np.uint8), Normalisation(mean=(0.0, 0.0), std=(1.0, 1.0)))
