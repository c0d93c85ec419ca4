"""Cores shared between workers (serving/runtime/backends/core_share.py): the file-backed table of
who computes, read through two handles as two workers would, and ONNX Runtime backends built in
a worker of the table (real sessions): a batch runs on every core while the other worker has
idled long enough, on the worker's own share otherwise, with the same numbers either way."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.runtime.backends import FULL_BATCHES, BackendOptions, core_share
from serving.runtime.backends.core_share import CoreTable, SharedCoresRunner
from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from tests.unit.test_backends_onnxruntime import write_wide_model

ROWS = np.random.default_rng(3).normal(size=(4, 512)).astype(np.float32)


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    path = tmp_path / "computing"
    CoreTable.create(path, 2)
    return path


@pytest.fixture
def peer(table_path: Path) -> Iterator[CoreTable]:
    """Worker 1 of the table, seen from this process (the code under test is worker 0)."""
    handle = CoreTable(table_path, 1, 2, cores=2)
    yield handle
    handle.close()


@pytest.fixture
def worker(table_path: Path) -> Iterator[CoreTable]:
    """This process as worker 0 of the table, as `kiln serve --workers 2` makes it at start."""
    table = core_share.join(str(table_path), 0, 2, 2)
    yield table
    core_share.leave()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_model(tmp_path_factory.mktemp("share") / "wide.onnx")


def _backend(path: Path) -> OnnxRuntimeBackend:
    """One worker's share of 2 cores: 1 thread, no extra sessions of its own."""
    options = BackendOptions(
        intra_op_threads=1, instances=1, lone_batch_spinning="off", single_thread_small_batches="off"
    )
    return OnnxRuntimeBackend(path, max_batch_size=8, options=options)


@pytest.fixture
def shared(model: Path, worker: CoreTable) -> Iterator[OnnxRuntimeBackend]:
    """A backend built in worker 0 of the table: its instance shares the cores."""
    backend = _backend(model)
    yield backend
    backend.close()


def _runner(backend: OnnxRuntimeBackend) -> SharedCoresRunner:
    (runner,) = backend.shared_runners
    return runner


def test_a_new_table_reads_every_worker_idle_since_it_was_made(table_path: Path, peer: CoreTable) -> None:
    mine = CoreTable(table_path, 0, 2, cores=2)
    try:
        assert mine.others_idle_for(0.0)
        assert not mine.others_idle_for(60.0)  # made just now
    finally:
        mine.close()


def test_a_computing_peer_is_not_idle_until_its_last_batch_ends(table_path: Path, peer: CoreTable) -> None:
    mine = CoreTable(table_path, 0, 2, cores=2)
    try:
        peer.begin()
        peer.begin()  # two instances of the peer at once
        assert not mine.others_idle_for(0.0)
        peer.end()
        assert not mine.others_idle_for(0.0)  # one still runs
        peer.end()
        assert mine.others_idle_for(0.0)
        assert not mine.others_idle_for(1.0)  # it stopped just now
        mine.begin()  # my own slot never counts against me
        assert mine.others_idle_for(0.0)
        mine.end()
    finally:
        mine.close()


def test_a_slot_outside_the_table_is_refused(table_path: Path) -> None:
    with pytest.raises(ValueError, match="slot 2 outside the table of 2 workers"):
        CoreTable(table_path, 2, 2, cores=2)


def test_without_a_table_the_backend_is_as_before(model: Path) -> None:
    assert core_share.current() is None
    backend = _backend(model)
    try:
        assert backend.shared_runners == ()
    finally:
        backend.close()


