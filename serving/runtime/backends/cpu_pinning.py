"""Where a multi-threaded ONNX Runtime session's threads run (CPU EP, `pin_ort_threads`).

A session of T intra-op threads is the thread that calls Run plus T - 1 pool threads. Each
session gets a block of T cores: its pool threads are pinned one to a core (ORT's
`session.intra_op_thread_affinities`), and the caller moves to the block's first core for the
length of the Run (`running_on`), so the two never share a core.

Why: after the process has idled for a millisecond or more, waking a pool thread that may run
anywhere often put it on the caller's own core (an idle vCPU of a KVM guest reads as preempted, so
the kernel's wake-up keeps the thread beside its waker), where it waited for the scheduler to move
it: a lone ResNet-20 row on 2 threads, ~0.55 ms back to back, took 0.9 / 1.9 / 2.6 ms on average
after idling 1 / 2 / 5 ms, p99 3.4-5.2 ms; pinned, 0.61-0.70 ms, p99 0.95-1.26 ms. Pinning the
pool alone is not enough: a caller that lands on the pool's core stalls it the same way
(benchmarks/ort_pinning.py, benchmarks/RESULTS-serving.md).

Blocks are laid out from the process's CPUs (sched_getaffinity) rotated to `first`, so worker k
of several that share the cores starts on its own share (serving/runtime/backends/core_share.py),
and only where the sessions use exactly those CPUs: a process that runs fewer threads than it may
use CPUs (an explicit `intra_op_threads` on a shared node) is not pinned.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["CoreBlock", "core_blocks", "process_cpus", "running_on"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CoreBlock:
    """The cores of one session: `caller` for the thread that calls Run, one per pool thread."""

    caller: int
    pool: tuple[int, ...]

    @property
    def ort_affinities(self) -> str:
        """ORT's affinity string: one 1-based logical processor per pool thread, ';'-separated."""
        return ";".join(str(cpu + 1) for cpu in self.pool)


def process_cpus() -> list[int]:
    """The CPUs this process may run on, in order (empty where the platform cannot tell)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def core_blocks(
    cpus: Sequence[int], threads: int, count: int, *, first: int = 0, workers: int = 1
) -> list[CoreBlock] | None:
    """`count` consecutive blocks of `threads` cores from `cpus` rotated to start at index `first`,
    for one of `workers` processes that split `cpus` alike. None where a session has no pool thread
    (threads < 2), or where the blocks of every worker do not make exactly `cpus`: fewer threads
    than CPUs is a process given a share of a larger set (a pod with 2 threads on a node's shared
    pool of 32), where every such process would pin the same first cores; more would stack them."""
    if threads < 2 or count < 1 or threads * count * workers != len(cpus):
        return None
    start = first % len(cpus)
    ring = [*cpus[start:], *cpus[:start]]
    blocks = (ring[i * threads : (i + 1) * threads] for i in range(count))
    return [CoreBlock(caller=block[0], pool=tuple(block[1:])) for block in blocks]


@contextlib.contextmanager
def running_on(cpu: int) -> Iterator[None]:
    """The calling thread runs on `cpu` only, inside the block; its own CPU set is restored after.
    Where the kernel refuses (the CPU left this process's cpuset since), the block runs unpinned."""
    before: set[int] | None = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, (cpu,))
    except OSError as exc:
        log.debug("running unpinned: cannot move this thread to CPU %d (%s)", cpu, exc)
        before = None
    try:
        yield
    finally:
        if before is not None:
            try:
                os.sched_setaffinity(0, before)
            except OSError as exc:  # the CPU set changed meanwhile: it keeps what the kernel left
                log.warning("cannot restore this thread's CPUs %s (%s)", sorted(before), exc)
