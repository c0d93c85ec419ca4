"""A server gives the process back its interpreter settings: the GIL switch interval it sets at
start is restored when the last running server stops (in any order), and the heap `serve()`
freezes is thawed when it returns. Tests, notebooks and in-process servers rely on it."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.grpc.config import ServeConfig
from serving.grpc.server import Server
from tests.integration.server_fixtures import ServerThread, publish_tiny_model

PROCESS_INTERVAL = 0.0123  # a value no server config uses, so a missed restore shows


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_tiny_model(root)
    return root


@pytest.fixture
def process_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(PROCESS_INTERVAL)
    yield
    sys.setswitchinterval(before)


def _config(repo: Path, switch_us: int = 200) -> ServeConfig:
    return ServeConfig(
        repo=repo, host="127.0.0.1", port=0, metrics_port=None, warmup=False, gil_switch_interval_us=switch_us
    )


@pytest.mark.usefixtures("process_interval")
def test_switch_interval_is_restored_after_the_last_server_stops(repo: Path) -> None:
    first = ServerThread(_config(repo, 200)).start()
    try:
        assert sys.getswitchinterval() == pytest.approx(200e-6)
        second = ServerThread(_config(repo, 300)).start()
        assert sys.getswitchinterval() == pytest.approx(300e-6)
    finally:
        first.stop()
    assert sys.getswitchinterval() == pytest.approx(300e-6)  # the second still runs
    second.stop()
    assert sys.getswitchinterval() == pytest.approx(PROCESS_INTERVAL)


async def _serve_and_stop(server: Server) -> int:
    """Run serve() until its heap is frozen, shut it down; the freeze count seen while serving."""
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 60
    while not gc.get_freeze_count():
        assert not serving.done() and time.monotonic() < deadline, "serve() never froze its heap"
        await asyncio.sleep(0.01)
    frozen = gc.get_freeze_count()
    await server.shutdown(1.0)
    await serving
    return frozen


@pytest.mark.usefixtures("process_interval")
def test_serve_thaws_the_heap_it_froze(repo: Path) -> None:
    assert gc.get_freeze_count() == 0, "something else froze objects in this process"
    frozen = asyncio.run(_serve_and_stop(Server(_config(repo))))  # main thread: serve() sets signal handlers
    assert frozen > 0
    assert gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == pytest.approx(PROCESS_INTERVAL)