def test_a_batch_takes_every_core_while_the_peer_idles_and_its_share_while_it_computes(
    shared: OnnxRuntimeBackend, worker: CoreTable, peer: CoreTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner(shared)
    seen: list[bool] = []
    worker.on_batch = seen.append
    assert runner.wide is not None
    assert runner.wide.session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
    assert runner.own.session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
    monkeypatch.setattr(core_share, "MIN_IDLE_S", 0.0)  # the peer has idled long enough
    alone = shared.infer({"input": ROWS})["logits"]
    peer.begin()
    busy = shared.infer({"input": ROWS})["logits"]
    peer.end()
    monkeypatch.setattr(core_share, "MIN_IDLE_S", 60.0)  # it only paused: not idle long enough
    right_after = shared.infer({"input": ROWS})["logits"]
    assert runner.counts == {"own": 2, "all": 1}
    assert seen == [True, False, False]
    np.testing.assert_allclose(alone, busy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(right_after, busy, rtol=1e-5, atol=1e-6)


def test_the_worker_reads_busy_to_its_peers_while_a_batch_runs(
    shared: OnnxRuntimeBackend, peer: CoreTable
) -> None:
    runner = _runner(shared)
    observed: list[bool] = []
    inner = runner.own

    class Watching:  # the peer's view, taken from inside the batch
        def run(self, inputs: dict, rows: int) -> dict:
            observed.append(peer.others_idle_for(0.0))
            return inner.run(inputs, rows)

        def close(self) -> None:
            inner.close()

    runner.own = Watching()  # type: ignore[assignment]
    peer.begin()  # so that the batch runs on the worker's own share (the watched runner)
    shared.infer({"input": ROWS})
    peer.end()
    assert observed == [False]
    assert peer.others_idle_for(0.0)  # and idle again once it returned


def test_with_one_core_per_worker_there_is_nothing_wider(model: Path, table_path: Path) -> None:
    core_share.join(str(table_path), 0, 2, 1)  # one core: the worker's share is all there is
    try:
        backend = _backend(model)
        try:
            runner = _runner(backend)
            assert runner.wide is None
            backend.infer({"input": ROWS})
            assert runner.counts == {"own": 1, "all": 0}
        finally:
            backend.close()
    finally:
        core_share.leave()


def test_one_worker_at_a_time_measures_every_core(table_path: Path, peer: CoreTable) -> None:
    mine = CoreTable(table_path, 0, 2, cores=2)
    entered = threading.Event()

    def peer_measures() -> None:
        with peer.exclusive():
            entered.set()

    try:
        with mine.exclusive():
            other = threading.Thread(target=peer_measures)
            other.start()
            assert not entered.wait(0.2)  # held out while this worker measures
        assert entered.wait(5)
        other.join(5)
    finally:
        mine.close()


def test_a_replacement_worker_frees_the_slot_its_dead_predecessor_left_computing(
    table_path: Path, peer: CoreTable
) -> None:
    dying = CoreTable(table_path, 0, 2, cores=2)
    dying.begin()  # killed mid-batch: its slot reads "computing" from now on
    dying.close()
    assert not peer.others_idle_for(0.0)
    core_share.join(str(table_path), 0, 2, 2)  # the supervisor's replacement takes slot 0
    try:
        assert peer.others_idle_for(0.0)
    finally:
        core_share.leave()


def test_a_measurement_keeps_the_layout_it_asked_for(model: Path, worker: CoreTable) -> None:
    """precision auto's trials (and offline scoring) run with FULL_BATCHES: no wide session."""
    options = BackendOptions(intra_op_threads=1, instances=1, **FULL_BATCHES)  # type: ignore[arg-type]
    backend = OnnxRuntimeBackend(model, max_batch_size=8, options=options)
    try:
        assert backend.shared_runners == ()
    finally:
        backend.close()


def test_instances_split_every_core_between_their_wide_sessions(model: Path, worker: CoreTable) -> None:
    """Two cores, two instances of one thread each: every core is theirs already, nothing wider."""
    options = BackendOptions(
        intra_op_threads=1, instances=2, lone_batch_spinning="off", single_thread_small_batches="off"
    )
    backend = OnnxRuntimeBackend(model, max_batch_size=8, options=options)
    try:
        assert len(backend.shared_runners) == 2
        assert all(runner.wide is None for runner in backend.shared_runners)
    finally:
        backend.close()


def test_a_worker_loads_while_no_other_measures(table_path: Path, peer: CoreTable, model: Path) -> None:
    """Loading (sessions, their timing runs) and warm-up hold the table's lock: a peer waits."""
    entered = threading.Event()

    def peer_measures() -> None:
        with peer.exclusive():
            entered.set()

    # no table joined: nothing to hold, so the peer's lock is free inside
    with core_share.one_worker_at_a_time(), peer.exclusive():
        pass
    core_share.join(str(table_path), 0, 2, 2)
    try:
        with core_share.one_worker_at_a_time():
            other = threading.Thread(target=peer_measures)
            other.start()
            assert not entered.wait(0.2)
            _backend(model).close()  # a backend built meanwhile (as ModelHandle.open builds it): no deadlock
        assert entered.wait(5)
        other.join(5)
    finally:
        core_share.leave()


def test_a_model_opens_whole_while_no_other_worker_loads(
    tmp_path: Path, peer: CoreTable, worker: CoreTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole ModelHandle.open, precision auto's timing of its candidates included, holds the
    table's lock: it waits while a peer loads, never times while a peer does, and the next worker
    to open finds the choice in the tuning cache (the same artefact on every worker)."""
    from serving.contract.repository import ModelRepository
    from serving.grpc.config import ServeConfig
    from serving.grpc.model_version import artefact_choice, backend_options
    from serving.runtime import model_handle
    from serving.runtime.model_handle import resolve
    from tests.integration.tuning_fixtures import publish_convnet

    publish_convnet(tmp_path / "repo")  # FP32 and INT8 passed the gate: "auto" measures both
    cfg = ServeConfig(repo=tmp_path / "repo")
    resolved = resolve(ModelRepository(cfg.repo), "convnet", None, policy=cfg.policy)
    held_while_timing: list[bool] = []
    real_tune = model_handle.tune

    def tune(*args: object, **kwargs: object) -> object:  # the real measurement, observed
        held_while_timing.append(getattr(core_share._HOLDING, "yes", False))
        return real_tune(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_handle, "tune", tune)

    def open_one() -> model_handle.ModelHandle:  # as the server's ModelManager opens a version
        return model_handle.ModelHandle.open(resolved, artefact_choice(cfg), options=backend_options(cfg))

    opened: list[model_handle.ModelHandle] = []
    with peer.exclusive():  # the peer is loading
        opening = threading.Thread(target=lambda: opened.append(open_one()))
        opening.start()
        opening.join(0.5)
        assert opening.is_alive() and not opened and not held_while_timing  # waits, times nothing
    opening.join(60)
    again = open_one()  # the next worker to load
    assert held_while_timing == [True, True]
    assert opened[0].tuning is not None and not opened[0].tuning.cached
    assert again.tuning is not None and again.tuning.cached
    assert again.artefact == opened[0].artefact
    opened[0].close()
    again.close()
