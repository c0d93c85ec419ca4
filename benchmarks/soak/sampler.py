"""What the soak samples from the server process: resident memory, open file descriptors and
threads (from /proc), and queue depth and request counts by status (from its /metrics)."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    """One row of the soak CSV."""

    t_s: float
    rss_mib: float
    fds: int
    threads: int
    queue_depth: float
    requests_ok: float
    requests_error: float
    load_avg_1m: float

    def row(self) -> dict[str, object]:
        """The CSV row (rounded)."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MiB, threads) of a process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def scrape(metrics_port: int) -> tuple[float, float, float]:
    """(queue depth summed over models, OK requests, non-OK requests) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    depth = ok = error = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kiln_queue_depth":
                depth += sample.value
            elif sample.name == "kiln_requests_total":
                if sample.labels.get("code") == "OK":
                    ok += sample.value
                else:
                    error += sample.value
    return depth, ok, error


def sample(pid: int, metrics_port: int, t_s: float) -> Sample:
    """Everything at once, for the server process `pid`."""
    rss, threads = proc_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    depth, ok, error = scrape(metrics_port)
    load = float(Path("/proc/loadavg").read_text().split()[0])
    return Sample(t_s, rss, fds, threads, depth, ok, error, load)
