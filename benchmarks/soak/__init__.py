"""Soak benchmark: `kiln serve` under steady perf_analyzer load for a long time, with the
process's memory, file descriptors, threads and queue depth sampled (see run.py)."""
