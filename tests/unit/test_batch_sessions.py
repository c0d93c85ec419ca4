"""Extra ONNX Runtime sessions for small batches (serving/runtime/backends/batch_sessions.py), with
real sessions: `lone_batch_spinning` (1-row batches on a spinning twin) and
`single_thread_small_batches` (small batches on a one-thread session).

What is checked: which session a batch of each size runs on, that every session gives the same
numbers, that the twin stops spinning when its Run returns (else it would burn the event loop's
cores between requests), and how "auto" decides from its measurements; never how fast anything is
(benchmarks/RESULTS-serving.md has that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.runtime.backends import BackendOptions, batch_sessions
from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from serving.runtime.backends.ort_runners import SessionRunner
from tests.unit.test_backends_onnxruntime import idle_cpu_after_runs, write_wide_model

RNG = np.random.default_rng(7)
SPIN = "session.intra_op.allow_spinning"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_model(tmp_path_factory.mktemp("sized") / "wide.onnx")


def _backend(path: Path, lone: str = "off", single: str = "off", **options: object) -> OnnxRuntimeBackend:
    merged = {"intra_op_threads": 2, "instances": 1} | options
    chosen = BackendOptions(lone_batch_spinning=lone, single_thread_small_batches=single, **merged)  # type: ignore[arg-type]
    return OnnxRuntimeBackend(path, max_batch_size=64, options=chosen)


def _spinning(runner: object) -> str:
    return runner.session.get_session_options().get_session_config_entry(SPIN)  # type: ignore[attr-defined]


def _threads(runner: object) -> int:
    return runner.session.get_session_options().intra_op_num_threads  # type: ignore[attr-defined]


def _counts(backend: OnnxRuntimeBackend) -> dict[str, int]:
    total = {"lone": 0, "single": 0, "batched": 0}
    for runner in backend.sized_runners:
        for key, value in runner.counts.items():
            total[key] += value
    return total


def _plain(path: Path, threads: int) -> SessionRunner:
    """A session of the model on `threads` threads, outside any backend."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return SessionRunner(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "auto" decides as if every measurement favoured the extra sessions: kept, up to 64 rows."""
    monkeypatch.setattr(batch_sessions, "MIN_GAIN", 1e9)
    monkeypatch.setattr(batch_sessions, "EFFICIENCY", 1e9)


def test_each_batch_size_runs_on_its_session_with_the_same_numbers(wide: Path, pinned: None) -> None:
    backend = _backend(wide, "on", "auto", instances=2)
    try:
        assert len(backend.sized_runners) == 2
        runner = backend.sized_runners[0]
        assert (_spinning(runner.lone), _spinning(runner.batched), _spinning(runner.single)) == (
            "1",
            "0",
            "0",
        )
        assert (_threads(runner.lone), _threads(runner.batched), _threads(runner.single)) == (2, 2, 1)
        assert runner.single_rows == 64  # EFFICIENCY never reached: every size tried ran on one thread
        batch = RNG.standard_normal((8, 512)).astype(np.float32)
        together = backend.infer({"input": batch})["logits"]
        alone = np.concatenate([backend.infer({"input": batch[i : i + 1]})["logits"] for i in range(8)])
        np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-5)
        assert _counts(backend) == {"lone": 8, "single": 1, "batched": 0}
    finally:
        backend.close()


def test_batches_past_the_single_thread_size_run_on_all_threads(wide: Path) -> None:
    runner = batch_sessions.SizedRunner(_plain(wide, 2), single=_plain(wide, 1), single_rows=4)
    try:
        for rows in (1, 4, 5, 64):
            runner.run({"input": np.ones((rows, 512), np.float32)}, rows)
        assert runner.counts == {"lone": 0, "single": 2, "batched": 2}  # no twin: 1 row is small too
    finally:
        runner.close()


