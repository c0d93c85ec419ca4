"""Signal inputs at export: run.json's signal record → host normalisation, the in-graph
normalisation node chain, and the kiln.json input record (kind "signal", layout NCL, raw FP32)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.inputs import HostPreprocess, SignalPreprocess, preprocess_from_run_input
from export.onnx_export import OnnxExportError, add_normalisation, check_onnx, save_onnx
from serving.contract.manifest import InputSpec, Normalisation
from training.run_record import input_record, signal_input_record

BUNDLE = SimpleNamespace(in_channels=2, signal_length=5, input_scale=1.0, mean=(1.5, -2.0), std=(0.5, 4.0))


def _identity(shape: list[int | str], elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A graph "input" → Identity → "logits", enough to see what a wrapper puts in front."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("input", elem, shape)],
        [helper.make_tensor_value_info("logits", elem, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_signal_record_becomes_signal_preprocessing() -> None:
    pre = preprocess_from_run_input(signal_input_record(BUNDLE))
    assert isinstance(pre, SignalPreprocess) and pre.is_signal
    assert pre.input_shape == (2, 5) and pre.mean == (1.5, -2.0) and pre.scale == 1.0
    image = preprocess_from_run_input(
        input_record(channels=1, size=8, channel_order="L", mean=(0.5,), std=(0.25,))
    )
    assert isinstance(image, HostPreprocess) and not image.is_signal and image.input_shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "audio"}, "unknown kind 'audio'"),
        ({"length": None}, "incomplete or invalid"),
        ({"std": [0.5, 0.0]}, r"std\[1\]: must be >= 1e-12"),
        ({"mean": [1.0]}, "std: expected 1 values"),
        ({"mean": [1.0], "std": [1.0]}, r"mean/std have 1 value\(s\) but the shape has 2 channel"),
        ({"scale": 0.0}, "scale: must be >= 1e-12"),
        ({"layout": "NCHW"}, "layout NCL"),
        ({"length": 0}, "shape: non-batch dims must be >= 1"),
        ({"channels": 0, "mean": [], "std": []}, "mean: expected one value per channel, got none"),
    ],
)
def test_bad_signal_records_are_named(change: dict, message: str) -> None:
    record = {**signal_input_record(BUNDLE), **change}
    with pytest.raises(ValueError, match=message):
        preprocess_from_run_input(record)


def test_host_normalisation_checks_dtype_and_shape() -> None:
    pre = SignalPreprocess(mean=(1.0,), std=(2.0,), channels=1, length=4)
    np.testing.assert_array_equal(pre(np.full((2, 1, 4), 5.0, np.float32)), np.full((2, 1, 4), 2.0))
    with pytest.raises(ValueError, match="float32 signals"):
        pre(np.zeros((2, 1, 4), np.float64))
    with pytest.raises(ValueError, match=r"\[N, 1, 4\]"):
        pre(np.zeros((2, 1, 5), np.float32))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_graph_normalisation_is_the_host_arithmetic(tmp_path: Path, scale: float) -> None:
    pre = SignalPreprocess(mean=(1.5, -2.0), std=(0.5, 4.0), scale=scale, channels=2, length=5)
    wrapped = check_onnx(add_normalisation(_identity(["batch", 2, 5]), pre.input_spec()))
    ops = [node.op_type for node in wrapped.graph.node]
    assert ops == (["Sub", "Div"] if scale == 1.0 else ["Mul", "Sub", "Div"]) + ["Identity"]
    (inp,) = wrapped.graph.input
    assert inp.type.tensor_type.elem_type == TensorProto.FLOAT and inp.name == "input"
    session = ort.InferenceSession(
        str(save_onnx(wrapped, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"]
    )
    raw = np.random.default_rng(0).normal(3.0, 5.0, (7, 2, 5)).astype(np.float32)
    (got,) = session.run(None, {"input": raw})
    np.testing.assert_array_equal(got, pre(raw))  # same float32 ops in the same order: bit-exact


@pytest.mark.parametrize(
    ("model", "mean", "message"),
    [
        (_identity(["batch", 3, 8, 8]), (0.0, 0.0, 0.0), "static float \\[N, 3, 5\\]"),
        (_identity(["batch", 2, "length"]), (0.0, 0.0), "static float \\[N, 2, 5\\]"),
        (_identity(["batch", 2, 5], TensorProto.UINT8), (0.0, 0.0), "static float \\[N, 2, 5\\]"),
        (_identity(["batch", 2, 5]), (0.0, 0.0, 0.0), "static float \\[N, 3, 5\\]"),
    ],
)
def test_graph_normalisation_refuses_a_graph_unlike_the_record(
    model: onnx.ModelProto, mean: tuple, message: str
) -> None:
    pre = SignalPreprocess(mean=mean, std=(1.0,) * len(mean), channels=len(mean), length=5)
    with pytest.raises(OnnxExportError, match=message):
        add_normalisation(model, pre.input_spec())


def test_graph_normalisation_takes_only_an_in_graph_record() -> None:
    with pytest.raises(ValueError, match="the shape has 2 channel"):
        SignalPreprocess(mean=(0.0,), std=(1.0,), channels=2, length=5)  # no record, no graph
    with pytest.raises(ValueError, match=r"std\[1\]: must be >= 1e-12"):
        SignalPreprocess(mean=(0.0, 0.0), std=(1.0, 0.0), channels=2, length=5)
    host = HostPreprocess(mean=(0.5,), std=(0.25,), channels=1, height=5, width=2, channel_order="L")
    with pytest.raises(ValueError, match="not normalised in the graph"):
        add_normalisation(_identity(["batch", 1, 5, 2]), host.input_spec(in_graph=False))


def test_kiln_json_input_record_for_a_signal() -> None:
    pre = SignalPreprocess(mean=(0.1, 0.2), std=(1.0, 2.0), channels=2, length=40)
    spec = pre.input_spec(in_graph=True)
    assert spec.to_dict() == {
        "name": "input",
        "datatype": "FP32",
        "layout": "NCL",
        "shape": [-1, 2, 40],
        "kind": "signal",
        "preprocessing": {"mean": [0.1, 0.2], "std": [1.0, 2.0], "scale": 1.0, "in_graph": True},
    }
    assert InputSpec.from_dict(spec.to_dict()) == spec  # serving's own strict parser accepts it
    assert isinstance(spec.normalisation, Normalisation) and spec.normalisation == pre.normalisation
    with pytest.raises(ValueError, match="always normalises in the graph"):
        pre.input_spec(in_graph=False)


def test_kiln_json_input_record_for_an_image_is_the_same_record_plus_geometry() -> None:
    pre = HostPreprocess(mean=(0.5,), std=(0.25,), channels=1, height=8, width=8, channel_order="L")
    uint8, fp32 = pre.input_spec(in_graph=True), pre.input_spec(in_graph=False)
    assert (uint8.datatype, uint8.layout, uint8.shape) == ("UINT8", "NHWC", (-1, 8, 8, 1))
    assert (fp32.datatype, fp32.layout, fp32.shape) == ("FP32", "NCHW", (-1, 1, 8, 8))
    for spec in (uint8, fp32):
        record = spec.normalisation
        assert record is not None and record.in_graph == (spec is uint8)
        assert (record.mean, record.std, record.scale) == (pre.mean, pre.std, pre.scale)
        assert InputSpec.from_dict(spec.to_dict()) == spec


def test_int8_calibrated_on_normalised_signals_follows_pytorch_on_raw_input(tmp_path: Path) -> None:
    """The pipeline's INT8 recipe for signals: quantise the core with normalised train signals,
    then put the normalisation in front. Calibrating on the raw scale instead (the mistake this
    guards against) mis-sets the activation ranges: measured 2.6 % vs 13 % max logit error."""
    import torch

    from export.fold import fold_batchnorms
    from export.onnx_export import export_onnx
    from export.parity import onnx_runner, torch_logits
    from export.variants import GraphOptions, build_onnx_variants
    from training.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("mnist1d_cnn", in_channels=2)).eval()
    pre = SignalPreprocess(mean=(5.0, -3.0), std=(10.0, 0.5), channels=2, length=40)
    rng = np.random.default_rng(0)
    shape = (1, 2, 1)
    mean, std = np.reshape(pre.mean, shape), np.reshape(pre.std, shape)
    train = (rng.standard_normal((256, 2, 40)) * std + mean).astype(np.float32)
    test = (rng.standard_normal((64, 2, 40)) * std + mean).astype(np.float32)
    core = export_onnx(fold_batchnorms(model)[0], pre.input_shape)
    reference = torch_logits(model, pre(test))
    errors = {}
    for scale, calibration in (("normalised", pre(train)), ("raw", train)):
        work = tmp_path / scale
        work.mkdir()
        options = GraphOptions(preprocess=pre)
        (cand,) = build_onnx_variants(core, ("int8",), work, options=options, calibration=calibration)
        run, _ = onnx_runner(cand.path)
        errors[scale] = float(np.abs(run(test) - reference).max() / np.abs(reference).max())
    assert errors["normalised"] < 0.1, errors
    assert errors["raw"] > 2 * errors["normalised"], errors
