"""A small convolutional classifier published with an FP32 and a real INT8 artefact (ONNX Runtime's
static QDQ quantisation, as export does), each with a parity report, for the `precision: auto`
tests. The convs are wide enough that INT8 kernels matter (on VNNI/AMX CPUs they are faster),
small enough to measure in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, ParityReport, Provenance
from serving.contract.publish import publish_version

SHAPE = (3, 32, 32)
CLASSES = 10


def _build_fp32(path: Path, seed: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev, channels = [], [], "input", SHAPE[0]
    for i, width in enumerate((32, 64, 64)):
        w = rng.normal(0, (2 / (9 * channels)) ** 0.5, (width, channels, 3, 3)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        prev, channels = f"r{i}", width
    fc = rng.normal(0, 0.1, (channels, CLASSES)).astype(np.float32)
    inits += [
        numpy_helper.from_array(fc, "fc"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fcb"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _quantise(fp32: Path, int8: Path, seed: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(seed)
            self._batches = iter(
                [{"input": rng.normal(size=(8, *SHAPE)).astype(np.float32)} for _ in range(4)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    quantize_static(
        str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def _parity(passed: bool = True, forced: bool = False) -> ParityReport:
    return ParityReport(
        reference="synthetic test model", samples=32, max_abs_err=0.01, max_rel_err=0.01,
        top1_agreement=1.0 if passed else 0.5, accuracy=0.9, reference_accuracy=0.9,
        tolerances={"accuracy_drop": 0.01}, passed=passed, forced=forced,
    )  # fmt: skip


def publish_convnet(repo: Path, name: str = "convnet", *, seed: int = 0, int8_forced: bool = False) -> Path:
    """Publish FP32 + INT8; `int8_forced`: the INT8 artefact missed its tolerance and was forced."""

    def populate(tmp: Path, version: int) -> Manifest:
        _build_fp32(tmp / "model.onnx", seed)
        _quantise(tmp / "model.onnx", tmp / "model.int8.onnx", seed)
        int8_parity = _parity(passed=not int8_forced, forced=int8_forced)
        return Manifest(
            name=name,
            version=version,
            architecture={"arch": "test-convnet", "seed": seed},
            labels=tuple(str(i) for i in range(CLASSES)),
            input=InputSpec(name="input", datatype="FP32", layout="NCHW", shape=(-1, *SHAPE)),
            outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, CLASSES)),),
            artefacts=(
                Artefact.from_file(tmp, "model.onnx", format="onnx", precision="fp32", parity=_parity()),
                Artefact.from_file(
                    tmp, "model.int8.onnx", format="onnx", precision="int8", parity=int8_parity
                ),
            ),
            max_batch_size=16,
            provenance=Provenance(
                run_id=f"test-{seed}",
                dataset_fingerprint="0" * 64,
                git_commit=None,
                created_at="2026-01-01T00:00:00Z",
                kiln_version="test",
            ),
        )

    return publish_version(repo, name, populate).path
