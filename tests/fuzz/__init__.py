"""Helpers for the hostile-input and fault tests: hypothesis strategies for hostile requests and
a harness that sends them to a live server and judges each answer (fuzzing), plus load, gates,
memory and subprocess helpers (tests/integration/test_faults_*.py). Used by benchmarks/fuzz_run.py
too."""
