"""GPU utilisation and memory as Prometheus gauges, read through NVML at scrape time.

`pynvml` (package nvidia-ml-py) is optional and imported only by `gpu_collector()`; without it, or
without an NVIDIA driver, there is simply no GPU collector. A custom collector (rather than gauges
updated by a thread) reads fresh values on each scrape and costs nothing in between.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["GpuCollector", "gpu_collector"]

log = logging.getLogger(__name__)

_LABELS = ("gpu", "name")


class GpuCollector(Collector):
    """Per-GPU utilisation ratio and memory used/total bytes from an initialised NVML module."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            self._devices.append(
                (str(index), name.decode() if isinstance(name, bytes) else str(name), handle)
            )

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "kiln_gpu_utilization_ratio", "GPU busy fraction (NVML, last sample period)", labels=_LABELS
            ),
            GaugeMetricFamily("kiln_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=_LABELS),
            GaugeMetricFamily("kiln_gpu_memory_total_bytes", "GPU memory installed (NVML)", labels=_LABELS),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The metric names, without touching NVML (called once at registration)."""
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Fresh values for every GPU; a GPU that fails to answer is skipped, not fatal."""
        util, used, total = self._families()
        for index, name, handle in self._devices:
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # NVMLError subclasses; a lost GPU must not break /metrics
                log.warning("NVML query for GPU %s failed: %s", index, exc)
                continue
            util.add_metric([index, name], rates.gpu / 100.0)
            used.add_metric([index, name], float(memory.used))
            total.add_metric([index, name], float(memory.total))
        yield from (util, used, total)


def gpu_collector() -> GpuCollector | None:
    """A collector over every NVIDIA GPU, or None when pynvml or a driver/GPU is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return GpuCollector(pynvml)
    except Exception as exc:  # ImportError, or NVMLError when no driver is loaded
        log.debug("no GPU metrics: %s", exc)
        return None
