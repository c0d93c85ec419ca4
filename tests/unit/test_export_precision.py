"""FP16 conversion and its overflow guard, INT8 settings and QDQ graphs, and the parity gate's maths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.fp16 import FP16_MAX, Fp16Error, convert_fp16, find_fp16_overflows
from export.int8 import Int8Settings, cpu_has_vnni, int8_settings, quantize_int8
from export.onnx_export import check_onnx, export_onnx, save_onnx
from export.parity import DEFAULT_TOLERANCES, FP16_CPU_NOTE, Tolerance, compare_outputs, onnx_runner

SHAPE = (3, 8, 8)


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def core() -> onnx.ModelProto:
    return export_onnx(_small_model(), SHAPE)


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_fp16_keeps_fp32_io_and_is_close(core: onnx.ModelProto, tmp_path: Path) -> None:
    fp16, report = convert_fp16(core)
    check_onnx(fp16)
    assert report.overflowing == () and report.kept_fp32_nodes == ()
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _initializer(fp16, "0.weight").data_type == onnx.TensorProto.FLOAT16
    x = np.random.default_rng(0).standard_normal((4, *SHAPE)).astype(np.float32)
    a, _ = onnx_runner(save_onnx(core, tmp_path / "a.onnx"))
    b, _ = onnx_runner(save_onnx(fp16, tmp_path / "b.onnx"))
    result = compare_outputs(
        a(x), b(x), np.zeros(4, np.int64), DEFAULT_TOLERANCES["fp16"], artefact="b", precision="fp16"
    )
    assert result.passed and 0 < result.max_rel_err < 1e-2


def test_fp16_guard_keeps_overflowing_weights_in_fp32(core: onnx.ModelProto) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(core)
    weight = _initializer(model, "2.weight")
    values = numpy_helper.to_array(weight).copy()
    values[0, 0, 0, 0] = 2 * FP16_MAX
    weight.CopyFrom(numpy_helper.from_array(values, "2.weight"))
    assert find_fp16_overflows(model) == ("2.weight",)
    fp16, report = convert_fp16(model)
    check_onnx(fp16)
    assert report.overflowing == ("2.weight",) and len(report.kept_fp32_nodes) == 1
    kept = _initializer(fp16, "2.weight")
    assert kept.data_type == onnx.TensorProto.FLOAT  # not clamped to 65504
    assert numpy_helper.to_array(kept)[0, 0, 0, 0] == 2 * FP16_MAX
    assert _initializer(fp16, "0.weight").data_type == onnx.TensorProto.FLOAT16
    with pytest.raises(Fp16Error, match=r"2\.weight"):
        convert_fp16(model, policy="refuse")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu sse avx2 avx512f", False), ("fpu avx2 avx512_vnni", True), ("fpu avx2 avx_vnni", True)],
)
def test_vnni_detection(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_vnni(cpuinfo) is expected
    assert cpu_has_vnni(tmp_path / "missing") is None


def test_int8_settings_follow_ort_recommendations() -> None:
    no_vnni = int8_settings("cpu", vnni=False)
    assert no_vnni.activation_type == "QUInt8" and no_vnni.weight_type == "QInt8" and no_vnni.per_channel
    if no_vnni.machine.lower() in ("x86_64", "amd64"):
        assert no_vnni.reduce_range  # U8S8 on AVX2/AVX512 without VNNI can saturate
    assert not int8_settings("cpu", vnni=True).reduce_range
    trt = int8_settings("tensorrt")
    assert trt.activation_type == "QInt8" and trt.symmetric_activations and not trt.reduce_range
    with pytest.raises(ValueError, match="TensorRT needs symmetric"):
        Int8Settings(target="tensorrt", activation_type="QUInt8")


def _zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    names = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names]


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_int8_qdq_graph(core: onnx.ModelProto, tmp_path: Path, target: str) -> None:
    calibration = np.random.default_rng(0).standard_normal((32, *SHAPE)).astype(np.float32)
    settings = int8_settings(target, calibration_samples=16)
    qdq = quantize_int8(core, calibration, settings)
    check_onnx(qdq)
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    zero_points = _zero_points(qdq)
    assert zero_points
    if target == "tensorrt":
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    else:
        assert all(z.dtype == np.uint8 for z in zero_points)
    per_channel = [
        numpy_helper.to_array(t)
        for t in qdq.graph.initializer
        if t.name.startswith("0.weight") and t.name.endswith("scale")
    ]
    assert per_channel and per_channel[0].shape == (8,)
    x = calibration[:8]
    a, _ = onnx_runner(save_onnx(core, tmp_path / "a.onnx"))
    b, _ = onnx_runner(save_onnx(qdq, tmp_path / "b.onnx"))
    assert np.abs(a(x) - b(x)).max() < 0.1 * np.abs(a(x)).max()


def test_broken_artefact_is_refused_by_the_gate(core: onnx.ModelProto, tmp_path: Path) -> None:
    broken = onnx.ModelProto()
    broken.CopyFrom(core)
    weight = _initializer(broken, "6.weight")
    values = numpy_helper.to_array(weight) * 1.01  # a 1 % weight perturbation
    weight.CopyFrom(numpy_helper.from_array(values.astype(np.float32), "6.weight"))
    x = np.random.default_rng(1).standard_normal((16, *SHAPE)).astype(np.float32)
    ref = onnx_runner(save_onnx(core, tmp_path / "ref.onnx"))[0](x)
    out = onnx_runner(save_onnx(broken, tmp_path / "broken.onnx"))[0](x)
    labels = ref.argmax(1)
    result = compare_outputs(
        ref, out, labels, DEFAULT_TOLERANCES["fp32"], artefact="broken", precision="fp32"
    )
    assert not result.passed and any("max rel err" in f for f in result.failures)


def test_compare_outputs_reports_each_missed_criterion() -> None:
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0]])
    labels = np.array([0, 1, 2, 1])  # reference accuracy 3/4
    flipped = ref.copy()
    flipped[0] = [0.0, 1.0, 3.0]  # one disagreement, one more error
    tol = Tolerance(min_agreement=1.0, max_rel_err=1e-3, max_accuracy_drop=0.1)
    result = compare_outputs(ref, flipped, labels, tol, artefact="x", precision="int8", note=FP16_CPU_NOTE)
    assert result.top1_agreement == 0.75 and result.accuracy == 0.5 and result.reference_accuracy == 0.75
    assert len(result.failures) == 3 and "accuracy drop 25.00 pts > 10.00 pts" in result.failures[2]
    nan = compare_outputs(ref, ref * np.nan, labels, Tolerance(), artefact="x", precision="fp16")
    assert nan.failures == ("outputs contain NaN/inf",)
    assert compare_outputs(ref, ref, labels, tol, artefact="x", precision="fp32").passed
    with pytest.raises(ValueError, match="shapes"):
        compare_outputs(ref, ref[:, :2], labels, tol, artefact="x", precision="fp32")
