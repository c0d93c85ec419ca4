"""One CPU memory arena per process for ONNX Runtime's CPU sessions (`share_ort_arena`, default on).

Each ORT session otherwise keeps an arena of its own, grown to the largest batch it ever ran and
never shrunk. A process often holds several sessions of one model that never run at once: a worker
of several keeps a wide session beside its own (core_share.py), small models get a one-thread and a
spinning twin (batch_sessions.py). Each arena then grows to a full batch: ResNet-50 FP32, a
worker's own and wide sessions after a batch of 64 each held 1,361 MB in one process against
925 MB sharing one arena (benchmarks/ort_arena.py, benchmarks/RESULTS-serving.md). A shared arena
holds what the batches running at the same moment need, and the sessions of one instance take
turns.

The price: the arena lives as long as the process. A model unloaded (repository control) leaves its
peak in the arena for the next model to reuse instead of returning it to the system.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["use_shared_arena"]

_lock = threading.Lock()
_registered = False


def use_shared_arena(ort: Any, options: Any) -> None:
    """Make the session built with `options` (an ort.SessionOptions) allocate CPU memory from the
    process's arena, registering that arena with ORT's environment on first use."""
    global _registered
    with _lock:
        if not _registered:  # once: a second registration would start a second arena
            arena, memory = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, ort.OrtMemType.DEFAULT
            info = ort.OrtMemoryInfo("Cpu", arena, 0, memory)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))  # ORT's per-session defaults
            _registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")
