"""KilnMetrics on a private CollectorRegistry, read back with get_sample_value."""

from __future__ import annotations

import asyncio
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.errors import DeadlineExceededError
from serving.grpc.gpu_stats import GpuCollector, gpu_collector
from serving.grpc.metrics import KilnMetrics
from serving.runtime.backends import TensorSpec
from serving.runtime.batcher import DynamicBatcher

MV = {"model": "digits", "version": "3"}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_requests_by_code_and_latency(registry: CollectorRegistry) -> None:
    metrics = KilnMetrics(registry, process=False, gpu=False)
    metrics.observe_request("digits", "3", "OK", 0.004)
    metrics.observe_request("digits", "3", "OK", 0.012)
    metrics.observe_request("digits", "3", "INVALID_ARGUMENT")
    assert registry.get_sample_value("kiln_requests_total", MV | {"code": "OK"}) == 2
    assert registry.get_sample_value("kiln_requests_total", MV | {"code": "INVALID_ARGUMENT"}) == 1
    assert registry.get_sample_value("kiln_request_duration_seconds_count", MV) == 2
    assert registry.get_sample_value("kiln_request_duration_seconds_bucket", MV | {"le": "0.005"}) == 1
    assert registry.get_sample_value("kiln_request_duration_seconds_sum", MV) == pytest.approx(0.016)


def test_inflight_preprocess_and_load_state(registry: CollectorRegistry) -> None:
    metrics = KilnMetrics(registry, process=False, gpu=False)
    with metrics.track_inflight("digits", "3"):
        assert registry.get_sample_value("kiln_inflight_requests", MV) == 1
    assert registry.get_sample_value("kiln_inflight_requests", MV) == 0
    metrics.observe_preprocess("digits", "3", 0.002)
    assert registry.get_sample_value("kiln_preprocess_duration_seconds_count", MV) == 1
    metrics.set_load_state("digits", "3", "loading")
    metrics.set_load_state("digits", "3", "ready")
    state = "kiln_model_load_state"
    assert registry.get_sample_value(state, MV | {state: "ready"}) == 1
    assert registry.get_sample_value(state, MV | {state: "loading"}) == 0
    with pytest.raises(ValueError, match="load state must be one of"):
        metrics.set_load_state("digits", "3", "warming")


class Doubler:
    inputs = (TensorSpec("x", "FP32", (-1, 1)),)
    outputs = (TensorSpec("y", "FP32", (-1, 1)),)
    max_batch_size = 8
    instances = 1

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}

    def close(self) -> None:
        pass


def test_batcher_feeds_batch_queue_compute_drop_and_depth_metrics(registry: CollectorRegistry) -> None:
    metrics = KilnMetrics(registry, process=False, gpu=False)

    async def main() -> None:
        batcher = DynamicBatcher(
            Doubler(), max_queue_delay_us=100_000, observer=metrics.batch_observer("digits", "3")
        )
        metrics.track_queue_depth("digits", "3", lambda: batcher.queue_depth)
        batcher.start()
        one = np.ones((1, 1), np.float32)
        first = asyncio.ensure_future(batcher.submit({"x": one}))
        second = asyncio.ensure_future(batcher.submit({"x": np.ones((2, 1), np.float32)}))
        await asyncio.sleep(0.01)
        assert registry.get_sample_value("kiln_queue_depth", MV) == 2  # read at scrape time
        await asyncio.gather(first, second)
        with pytest.raises(DeadlineExceededError):
            await batcher.submit({"x": one}, deadline=0.0)
        await batcher.stop()

    asyncio.run(main())
    assert registry.get_sample_value("kiln_batch_size_count", MV) == 1
    assert registry.get_sample_value("kiln_batch_size_sum", MV) == 3
    assert registry.get_sample_value("kiln_queue_duration_seconds_count", MV) == 2
    assert registry.get_sample_value("kiln_compute_duration_seconds_count", MV) == 1
    assert registry.get_sample_value("kiln_requests_dropped_total", MV | {"reason": "expired"}) == 1
    assert registry.get_sample_value("kiln_requests_dropped_total", MV | {"reason": "cancelled"}) == 0
    assert registry.get_sample_value("kiln_queue_depth", MV) == 0


def test_forget_removes_a_model_versions_series(registry: CollectorRegistry) -> None:
    metrics = KilnMetrics(registry, process=False, gpu=False)
    metrics.observe_request("digits", "3", "OK", 0.001)
    metrics.observe_request("other", "1", "OK", 0.001)
    metrics.batch_observer("digits", "3").on_dropped("cancelled")
    metrics.forget("digits", "3")
    assert registry.get_sample_value("kiln_requests_total", MV | {"code": "OK"}) is None
    assert registry.get_sample_value("kiln_requests_dropped_total", MV | {"reason": "cancelled"}) is None
    assert (
        registry.get_sample_value("kiln_requests_total", {"model": "other", "version": "1", "code": "OK"})
        == 1
    )


def test_two_instances_on_private_registries_do_not_collide() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    KilnMetrics(a, process=False, gpu=False).observe_request("m", "1", "OK")
    KilnMetrics(b, process=False, gpu=False)
    assert a.get_sample_value("kiln_requests_total", {"model": "m", "version": "1", "code": "OK"}) == 1
    assert b.get_sample_value("kiln_requests_total", {"model": "m", "version": "1", "code": "OK"}) is None


def test_process_metrics_are_registered(registry: CollectorRegistry) -> None:
    KilnMetrics(registry, gpu=False)
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    assert b"python_info" in generate_latest(registry)


class FakeNvml:
    """An NVML stand-in with two GPUs; the second fails its queries (a lost GPU)."""

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA Test GPU"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if handle == 1:
            raise RuntimeError("GPU is lost")
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)


def test_gpu_collector_exports_utilisation_and_memory(registry: CollectorRegistry) -> None:
    registry.register(GpuCollector(FakeNvml()))
    gpu0 = {"gpu": "0", "name": "NVIDIA Test GPU"}
    assert registry.get_sample_value("kiln_gpu_utilization_ratio", gpu0) == pytest.approx(0.37)
    assert registry.get_sample_value("kiln_gpu_memory_used_bytes", gpu0) == 3 * 2**30
    assert registry.get_sample_value("kiln_gpu_memory_total_bytes", gpu0) == 80 * 2**30
    assert registry.get_sample_value("kiln_gpu_utilization_ratio", gpu0 | {"gpu": "1"}) is None


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml is installed here")
def test_without_pynvml_there_is_no_gpu_collector(registry: CollectorRegistry) -> None:
    assert gpu_collector() is None
    assert KilnMetrics(registry, process=False).gpu is None
