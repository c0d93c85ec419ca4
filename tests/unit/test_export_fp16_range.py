"""FP16 range proof: measured FP32 activation ranges keep out-of-range nodes in FP32.

"Truly computed in FP16" is onnx's reference evaluator: it runs each op in numpy at the graph's
own dtypes, so an FP16 tensor past 65504 becomes inf there, while ONNX Runtime's CPU provider
(which computes FP16 graphs in FP32) hides it. numpy's overflow warning is an error in this
suite (pyproject's filterwarnings), so a fixed graph evaluating without one is part of the proof.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from export.fp16 import FP16_MAX, Fp16Error, convert_fp16
from export.fp16_range import ActivationRanges, measure_activation_ranges
from export.onnx_export import check_onnx, export_onnx, save_onnx
from export.parity import onnx_runner
from serving.contract.manifest import Artefact, ManifestError
from serving.contract.manifest_types import Fp16Range

SHAPE = (3, 8, 8)


class HotMiddle(torch.nn.Module):
    """conv1's weights (5000) fit FP16, but on N(0, 1) inputs its outputs reach ~9e4; a scale of
    1e-3 brings them back, so only conv1 → relu → mul need FP32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.conv1.weight.fill_(5000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x)) * 1e-3
        return self.fc(torch.relu(self.conv2(y)).mean(dim=(2, 3)))


