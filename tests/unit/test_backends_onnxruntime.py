"""ONNX Runtime backend and loader on a real tiny ONNX model built here with onnx.helper."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper, save_model

from serving.contract.manifest import (
    Artefact,
    InputSpec,
    Manifest,
    OutputSpec,
    Preprocessing,
    Provenance,
    TensorRTInfo,
)
from serving.errors import InvalidInputError, ModelLoadError
from serving.runtime.backends import BackendOptions, load_backend
from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((16, 3)).astype(np.float32)
BIAS = RNG.standard_normal(3).astype(np.float32)


def write_model(path: Path, *, fp16_io: bool = False) -> Path:
    """logits = flatten(input) @ W + b, input [N,1,4,4]; optionally fp16 at the boundary."""
    io_type = TensorProto.FLOAT16 if fp16_io else TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["input"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["x32"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "b"], ["y32"]),
        helper.make_node("Cast", ["y32"], ["logits"], to=io_type),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", io_type, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", io_type, ["N", 3])],
        initializer=[numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, str(path))
    return path


def expected(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32) @ WEIGHT + BIAS


def make_manifest(
    version_dir: Path, artefact: Artefact, *, input_name: str = "input", **extra: Any
) -> Manifest:
    return Manifest(
        name="tiny",
        version=1,
        architecture={"arch": "linear"},
        labels=("a", "b", "c"),
        input=InputSpec(
            name=input_name,
            datatype="FP32",
            layout="NCHW",
            shape=(-1, 1, 4, 4),
            preprocessing=Preprocessing(resize=4, crop=4, mean=(0.5,), std=(0.25,), channel_order="L"),
        ),
        outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, 3)),),
        artefacts=(artefact,),
        max_batch_size=4,
        provenance=Provenance(
            run_id="r",
            dataset_fingerprint="f",
            git_commit=None,
            created_at="2026-01-01T00:00:00Z",
            kiln_version="0",
        ),
        **extra,
    )


@pytest.fixture
def version_dir(tmp_path: Path) -> Path:
    write_model(tmp_path / "model.onnx")
    return tmp_path


def onnx_artefact(version_dir: Path, path: str = "model.onnx", **extra: Any) -> Artefact:
    return Artefact.from_file(version_dir, path, format="onnx", precision="fp32", **extra)


def batch(rows: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {"input": RNG.standard_normal((rows, 1, 4, 4)).astype(dtype)}


def test_load_and_infer_matches_numpy(version_dir: Path) -> None:
    backend = load_backend(
        make_manifest(version_dir, onnx_artefact(version_dir)), onnx_artefact(version_dir),
        version_dir=version_dir, verify=True,
    )  # fmt: skip
    try:
        assert [(s.name, s.datatype, s.shape) for s in backend.inputs] == [("input", "FP32", (-1, 1, 4, 4))]
        assert [(s.name, s.datatype, s.shape) for s in backend.outputs] == [("logits", "FP32", (-1, 3))]
        assert backend.max_batch_size == 4 and backend.instances == 1
        feed = batch(3)
        out = backend.infer(feed)
        np.testing.assert_allclose(out["logits"], expected(feed["input"]), rtol=1e-5, atol=1e-5)
    finally:
        backend.close()


def test_batch_limit_and_validation_errors(version_dir: Path) -> None:
    backend = OnnxRuntimeBackend(version_dir / "model.onnx", max_batch_size=4)
    try:
        with pytest.raises(InvalidInputError, match="batch size 5 exceeds the model's max_batch_size 4"):
            backend.infer(batch(5))
        with pytest.raises(InvalidInputError, match="expected datatype FP32, got FP64"):
            backend.infer(batch(2, np.float64))
        with pytest.raises(InvalidInputError, match=r"expected shape \[-1, 1, 4, 4\], got \[2, 1, 4, 5\]"):
            backend.infer({"input": np.zeros((2, 1, 4, 5), np.float32)})
        with pytest.raises(InvalidInputError, match=r"unknown input\(s\) \['x'\]"):
            backend.infer({"x": np.zeros((2, 1, 4, 4), np.float32)})
    finally:
        backend.close()


def test_instances_run_in_parallel_threads_with_correct_results(version_dir: Path) -> None:
    options = BackendOptions(instances=2, intra_op_threads=1)
    backend = OnnxRuntimeBackend(version_dir / "model.onnx", max_batch_size=4, options=options)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                feed = batch(2)
                np.testing.assert_allclose(backend.infer(feed)["logits"], expected(feed["input"]), atol=1e-5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    backend.close()
    assert backend.instances == 2
    assert errors == []


def test_fp16_io_is_read_from_the_session(tmp_path: Path) -> None:
    write_model(tmp_path / "model.fp16.onnx", fp16_io=True)
    art = Artefact.from_file(
        tmp_path, "model.fp16.onnx", format="onnx", precision="fp16",
        io_datatypes={"input": "FP16", "logits": "FP16"},
    )  # fmt: skip
    backend = load_backend(make_manifest(tmp_path, art), art, version_dir=tmp_path)
    try:
        assert backend.inputs[0].datatype == "FP16" and backend.outputs[0].datatype == "FP16"
        feed = batch(2, np.float16)
        out = backend.infer(feed)["logits"]
        assert out.dtype == np.float16
        np.testing.assert_allclose(out, expected(feed["input"]), rtol=1e-2, atol=2e-2)
        with pytest.raises(InvalidInputError, match="expected datatype FP16, got FP32"):
            backend.infer(batch(1))
    finally:
        backend.close()


def test_manifest_mismatch_refuses_to_load(tmp_path: Path) -> None:
    write_model(tmp_path / "model.fp16.onnx", fp16_io=True)
    art = Artefact.from_file(tmp_path, "model.fp16.onnx", format="onnx", precision="fp16")  # no io override
    with pytest.raises(ModelLoadError, match="input 'input' datatype FP16 != FP32"):
        load_backend(make_manifest(tmp_path, art), art, version_dir=tmp_path)
    write_model(tmp_path / "model.onnx")
    art = onnx_artefact(tmp_path)
    with pytest.raises(ModelLoadError, match=r"input names \['input'\] != \['pixels'\]"):
        load_backend(make_manifest(tmp_path, art, input_name="pixels"), art, version_dir=tmp_path)


def test_corrupt_or_missing_file_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"this is not an onnx protobuf")
    art = onnx_artefact(tmp_path)
    manifest = make_manifest(tmp_path, art)
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        load_backend(manifest, art, version_dir=tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="artefact file not found"):
        load_backend(manifest, art, version_dir=tmp_path)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="this onnxruntime has CUDA"
)
def test_cuda_device_without_cuda_provider_is_a_clear_load_error(version_dir: Path) -> None:
    art = onnx_artefact(version_dir)
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider is not available"):
        load_backend(make_manifest(version_dir, art), art, version_dir=version_dir, device="cuda:0")


def test_tensorrt_plan_without_tensorrt_is_a_clear_load_error(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; the GPU test covers plans")
    except ImportError:
        pass
    (tmp_path / "model.plan").write_bytes(b"not really an engine")
    write_model(tmp_path / "model.onnx")
    info = TensorRTInfo(version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    plan = Artefact.from_file(tmp_path, "model.plan", format="tensorrt_plan", precision="fp16", tensorrt=info)
    manifest = make_manifest(tmp_path, onnx_artefact(tmp_path))
    manifest = Manifest(**{**manifest.__dict__, "artefacts": (*manifest.artefacts, plan)})
    with pytest.raises(ModelLoadError, match="tensorrt Python package is not installed"):
        load_backend(manifest, plan, version_dir=tmp_path, device="cuda:0")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options",
    [
        BackendOptions(device="cuda:0"),
        BackendOptions(device="cuda:0", pinned_memory=False),
        BackendOptions(device="cuda:0", iobinding=False),
        BackendOptions(device="cuda:0", cuda_graphs=True, instances=2),
        BackendOptions(device="cuda:0", cuda_tf32=False),
        BackendOptions(device="cuda:0", cuda_prefer_nhwc=True, cudnn_conv_algo_search="EXHAUSTIVE"),
        BackendOptions(device="cuda:0", pad_to_buckets=False),
    ],
    ids=["iobinding-pinned", "iobinding", "plain", "cuda-graphs", "no-tf32", "nhwc-exhaustive", "no-buckets"],
)
def test_cuda_provider_matches_numpy(version_dir: Path, options: BackendOptions) -> None:
    backend = OnnxRuntimeBackend(version_dir / "model.onnx", max_batch_size=4, options=options)
    # TF32 (on by default, as in PyTorch's cuDNN convs) keeps 10 mantissa bits: ~1e-3 relative
    # error per product was seen on an H200 (max 3.6e-3 here); without it FP32 must be tight.
    tol = 1e-2 if options.cuda_tf32 else 1e-4
    try:
        assert backend.provider == "cuda"
        for rows in (1, 3, 4, 2):  # 3 rows run padded to the bucket of 4 when bucketed
            feed = batch(rows)
            np.testing.assert_allclose(
                backend.infer(feed)["logits"], expected(feed["input"]), rtol=tol, atol=tol
            )
    finally:
        backend.close()


def test_batcher_over_the_real_backend_scatters_correct_rows(version_dir: Path) -> None:
    import asyncio

    from serving.runtime.batcher import DynamicBatcher

    options = BackendOptions(instances=2, intra_op_threads=1)
    backend = OnnxRuntimeBackend(version_dir / "model.onnx", max_batch_size=4, options=options)

    async def main() -> None:
        batcher = DynamicBatcher(backend, max_queue_delay_us=2_000, name="tiny")
        batcher.start()
        feeds = [batch(1 + i % 3) for i in range(24)]
        outs = await asyncio.gather(*(batcher.submit(f) for f in feeds))
        await batcher.stop()
        for feed, out in zip(feeds, outs, strict=True):
            np.testing.assert_allclose(out["logits"], expected(feed["input"]), rtol=1e-5, atol=1e-5)

    try:
        asyncio.run(main())
    finally:
        backend.close()


class HostBuffer:
    """Plain host memory with PinnedBuffer's interface, to drive the pointer-binding path on CPU."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.array = np.zeros(shape, dtype)
        self.dtype, self.ptr = self.array.dtype, self.array.ctypes.data

    def rows(self, n: int) -> np.ndarray:
        return self.array[:n]

    def free(self) -> None:
        pass


