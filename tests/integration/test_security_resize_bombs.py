"""A few-KB image must not cost gigabytes (issue 20, item 1): Classify resizes the shorter side
keeping the aspect ratio, so a 1x2,000,000 strip would become 8x16,000,000 (the tiny model) and a
1x3,000,000 one ran out of memory. Each strip is refused before any large allocation, with a
status and a message naming the limit, while several arrive at once; the server's resident
memory barely moves, the answers come at once, and nothing reaches the log at ERROR.

Also here (item 6): a BYTES tensor sent to an FP32 input is named "BYTES" in the refusal.

The server is `kiln serve` in a subprocess with its default limits, so its RSS is its own.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from serving.clients.client import KilnClient
from tests.fuzz.load import KilnProcess, rss_bytes
from tests.integration.server_fixtures import publish_tiny_model

C = grpc.StatusCode
RSS_GROWTH_LIMIT = 200 * 1024 * 1024
ANSWER_SECONDS = 5.0  # a refusal before decoding takes milliseconds; generous for a busy machine


def strip_png(width: int, height: int) -> bytes:
    """A valid grey PNG of width x height: a few KB for millions of pixels."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def kiln(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnProcess]:
    repo = tmp_path_factory.mktemp("resize-bombs")
    publish_tiny_model(repo)  # resize 8, crop 8
    proc = KilnProcess(repo)
    try:
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(kiln: KilnProcess) -> Iterator[KilnClient]:
    with KilnClient(f"127.0.0.1:{kiln.port}", timeout=60) as kiln_client:
        yield kiln_client


class PeakRss:
    """Samples a process's VmRSS every few milliseconds; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def _outcome(client: KilnClient, image: bytes | np.ndarray) -> tuple[C, str, float]:
    start = time.monotonic()
    try:
        client.classify("tiny", [image])
        code, details = C.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    return code, details, time.monotonic() - start


def _errors(log: list[str]) -> list[str]:
    """Log lines at ERROR (or worse) and any traceback."""
    bad = []
    for line in log:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += [line] if "Traceback" in line else []
            continue
        if record.get("level") in ("error", "critical") or "exc" in record:
            bad.append(line)
    return bad


def test_strip_images_are_refused_before_any_large_allocation(kiln: KilnProcess, client: KilnClient) -> None:
    normal = np.random.default_rng(0).integers(0, 256, (8, 40, 3), dtype=np.uint8)  # 5:1 still fine
    assert _outcome(client, normal)[0] == C.OK  # warm: pools, channel, first-call allocations
    assert _outcome(client, strip_png(12, 8))[0] == C.OK
    strips = {
        "1x2000000 PNG": strip_png(1, 2_000_000),
        "1x3000000 PNG": strip_png(1, 3_000_000),
        "2000000x1 PNG": strip_png(2_000_000, 1),
        "raw 200000x1x1": np.zeros((200_000, 1, 1), np.uint8),
    }
    assert all(len(s) < 16_384 for s in strips.values() if isinstance(s, bytes))  # a few KB each
    baseline = rss_bytes(kiln.proc.pid)
    names = list(strips) * 3  # several of each at once
    with PeakRss(kiln.proc.pid) as rss, ThreadPoolExecutor(len(names)) as pool:
        outcomes = list(pool.map(lambda name: _outcome(client, strips[name]), names))
    growth = rss.peak - baseline
    print(f"RSS {baseline / 2**20:.0f} MiB -> peak {rss.peak / 2**20:.0f} MiB; "
          f"slowest answer {max(o[2] for o in outcomes):.2f} s")  # fmt: skip
    for name, (code, details, _) in zip(names, outcomes, strict=True):
        assert code == C.INVALID_ARGUMENT, (name, code, details)
        assert ": aspect ratio " in details and "the limit is max_image_aspect_ratio 20 " in details, details
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew by {growth / 2**20:.0f} MiB"
    assert max(seconds for _, _, seconds in outcomes) < ANSWER_SECONDS, outcomes
    assert _outcome(client, normal)[0] == C.OK  # still serving
    time.sleep(0.2)  # let the last log lines through the pipe
    assert not _errors(kiln.log), _errors(kiln.log)[:3]


def test_raised_aspect_limit_still_bounds_the_resized_size(tmp_path: Path) -> None:
    """With the aspect check opened up (a flag), max_image_pixels bounds the resized image; and
    max_preprocessed_bytes bounds the rows that a request's (small) images become."""
    publish_tiny_model(tmp_path)
    flags = ("--max-image-aspect-ratio", "1000000", "--max-preprocessed-bytes", "4096")
    proc = KilnProcess(tmp_path, *flags)
    try:
        with KilnClient(f"127.0.0.1:{proc.port}", timeout=60) as client:
            baseline = rss_bytes(proc.proc.pid)
            strips = [strip_png(1, 900_000), strip_png(900_000, 1), strip_png(1, 1_000_000)] * 2
            with PeakRss(proc.proc.pid) as rss, ThreadPoolExecutor(len(strips)) as pool:
                outcomes = list(pool.map(lambda image: _outcome(client, image), strips))
            assert _outcome(client, strip_png(2, 100))[0] == C.OK  # 50:1: over the default, within this limit
            one = np.zeros((1, 1, 3), np.uint8)  # a row is 3x8x8 float32 = 768 bytes
            assert len(client.classify("tiny", [one] * 5).results) == 5  # 3840 bytes
            with pytest.raises(grpc.RpcError) as info:
                client.classify("tiny", [one] * 6)
    finally:
        assert proc.stop() == 0
    assert info.value.code() == C.RESOURCE_EXHAUSTED
    assert "6 images make 4608 bytes of model input (768 each), the limit is max_preprocessed_bytes 4096" in (
        info.value.details() or ""
    )
    for code, details, seconds in outcomes:
        assert code == C.RESOURCE_EXHAUSTED, (code, details)
        assert "resized to " in details and "the limit is max_image_pixels 40000000" in details
        assert seconds < ANSWER_SECONDS
    assert rss.peak - baseline < RSS_GROWTH_LIMIT, (
        f"server RSS grew by {(rss.peak - baseline) / 2**20:.0f} MiB"
    )
    assert not _errors(proc.log), _errors(proc.log)[:3]


def test_bytes_tensor_to_fp32_input_names_bytes(kiln: KilnProcess) -> None:
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{kiln.port}")
    try:
        tensor = grpcclient.InferInput("input", [1, 3, 8, 8], "BYTES")
        tensor.set_data_from_numpy(np.full((1, 3, 8, 8), b"x", dtype=object))
        with pytest.raises(InferenceServerException) as info:
            triton.infer("tiny", [tensor])
    finally:
        triton.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected datatype FP32, got BYTES" in info.value.message(), info.value.message()
    assert "numpy" not in info.value.message()