class HotLogits(torch.nn.Module):
    """The ResNet-50 case: everything fits FP16 except the logits (~4e5)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.conv.weight.mul_(100.0)
            self.fc.weight.mul_(3e4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _normal() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def hot_middle() -> onnx.ModelProto:
    return export_onnx(HotMiddle().eval(), SHAPE)


def _in_fp16(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return np.asarray(ReferenceEvaluator(model).run(None, {"input": x})[0])


def _overflows_in_fp16(model: onnx.ModelProto, x: np.ndarray) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _in_fp16(model, x)
    assert any("overflow" in str(w.message) for w in caught), [str(w.message) for w in caught]
    return not np.isfinite(out).all()


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    return {out: node.name for node in model.graph.node for out in node.output}


def test_ranges_cover_every_tensor_and_chunking_changes_nothing(
    hot_middle: onnx.ModelProto, inputs: np.ndarray
) -> None:
    one = measure_activation_ranges(hot_middle, [inputs], batch_size=64, chunk_batches=1)
    chunked = measure_activation_ranges(hot_middle, [inputs[:37], inputs[37:]], batch_size=5, chunk_batches=2)
    outputs = {out for node in hot_middle.graph.node for out in node.output}
    assert outputs | {"input"} <= set(one.max_abs)
    assert one.samples == chunked.samples == 64
    for name, value in one.max_abs.items():
        assert chunked.max_abs[name] == pytest.approx(value, rel=1e-6)
    assert one.max_abs["input"] == pytest.approx(float(np.abs(inputs).max()), rel=1e-6)
    tensor, largest = one.largest()
    assert largest > FP16_MAX and _producers(hot_middle)[tensor] == "node_conv2d"
    assert one.limit == FP16_MAX / 4
    assert set(one.over_limit()) == {"conv2d", "relu"}


def test_without_the_proof_fp16_overflows_where_the_cpu_cannot_see_it(
    hot_middle: onnx.ModelProto, inputs: np.ndarray, tmp_path: Path
) -> None:
    fp16, report = convert_fp16(hot_middle)  # weights fit: the weight guard alone lets it through
    assert report.kept_fp32_nodes == ()
    cpu, _ = onnx_runner(save_onnx(fp16, tmp_path / "fp16.onnx"))
    assert np.isfinite(cpu(inputs)).all()  # ORT's CPU provider: FP32 inside, overflow hidden
    assert _overflows_in_fp16(fp16, inputs)  # true FP16 arithmetic: inf/NaN


def test_with_the_proof_hot_nodes_stay_fp32_and_fp16_is_finite(
    hot_middle: onnx.ModelProto, inputs: np.ndarray, tmp_path: Path
) -> None:
    ranges = measure_activation_ranges(hot_middle, [inputs])
    fp16, report = convert_fp16(hot_middle, ranges=ranges)
    check_onnx(fp16)
    assert report.kept_fp32_nodes == ("node_conv2d", "node_mul_4", "node_relu")
    assert set(report.hot_tensors) == {"conv2d", "relu"}
    weights = {t.name: t.data_type for t in fp16.graph.initializer}
    assert weights["conv1.weight"] == onnx.TensorProto.FLOAT
    assert weights["conv2.weight"] == weights["fc.weight"] == onnx.TensorProto.FLOAT16
    to_fp16 = [
        n for n in fp16.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16
    ]
    assert {n.input[0] for n in to_fp16} == {"mul_4_cast_to_fp16"}  # only the scaled-down value
    reference = _in_fp16(hot_middle, inputs)
    truly_fp16 = _in_fp16(fp16, inputs)
    assert np.isfinite(truly_fp16).all()
    assert np.abs(truly_fp16 - reference).max() < 1e-2 * np.abs(reference).max()
    cpu, _ = onnx_runner(save_onnx(fp16, tmp_path / "fp16.onnx"))
    assert np.abs(cpu(inputs) - reference).max() < 1e-2 * np.abs(reference).max()
    range_dict = report.to_dict()["range"]
    assert range_dict["margin"] == 4.0 and range_dict["max_abs_activation"] > FP16_MAX


def test_hot_logits_stay_fp32_to_the_output_or_are_refused(inputs: np.ndarray) -> None:
    core = export_onnx(HotLogits().eval(), SHAPE)
    ranges = measure_activation_ranges(core, [inputs])
    assert ranges.largest()[0] == "logits" and ranges.largest()[1] > FP16_MAX
    fp16, report = convert_fp16(core, ranges=ranges)
    assert report.kept_fp32_nodes == ("node_linear",)
    assert np.isfinite(_in_fp16(fp16, inputs)).all()
    unfixed, _ = convert_fp16(core)
    assert _overflows_in_fp16(unfixed, inputs)
    # FP16 graph outputs cannot hold them: refused, with the tensor and why.
    with pytest.raises(Fp16Error, match=r"could not be kept in FP32 \(logits: cast to FP16"):
        convert_fp16(core, ranges=ranges, keep_io_types=False)
    with pytest.raises(Fp16Error, match=r"1 activation\(s\) exceed FP16 max 65504 / margin 4 = 16376"):
        convert_fp16(core, ranges=ranges, policy="refuse")


def test_margin_sets_the_limit(hot_middle: onnx.ModelProto, inputs: np.ndarray) -> None:
    ranges = measure_activation_ranges(hot_middle, [inputs], margin=1.0)
    assert ranges.limit == FP16_MAX and set(ranges.over_limit()) <= {"conv2d", "relu"}
    strict = measure_activation_ranges(hot_middle, [inputs], margin=1e6)
    assert "input" in strict.over_limit()  # |x| ~ 4 > 0.065
    _, report = convert_fp16(hot_middle, ranges=strict)  # everything kept, graph input included
    assert len(report.kept_fp32_nodes) == len(hot_middle.graph.node)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="margin"):
            ActivationRanges(max_abs={}, samples=1, margin=bad)


def test_nonfinite_fp32_activations_are_refused() -> None:
    core = export_onnx(_normal().eval(), SHAPE)
    ranges = ActivationRanges(max_abs={"input": float("nan")}, samples=1)
    with pytest.raises(Fp16Error, match="FP32 graph itself produced inf/NaN in input"):
        convert_fp16(core, ranges=ranges)


def test_a_normal_model_blocks_nothing(inputs: np.ndarray) -> None:
    core = export_onnx(_normal().eval(), SHAPE)
    ranges = measure_activation_ranges(core, [inputs])
    fp16, report = convert_fp16(core, ranges=ranges)
    assert report.kept_fp32_nodes == () and report.hot_tensors == {}
    assert ranges.largest()[1] < ranges.limit
    assert not any(n.op_type == "Identity" for n in fp16.graph.node)


def _artefact(tmp_path: Path, precision: str, **extra: object) -> Artefact:
    (tmp_path / "m.onnx").write_bytes(b"x")
    return Artefact.from_file(tmp_path, "m.onnx", format="onnx", precision=precision, **extra)


def test_manifest_records_the_range_and_old_entries_still_load(tmp_path: Path) -> None:
    proof = Fp16Range(
        margin=4.0, max_abs_activation=9e4, max_activation_tensor="conv2d", samples=64, kept_fp32_nodes=["a"]
    )
    art = _artefact(tmp_path, "fp16", fp16_range=proof)
    data = art.to_dict()
    assert data["fp16_range"]["kept_fp32_nodes"] == ["a"] and data["fp16_range"]["margin"] == 4.0
    assert Artefact.from_dict(data) == art
    old = {k: v for k, v in data.items() if k != "fp16_range"}  # a kiln.json from before
    assert Artefact.from_dict(old).fp16_range is None
    with pytest.raises(ManifestError, match="fp16_range"):
        _artefact(tmp_path, "fp32", fp16_range=proof)
    with pytest.raises(ManifestError, match="margin"):
        Fp16Range(margin=0.5, max_abs_activation=1.0)
