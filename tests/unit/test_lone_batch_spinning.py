"""`lone_batch_spinning`: 1-row batches on a second, spinning ONNX Runtime session (real sessions).

What is checked: which session a batch runs on, that both give the same numbers, that the twin
stops spinning when its Run returns (else it would burn the event loop's cores between requests),
and how "auto" decides; never how fast anything is (benchmarks/RESULTS-serving.md has that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.runtime.backends import BackendOptions, lone_batch
from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from tests.unit.test_backends_onnxruntime import idle_cpu_after_runs, write_wide_model

RNG = np.random.default_rng(7)
SPIN = "session.intra_op.allow_spinning"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_model(tmp_path_factory.mktemp("lone") / "wide.onnx")


def _backend(path: Path, mode: str, **options: object) -> OnnxRuntimeBackend:
    merged = {"intra_op_threads": 2, "instances": 1} | options
    return OnnxRuntimeBackend(
        path,
        max_batch_size=64,
        options=BackendOptions(lone_batch_spinning=mode, **merged),  # type: ignore[arg-type]
    )


def _spinning(runner: object) -> str:
    return runner.session.get_session_options().get_session_config_entry(SPIN)  # type: ignore[attr-defined]


def test_on_runs_one_row_batches_on_a_spinning_twin_with_the_same_numbers(wide: Path) -> None:
    backend = _backend(wide, "on", instances=2, intra_op_threads=2)
    try:
        assert len(backend.lone_runners) == 2
        runner = backend.lone_runners[0]
        assert (_spinning(runner.lone), _spinning(runner.batched)) == ("1", "0")
        batch = RNG.standard_normal((8, 512)).astype(np.float32)
        together = backend.infer({"input": batch})["logits"]
        alone = np.concatenate([backend.infer({"input": batch[i : i + 1]})["logits"] for i in range(8)])
        np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-5)
        assert sum(r.lone_batches for r in backend.lone_runners) == 8  # the 8-row batch was not one
    finally:
        backend.close()


def test_the_twin_stops_spinning_when_a_lone_row_returns(wide: Path) -> None:
    """The twin spins only inside a Run: ~30 ms of CPU after each one otherwise (force_spinning_stop)."""
    backend = _backend(wide, "on")
    try:
        idle = idle_cpu_after_runs(backend, {"input": RNG.standard_normal((1, 512)).astype(np.float32)})
        assert backend.lone_runners[0].lone_batches == 3
    finally:
        backend.close()
    assert min(idle) < 0.005, f"the lone session kept spinning after Run returned: {idle} CPU s idle"


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("off", {}),
        ("on", {"intra_op_threads": 1}),  # no pool threads to wake
        ("on", {"allow_spinning": True}),  # every batch spins already
    ],
)
def test_no_twin_where_it_cannot_help(wide: Path, mode: str, options: dict[str, object]) -> None:
    backend = _backend(wide, mode, **options)
    try:
        assert backend.lone_runners == ()
        assert backend.infer({"input": np.ones((1, 512), np.float32)})["logits"].shape == (1, 512)
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("max_plain_ms", "min_gain", "kept"),
    [
        (lone_batch.MAX_PLAIN_MS, 1e9, True),  # any spinning time passes
        (lone_batch.MAX_PLAIN_MS, 0.0, False),  # no spinning time passes
        (0.0, 1e9, False),  # the plain row is "too slow to gain": not even tried
    ],
)
def test_auto_keeps_the_twin_only_where_it_measured_faster(
    wide: Path, monkeypatch: pytest.MonkeyPatch, max_plain_ms: float, min_gain: float, kept: bool
) -> None:
    monkeypatch.setattr(lone_batch, "MAX_PLAIN_MS", max_plain_ms)
    monkeypatch.setattr(lone_batch, "MIN_GAIN", min_gain)
    backend = _backend(wide, "auto", instances=2)
    try:
        assert len(backend.lone_runners) == (2 if kept else 0)
        if kept:
            assert all(_spinning(r.lone) == "1" for r in backend.lone_runners)
    finally:
        backend.close()


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="lone_batch_spinning"):
        BackendOptions(lone_batch_spinning="sometimes")


def test_auto_loads_without_a_twin_when_a_row_of_zeros_cannot_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 3x3 convolution over dynamic H x W: the timing row (dims 1) is smaller than the kernel, so
    ONNX Runtime fails it; the model still loads and serves real inputs on its one session."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    weight = numpy_helper.from_array(RNG.standard_normal((2, 1, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W"], ["logits"])],
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "H2", "W2"])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, str(tmp_path / "conv.onnx"))
    with caplog.at_level("WARNING"):
        backend = _backend(tmp_path / "conv.onnx", "auto")
    try:
        assert backend.lone_runners == ()
        assert "no lone-row timing" in caplog.text
        out = backend.infer({"input": np.ones((1, 1, 5, 5), np.float32)})["logits"]
        assert out.shape == (1, 2, 3, 3)
    finally:
        backend.close()