@pytest.mark.parametrize("buckets", [True, False], ids=["padded", "exact"])
@pytest.mark.parametrize("staged", [False, True], ids=["bind-numpy", "bind-pointers"])
def test_iobinding_runner_logic_on_the_cpu_provider(version_dir: Path, staged: bool, buckets: bool) -> None:
    """The CUDA path's IOBinding code, run against the CPU EP (which accepts the same bindings).

    Padded: 3 rows run as the bucket of 4 (the 4th row is stale or zeros) and come back as 3."""
    from serving.runtime.backends.ort_runners import BindingRunner

    session = onnxruntime.InferenceSession(
        str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    backend = OnnxRuntimeBackend(version_dir / "model.onnx", max_batch_size=4)
    options = BackendOptions(pinned_memory=False, pad_to_buckets=buckets)
    runner = BindingRunner(session, backend.inputs, backend.outputs, 4, options)
    assert runner.buckets == ([1, 2, 4] if buckets else [])
    if staged:
        runner.pin_in = {"input": HostBuffer((4, 1, 4, 4), np.dtype(np.float32))}
        runner.pin_out = {"logits": HostBuffer((4, 3), np.dtype(np.float32))}
    for rows in (3, 1, 4, 3):
        feed = batch(rows)
        out = runner.run(feed, rows)["logits"]
        assert out.shape == (rows, 3)
        np.testing.assert_allclose(out, expected(feed["input"]), rtol=1e-5, atol=1e-5)
    runner.close()
    backend.close()


def test_staged_bindings_are_made_once_per_bucket(version_dir: Path) -> None:
    """With every tensor staged, a batch reuses its bucket's binding: no io_binding() per call."""
    from serving.runtime.backends.ort_runners import BindingRunner

    session = onnxruntime.InferenceSession(
        str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    backend = OnnxRuntimeBackend(version_dir / "model.onnx", max_batch_size=4)
    runner = BindingRunner(session, backend.inputs, backend.outputs, 4, BackendOptions(pinned_memory=False))
    runner.pin_in = {"input": HostBuffer((4, 1, 4, 4), np.dtype(np.float32))}
    runner.pin_out = {"logits": HostBuffer((4, 3), np.dtype(np.float32))}
    made = []
    io_binding = session.io_binding
    runner.session = type("Counting", (), {})()  # the real session, with io_binding() counted
    runner.session.io_binding = lambda: made.append(1) or io_binding()
    runner.session.run_with_iobinding = session.run_with_iobinding
    for rows in (3, 1, 4, 3, 2, 1, 3):
        feed = batch(rows)
        np.testing.assert_allclose(runner.run(feed, rows)["logits"], expected(feed["input"]), atol=1e-5)
    assert sorted(runner._bound) == [1, 2, 4] and len(made) == 3
    runner.close()
    backend.close()


def write_wide_model(path: Path, width: int = 512, layers: int = 4) -> Path:
    """Relu(MatMul) x `layers` on [N, width]: large enough that ORT splits a batch over its threads."""
    nodes, inits, name = [], [], "input"
    for i in range(layers):
        weight = (RNG.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes += [
            helper.make_node("MatMul", [name, f"W{i}"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
        ]
        name = f"r{i}"
    nodes.append(helper.make_node("Identity", [name], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, str(path))
    return path


def test_spinning_threads_stop_when_a_batch_returns(tmp_path: Path) -> None:
    """With intra-op spinning on, ORT's pool would otherwise busy-wait for ~30 ms after every Run,
    taking the cores the event loop needs between batches; force_spinning_stop ends it at once."""
    path = write_wide_model(tmp_path / "wide.onnx")
    options = BackendOptions(intra_op_threads=2, allow_spinning=True)
    backend = OnnxRuntimeBackend(path, max_batch_size=256, options=options)
    try:
        idle = idle_cpu_after_runs(backend, {"input": RNG.standard_normal((256, 512)).astype(np.float32)})
    finally:
        backend.close()
    assert min(idle) < 0.005, f"the pool kept spinning after Run returned: {idle} CPU s while idle"


def idle_cpu_after_runs(
    backend: OnnxRuntimeBackend, feed: dict[str, np.ndarray], runs: int = 3
) -> list[float]:
    """CPU seconds this process burnt in the 0.2 s after each of `runs` inferences (idle otherwise)."""
    import time

    idle = []
    for _ in range(runs):
        backend.infer(feed)
        cpu = time.process_time()
        time.sleep(0.2)
        idle.append(time.process_time() - cpu)
    return idle
