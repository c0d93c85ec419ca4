"""Helpers for the server integration tests: a tiny real ONNX classifier published into a real
model repository, and an in-process server started on 127.0.0.1:0.

The model: input "input" FP32 [N, 3, 8, 8] -> GlobalAveragePool -> Flatten -> Gemm -> "logits"
[N, 4]. Weights depend on `seed`, so two versions of the same model give different answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Preprocessing, Provenance
from serving.contract.manifest_types import ParityReport
from serving.contract.repository import publish_version

LABELS = ("circle", "square", "star", "wave")
CHANNELS, SIZE = 3, 8
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W [3, 4], b [4]) of the model with this seed."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(CHANNELS, len(LABELS))).astype(np.float32), rng.normal(size=len(LABELS)).astype(
        np.float32
    )


def build_onnx(path: Path, seed: int) -> None:
    """Write the tiny classifier to `path` (opset 17, dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def reference_logits(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    """The same file run in-process by ONNX Runtime (the numbers the server must return)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": batch})[0]


def publish_tiny_model(
    repo: Path,
    name: str = "tiny",
    *,
    seed: int = 0,
    max_batch_size: int = 8,
    version: int | None = None,
    build: Callable[[Path, int], None] = build_onnx,
    parity: ParityReport | None = None,
) -> Path:
    """Publish one version of the tiny classifier (or another graph `build` writes with the same
    inputs and outputs), its artefact carrying `parity` if given; returns the version folder."""

    def populate(tmp: Path, ver: int) -> Manifest:
        build(tmp / "model.onnx", seed)
        return Manifest(
            name=name,
            version=ver,
            architecture={"arch": "tiny-gap-linear", "seed": seed},
            labels=LABELS,
            input=InputSpec(
                name="input",
                datatype="FP32",
                layout="NCHW",
                shape=(-1, CHANNELS, SIZE, SIZE),
                preprocessing=Preprocessing(resize=SIZE, crop=SIZE, mean=MEAN, std=STD),
            ),
            outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, len(LABELS))),),
            artefacts=(
                Artefact.from_file(tmp, "model.onnx", format="onnx", precision="fp32", parity=parity),
            ),
            max_batch_size=max_batch_size,
            provenance=Provenance(
                run_id=f"test-{seed}",
                dataset_fingerprint="0" * 64,
                git_commit=None,
                created_at="2025-01-01T00:00:00Z",
                kiln_version="test",
            ),
        )

    return publish_version(repo, name, populate, version=version).path


def normalise(images_hwc: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the model input [N, 3, H, W] as the manifest says."""
    scaled = images_hwc.astype(np.float32) / 255.0
    return ((scaled - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(0, 3, 1, 2)


class ServerThread:
    """Runs serving.grpc.server.Server in a background thread with its own event loop."""

    def __init__(self, config: object) -> None:
        from serving.grpc.server import Server

        self.server = Server(config)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._run, name="kiln-test-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self._started.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        await self.server.start()
        self._started.set()
        await self.server.wait_stopped()

    def start(self, timeout: float = 60.0) -> ServerThread:
        """Start and wait until the server is serving (models loaded and warmed)."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("server did not start in time")
        if self.error is not None:
            raise self.error
        return self

    @property
    def address(self) -> str:
        """host:port of the gRPC listener."""
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop (as SIGTERM does), then join."""
        if self._loop is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self._loop).result(grace + 30)
        self._thread.join(timeout=30)

    def call(self, coro: object, timeout: float = 30.0) -> object:
        """Run a coroutine on the server's loop (white-box checks)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]


def local_config(repo: Path, **overrides: object) -> object:
    """A ServeConfig on 127.0.0.1, an ephemeral port, no metrics listener; `overrides` on top."""
    from serving.grpc.config import ServeConfig

    return ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, **overrides)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_server(config: object) -> Iterator[ServerThread]:
    """Context manager: a started server, stopped on exit."""
    thread = ServerThread(config).start()
    try:
        yield thread
    finally:
        thread.stop()


ROOT = Path(__file__).resolve().parents[2]


def start_serve_process(repo: Path, *flags: str) -> tuple[subprocess.Popen[str], int, list[dict]]:
    """`kiln serve` as a child process (JSON logs on stderr); returns it, its gRPC port and the
    log lines read so far (up to the line that names the port)."""
    cmd = [sys.executable, "-m", "serving.dispatch", "serve", "--repo", str(repo), "--host", "127.0.0.1",
           "--port", "0", "--no-metrics", "--log-format", "json", *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    assert proc.stderr is not None
    for line in proc.stderr:  # blocks until the server logs its port (or dies)
        lines.append(json.loads(line))
        if "grpc_port" in lines[-1]:
            return proc, int(lines[-1]["grpc_port"]), lines
    raise AssertionError(f"server exited with {proc.wait()} before listening: {lines}")