def test_small_batches_take_every_thread_while_the_loop_has_nothing_else_to_do(wide: Path) -> None:
    from serving.runtime.backends.base import LOOP_HAS_WORK

    runner = batch_sessions.SizedRunner(_plain(wide, 2), single=_plain(wide, 1), single_rows=4)
    feed = {"input": np.ones((2, 512), np.float32)}
    try:
        runner.run(feed, 2)  # unknown (the default): the event loop may have work
        token = LOOP_HAS_WORK.set(False)  # what the batcher sets when this batch is all in flight
        try:
            runner.run(feed, 2)
        finally:
            LOOP_HAS_WORK.reset(token)
        assert runner.counts == {"lone": 0, "single": 1, "batched": 1}
    finally:
        runner.close()


def test_the_twin_stops_spinning_when_a_lone_row_returns(wide: Path) -> None:
    """The twin spins only inside a Run: ~30 ms of CPU after each one otherwise (force_spinning_stop)."""
    backend = _backend(wide, "on")
    try:
        idle = idle_cpu_after_runs(backend, {"input": RNG.standard_normal((1, 512)).astype(np.float32)})
        assert _counts(backend)["lone"] == 3
    finally:
        backend.close()
    assert min(idle) < 0.005, f"the lone session kept spinning after Run returned: {idle} CPU s idle"


@pytest.mark.parametrize(
    ("lone", "single", "options"),
    [
        ("off", "off", {}),
        ("on", "auto", {"intra_op_threads": 1}),  # one thread: no pool to wake, nothing narrower
        ("on", "off", {"allow_spinning": True}),  # every batch spins already
    ],
)
def test_no_extra_session_where_it_cannot_help(
    wide: Path, pinned: None, lone: str, single: str, options: dict[str, object]
) -> None:
    backend = _backend(wide, lone, single, **options)
    try:
        assert backend.sized_runners == ()
        assert backend.infer({"input": np.ones((1, 512), np.float32)})["logits"].shape == (1, 512)
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("max_plain_ms", "min_gain", "efficiency", "twin", "single_rows"),
    [
        (batch_sessions.MAX_PLAIN_MS, 1e9, 0.0, True, 0),  # any spinning time passes; 2 rows efficient
        (batch_sessions.MAX_PLAIN_MS, 0.0, 1e9, False, 64),  # no spinning time passes; no size efficient
        (0.0, 1e9, 1e9, False, 0),  # the lone row is "too slow to gain": nothing tried
    ],
)
def test_auto_keeps_what_measured_worth_it(
    wide: Path,
    monkeypatch: pytest.MonkeyPatch,
    max_plain_ms: float,
    min_gain: float,
    efficiency: float,
    twin: bool,
    single_rows: int,
) -> None:
    monkeypatch.setattr(batch_sessions, "MAX_PLAIN_MS", max_plain_ms)
    monkeypatch.setattr(batch_sessions, "MIN_GAIN", min_gain)
    monkeypatch.setattr(batch_sessions, "EFFICIENCY", efficiency)
    backend = _backend(wide, "auto", "auto", instances=2)
    try:
        kept = [(r.lone is not None, r.single_rows) for r in backend.sized_runners]
        assert kept == ([(twin, single_rows)] * 2 if twin or single_rows else [])
    finally:
        backend.close()


def test_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="lone_batch_spinning"):
        BackendOptions(lone_batch_spinning="sometimes")
    with pytest.raises(ValueError, match="single_thread_small_batches"):
        BackendOptions(single_thread_small_batches="on")


@pytest.mark.parametrize("lone", ["auto", "on"])
def test_auto_loads_without_extra_sessions_when_a_row_of_zeros_cannot_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, lone: str
) -> None:
    """A 3x3 convolution over dynamic H x W: the timing row (dims 1) is smaller than the kernel, so
    ONNX Runtime fails it; the model still loads and serves real inputs, with no session chosen by
    measurement ("on" needs none: its twin is made)."""
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
        backend = _backend(tmp_path / "conv.onnx", lone, "auto")
    try:
        kept = [(r.lone is not None, r.single) for r in backend.sized_runners]
        assert kept == ([(True, None)] if lone == "on" else [])
        assert "no timing runs" in caplog.text
        out = backend.infer({"input": np.ones((1, 1, 5, 5), np.float32)})["logits"]
        assert out.shape == (1, 2, 3, 3)
    finally:
        backend.close()
