"""Interpreter settings a running server changes, lent by the process and given back after.

Both belong to the process, not to one Server: tests and notebooks run servers in-process,
several at once, and must get the interpreter back as they lent it.

- The GIL switch interval (`ServeConfig.gil_switch_interval_us`, why: see there), held by every
  started server: the first saves the process's value, the last to stop restores it, whatever
  order they stop in.
- A frozen heap (`gc.freeze`) while `Server.serve` runs: what is loaded at start lives as long as
  the server, and taking it out of the collector's generations keeps full collections (latency
  spikes) down to per-request garbage.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator

__all__ = ["SWITCH_INTERVAL", "SwitchInterval", "frozen_heap"]


class SwitchInterval:
    """sys.setswitchinterval held by the running servers; restored when the last lets go."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # servers start and stop on their own loops' threads
        self._holders = 0
        self._saved = sys.getswitchinterval()

    def hold(self, seconds: float) -> None:
        """Set the interval to `seconds` for as long as this holder runs."""
        with self._lock:
            if self._holders == 0:
                self._saved = sys.getswitchinterval()
            self._holders += 1
            sys.setswitchinterval(seconds)

    def release(self) -> None:
        """Let go; the last holder restores the value the process had before the first."""
        with self._lock:
            if self._holders == 0:
                raise RuntimeError("SwitchInterval.release without a matching hold")
            self._holders -= 1
            if self._holders == 0:
                sys.setswitchinterval(self._saved)


SWITCH_INTERVAL = SwitchInterval()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """gc.freeze what exists now, thawed on exit.

    gc.unfreeze thaws every frozen object, not just ours, so a process that froze objects of its
    own is left as it is (nothing frozen here, nothing thawed).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
