"""ONNX Runtime's threads pinned (serving/runtime/backends/cpu_pinning.py, `pin_ort_threads`): the
core blocks, moving the calling thread for a Run, and real ORT backends whose pool threads the
kernel reports pinned (one core each, off the caller's), with the same numbers as unpinned."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.runtime.backends import BackendOptions, core_share
from serving.runtime.backends.core_share import CoreTable
from serving.runtime.backends.cpu_pinning import CoreBlock, core_blocks, process_cpus, running_on
from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from tests.unit.test_backends_onnxruntime import write_wide_model

CPUS = process_cpus()
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="pinning needs a process with 2+ CPUs")
ROWS = np.random.default_rng(5).normal(size=(4, 512)).astype(np.float32)
PLAIN = {"lone_batch_spinning": "off", "single_thread_small_batches": "off"}


def test_blocks_are_consecutive_cores_rotated_to_the_first() -> None:
    assert core_blocks(range(8), 4, 2) == [CoreBlock(0, (1, 2, 3)), CoreBlock(4, (5, 6, 7))]
    assert core_blocks(range(8), 4, 2, first=4) == [CoreBlock(4, (5, 6, 7)), CoreBlock(0, (1, 2, 3))]
    assert core_blocks([2, 5], 2, 1, first=1) == [CoreBlock(5, (2,))]  # ids as the process has them
    # worker 1 of 2 splitting 8 CPUs: its own 4
    assert core_blocks(range(8), 2, 2, first=4, workers=2) == [CoreBlock(4, (5,)), CoreBlock(6, (7,))]
    assert core_blocks(range(2), 2, 1).pop().ort_affinities == "2"  # ORT counts processors from 1
    assert CoreBlock(0, (1, 2, 3)).ort_affinities == "2;3;4"


def test_no_blocks_without_a_pool_or_unless_they_make_the_cpus_exactly() -> None:
    assert core_blocks(range(8), 1, 8) is None  # one thread: no pool thread to keep apart
    assert core_blocks(range(4), 4, 2) is None  # 8 threads on 4 cores: pinning would stack them
    # 2 threads of a process that may use 32 CPUs (a pod on a node's shared pool): every such
    # process would pin the same first cores
    assert core_blocks(range(32), 2, 1) is None
    assert core_blocks(range(8), 2, 2, workers=1) is None  # a worker's share, without the others
    assert core_blocks([], 2, 1) is None


@two_cpus
def test_running_on_moves_this_thread_only_and_gives_its_cpus_back() -> None:
    before = os.sched_getaffinity(0)
    asked, seen_by_other = threading.Event(), []

    def other() -> None:  # a thread that was already running, e.g. the event loop's peer
        asked.wait(10)
        seen_by_other.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=other)
    thread.start()
    with running_on(CPUS[-1]):
        assert os.sched_getaffinity(0) == {CPUS[-1]}
        asked.set()
        thread.join()
    assert os.sched_getaffinity(0) == before
    assert seen_by_other == [before]


def test_running_on_a_cpu_the_process_lacks_runs_unpinned() -> None:
    before = os.sched_getaffinity(0)
    with running_on(max(CPUS) + 4096):
        assert os.sched_getaffinity(0) == before
    assert os.sched_getaffinity(0) == before


def _new_threads_cpus(build) -> tuple[object, dict[int, set[int]]]:
    """What `build()` returns, and the CPU set of every thread it started (by thread id)."""
    before = set(os.listdir("/proc/self/task"))
    built = build()
    new = sorted(set(os.listdir("/proc/self/task")) - before)
    return built, {int(t): os.sched_getaffinity(int(t)) for t in new}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_model(tmp_path_factory.mktemp("pin") / "wide.onnx")


class _Watch:
    """A real session whose `run` records the CPUs its calling thread may use at that moment."""

    def __init__(self, session: object) -> None:
        self._session, self.seen = session, []

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)

    def run(self, *args: object, **kwargs: object) -> object:
        self.seen.append(os.sched_getaffinity(0))
        return self._session.run(*args, **kwargs)  # type: ignore[attr-defined]


@two_cpus
def test_pool_threads_pinned_one_core_each_and_the_caller_beside_them(model: Path) -> None:
    options = BackendOptions(intra_op_threads=len(CPUS), instances=1, **PLAIN)  # every CPU
    backend, threads = _new_threads_cpus(lambda: OnnxRuntimeBackend(model, max_batch_size=8, options=options))
    runner = backend._pool._free.get()[1]  # the one instance's runner, put back below
    backend._pool._free.put((0, runner))
    assert runner.caller_cpu == CPUS[0] and backend.core_blocks == (CoreBlock(CPUS[0], tuple(CPUS[1:])),)
    pool = sorted(min(cpus) for cpus in threads.values() if len(cpus) == 1)
    assert pool == CPUS[1:]  # a core of its own for each pool thread
    watch = runner.session = _Watch(runner.session)
    before = os.sched_getaffinity(0)
    out = backend.infer({"input": ROWS})["logits"]
    assert watch.seen == [{CPUS[0]}]  # the Run's caller was on its block's first core
    assert os.sched_getaffinity(0) == before
    plain = OnnxRuntimeBackend(model, max_batch_size=8, options=BackendOptions(pin_threads=False, **PLAIN))
    np.testing.assert_allclose(out, plain.infer({"input": ROWS})["logits"], rtol=1e-5, atol=1e-6)
    backend.close()
    plain.close()


@two_cpus
def test_unpinned_threads_and_one_thread_sessions_keep_every_cpu(model: Path) -> None:
    for options in (
        BackendOptions(intra_op_threads=len(CPUS), pin_threads=False, **PLAIN),
        BackendOptions(intra_op_threads=1, **PLAIN),
    ):
        backend, threads = _new_threads_cpus(
            lambda o=options: OnnxRuntimeBackend(model, max_batch_size=8, options=o)
        )
        assert all(len(cpus) == len(CPUS) for cpus in threads.values()), threads
        backend.close()


@two_cpus
def test_two_instances_get_blocks_of_their_own(model: Path) -> None:
    if len(CPUS) < 4 or len(CPUS) % 2:
        pytest.skip("two blocks of 2+ threads need an even count of 4+ CPUs")
    half = len(CPUS) // 2
    options = BackendOptions(intra_op_threads=half, instances=2, **PLAIN)
    backend = OnnxRuntimeBackend(model, max_batch_size=8, options=options)
    assert [b.caller for b in backend.core_blocks] == [CPUS[0], CPUS[half]]  # type: ignore[union-attr]
    backend.close()


@pytest.fixture
def second_worker(tmp_path: Path) -> Iterator[CoreTable]:
    """This process as worker 1 of 2 sharing the cores, as `kiln serve --workers 2` makes it."""
    CoreTable.create(tmp_path / "computing", 2)
    table = core_share.join(str(tmp_path / "computing"), 1, 2, len(CPUS))
    yield table
    core_share.leave()


@two_cpus
def test_a_second_worker_starts_its_blocks_on_its_own_share(model: Path, second_worker: CoreTable) -> None:
    share = len(CPUS) // 2
    options = BackendOptions(intra_op_threads=share, instances=1, **PLAIN)
    backend = OnnxRuntimeBackend(model, max_batch_size=8, options=options)
    (shared,) = backend.shared_runners
    assert shared.wide is not None and shared.wide.caller_cpu == CPUS[share]  # on every core, from its own
    own = shared.own.caller_cpu
    assert own == (CPUS[share] if share > 1 and len(CPUS) % 2 == 0 else None)  # shares that make the CPUs
    backend.close()
