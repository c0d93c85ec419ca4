"""ONNX export: dynamic batch, no BN left, one self-contained file, in-graph preprocessing, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.fold import fold_batchnorms
from export.inputs import HostPreprocess
from export.onnx_export import (
    OPSET,
    OnnxExportError,
    add_normalisation,
    add_softmax,
    check_onnx,
    count_ops,
    export_onnx,
    ort_optimize,
    save_onnx,
    sort_nodes,
)
from export.parity import DEFAULT_TOLERANCES, compare_outputs, onnx_runner, torch_logits
from export.variants import GraphOptions, finish_graph
from tests.unit.test_export_fold import randomise_bn
from training.models import ModelConfig, build_model, preset

SHAPE = (3, 16, 16)
MAX_BATCH = 16


def _torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return torch_logits(model, x)


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, onnx.ModelProto]:
    model = randomise_bn(build_model(preset("resnet20", width=4, shortcut="B")))
    return model, export_onnx(fold_batchnorms(model)[0], SHAPE)


@pytest.fixture(scope="module")
def vgg() -> tuple[torch.nn.Module, onnx.ModelProto]:
    config = ModelConfig(arch="plain_cnn", channels=(8, 16), convs_per_stage=2, hidden=(16,), num_classes=5)
    model = randomise_bn(build_model(config))
    return model, export_onnx(fold_batchnorms(model)[0], SHAPE)


def _session(model: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> ort.InferenceSession:
    path = save_onnx(model, tmp_path / name)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("which", ["resnet", "vgg"])
def test_v1_and_vgg_graphs_have_no_batchnorm(which: str, request: pytest.FixtureRequest) -> None:
    _, proto = request.getfixturevalue(which)
    assert count_ops(proto, "BatchNormalization") == 0
    assert count_ops(proto, "Conv") > 0
    finish_graph(proto, GraphOptions())  # full checker + strict shape inference + BN assertion


def test_unfolded_export_does_keep_batchnorm_so_the_assertion_can_fail() -> None:
    model = randomise_bn(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4))
    )
    proto = export_onnx(model, SHAPE, optimize=False)
    assert count_ops(proto, "BatchNormalization") >= 1
    with pytest.raises(OnnxExportError, match="BatchNormalization"):
        finish_graph(proto, GraphOptions())


def test_dynamic_batch_runs_1_7_and_max(resnet: tuple, tmp_path: Path) -> None:
    model, proto = resnet
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    session = _session(proto, tmp_path)
    rng = np.random.default_rng(0)
    for batch in (1, 7, MAX_BATCH):
        x = rng.standard_normal((batch, *SHAPE)).astype(np.float32)
        out = session.run(["logits"], {"input": x})[0]
        assert out.shape == (batch, 10)
        result = compare_outputs(
            _torch(model, x),
            out,
            np.zeros(batch, np.int64),
            DEFAULT_TOLERANCES["fp32"],
            artefact="m",
            precision="fp32",
        )
        assert result.passed, result.failures


def test_one_self_contained_file_with_stated_opset_and_names(resnet: tuple, tmp_path: Path) -> None:
    _, proto = resnet
    path = save_onnx(proto, tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    loaded = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    assert {o.domain: o.version for o in loaded.opset_import}[""] == OPSET >= 17
    assert [i.name for i in loaded.graph.input] == ["input"]
    assert [o.name for o in loaded.graph.output] == ["logits"]


def test_in_graph_preprocessing_matches_host_preprocessing(vgg: tuple, tmp_path: Path) -> None:
    model, proto = vgg
    pre = HostPreprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), channels=3, height=16, width=16)
    wrapped = finish_graph(proto, GraphOptions(preprocess=pre, probabilities=True))
    session = _session(wrapped, tmp_path)
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [16, 16, 3]
    images = np.random.default_rng(1).integers(0, 256, (7, *SHAPE), dtype=np.uint8)
    logits, probs = session.run(None, {"input": np.ascontiguousarray(images.transpose(0, 2, 3, 1))})
    host = _torch(model, pre(images))
    np.testing.assert_array_equal(logits.argmax(1), host.argmax(1))
    assert np.abs(logits - host).max() <= 1e-4 * np.abs(host).max()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))


def test_preact_graph_uses_mul_add_not_batchnorm(tmp_path: Path) -> None:
    model = randomise_bn(build_model(preset("preact_resnet20", width=4)))
    proto = finish_graph(export_onnx(fold_batchnorms(model)[0], SHAPE), GraphOptions())
    assert count_ops(proto, "BatchNormalization") == 0 and count_ops(proto, "Mul") > 0
    x = np.random.default_rng(2).standard_normal((3, *SHAPE)).astype(np.float32)
    out = _session(proto, tmp_path).run(["logits"], {"input": x})[0]
    assert np.abs(out - _torch(model, x)).max() <= 1e-4 * np.abs(out).max()


def test_ort_optimized_copy_gives_the_same_logits(vgg: tuple, tmp_path: Path) -> None:
    _, proto = vgg
    source = save_onnx(proto, tmp_path / "model.onnx")
    optimised = ort_optimize(source, tmp_path / "model.ort.onnx")
    x = np.random.default_rng(3).standard_normal((4, *SHAPE)).astype(np.float32)
    a, _ = onnx_runner(source)
    b, _ = onnx_runner(optimised)
    np.testing.assert_allclose(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_checker_rejects_a_broken_graph(vgg: tuple) -> None:
    _, proto = vgg
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    broken.graph.node[0].input[1] = "no_such_weight"
    with pytest.raises(OnnxExportError, match="ONNX check failed"):
        check_onnx(broken)


def test_sort_nodes_restores_topological_order(vgg: tuple) -> None:
    _, proto = vgg
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(add_softmax(proto))
    nodes = list(shuffled.graph.node)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(reversed(nodes))
    with pytest.raises(OnnxExportError):
        check_onnx(shuffled)
    check_onnx(sort_nodes(shuffled))


def test_bad_export_arguments_are_refused(vgg: tuple) -> None:
    model, proto = vgg
    with pytest.raises(ValueError, match="sample_batch"):
        export_onnx(model, SHAPE, sample_batch=1)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, SHAPE, opset=16)
    one_channel = HostPreprocess(mean=(0.5,), std=(0.5,), channels=1, height=16, width=16, channel_order="L")
    with pytest.raises(OnnxExportError, match=r"static float \[N, 1, 16, 16\]"):
        add_normalisation(proto, one_channel.input_spec(in_graph=True))
