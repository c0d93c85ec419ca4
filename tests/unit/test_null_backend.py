"""The timing backend on its own: specs from kiln.json, zeros, device time, GIL release, counters,
the sha256 check, and its settings in `kiln serve` (YAML, KILN_*, flags, --print-config).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving import cli
from serving.contract.manifest import ArtefactMismatch, read_manifest
from serving.errors import InvalidInputError
from serving.grpc.config import ConfigError, ServeConfig, load_config
from serving.runtime.backends import (
    BackendOptions,
    NullBackend,
    NullTiming,
    TensorSpec,
    load_backend,
    null_timing,
)
from tests.integration.server_fixtures import publish_tiny_model

SPECS_IN = (TensorSpec("x", "FP16", (-1, 2, 3)),)
SPECS_OUT = (TensorSpec("y", "FP16", (-1, 5)), TensorSpec("z", "INT64", (-1, -1)))


def _backend(base_us: int, per_row_us: int = 0, **options: object) -> NullBackend:
    return NullBackend(
        SPECS_IN,
        SPECS_OUT,
        max_batch_size=8,
        timing=NullTiming(base_us, per_row_us),
        options=BackendOptions(**options),  # type: ignore[arg-type]
    )


def _rows(n: int) -> dict[str, np.ndarray]:
    return {"x": np.ones((n, 2, 3), np.float16)}


def test_loads_the_manifests_specs_and_answers_zeros(tmp_path: Path) -> None:
    version_dir = publish_tiny_model(tmp_path, max_batch_size=4)
    manifest = read_manifest(version_dir / "kiln.json")
    backend = load_backend(
        manifest, manifest.artefacts[0], version_dir=version_dir, verify=True, null_timing=NullTiming()
    )
    try:
        assert isinstance(backend, NullBackend) and backend.provider == "null"
        assert [(s.name, s.datatype, s.shape) for s in backend.inputs] == [("input", "FP32", (-1, 3, 8, 8))]
        assert [(s.name, s.datatype, s.shape) for s in backend.outputs] == [("logits", "FP32", (-1, 4))]
        assert backend.max_batch_size == 4
        out = backend.infer({"input": np.ones((3, 3, 8, 8), np.float32)})["logits"]
        assert out.shape == (3, 4) and out.dtype == np.float32 and not out.any()
        with pytest.raises(InvalidInputError, match="exceeds"):
            backend.infer({"input": np.ones((5, 3, 8, 8), np.float32)})
    finally:
        backend.close()


def test_the_artefact_is_still_verified(tmp_path: Path) -> None:
    version_dir = publish_tiny_model(tmp_path)
    data = bytearray((version_dir / "model.onnx").read_bytes())
    data[-40] ^= 1
    (version_dir / "model.onnx").write_bytes(bytes(data))
    manifest = read_manifest(version_dir / "kiln.json")
    with pytest.raises(ArtefactMismatch, match="sha256"):
        load_backend(
            manifest, manifest.artefacts[0], version_dir=version_dir, verify=True, null_timing=NullTiming()
        )


def test_outputs_follow_the_spec_dtypes_and_inputs_are_validated() -> None:
    backend = _backend(0)
    out = backend.infer(_rows(2))
    assert out["y"].dtype == np.float16 and out["y"].shape == (2, 5)
    assert out["z"].dtype == np.int64 and out["z"].shape == (2, 1)  # dynamic dims answer 1
    with pytest.raises(InvalidInputError, match="datatype"):
        backend.infer({"x": np.ones((1, 2, 3), np.float32)})


def test_holds_base_plus_per_padded_row_and_counts_it() -> None:
    backend = _backend(2000, 1000)  # 3 rows pad to the bucket of 4: 6 ms
    start = time.perf_counter()
    backend.infer(_rows(3))
    assert time.perf_counter() - start >= 0.006
    (first,) = backend.instance_stats()
    assert first.calls == 1 and first.rows == 3 and first.busy_seconds >= 0.006
    assert backend.device_calls == 1 and backend.buckets == (1, 2, 4, 8)
    unpadded = _backend(0, 10_000, pad_to_buckets=False)
    start = time.perf_counter()
    unpadded.infer(_rows(3))  # 30 ms (40 ms if it padded to 4)
    assert 0.030 <= time.perf_counter() - start < 0.040 and unpadded.buckets == ()


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_run_in_parallel_without_the_gil(instances: int) -> None:
    backend = _backend(50_000, instances=instances)
    threads = [threading.Thread(target=backend.infer, args=(_rows(1),)) for _ in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    stats = backend.instance_stats()
    assert len(stats) == instances and sum(s.calls for s in stats) == 2
    if instances == 2:
        assert elapsed < 0.09 and all(s.calls == 1 for s in stats)  # two devices, one batch each
    else:
        assert elapsed >= 0.1  # one device: the second batch waits for the first


def test_timing_bounds() -> None:
    with pytest.raises(ValueError, match="base_us"):
        NullTiming(-1)
    with pytest.raises(ValueError, match="per_row_us"):
        NullTiming(0, 2_000_000)
    assert NullTiming(1000, 10).seconds(8) == pytest.approx(0.00108)


def test_config_flag_env_and_yaml(tmp_path: Path) -> None:
    config = tmp_path / "kiln.yaml"
    config.write_text(f"repo: {tmp_path}\nbackend: null\nnull_base_us: 100\n")  # unquoted YAML null
    resolved = load_config(
        config_file=config, env={"KILN_NULL_PER_ROW_US": "7"}, overrides={"null_base_us": "300"}
    )
    assert (resolved.backend, resolved.null_base_us, resolved.null_per_row_us) == ("null", 300, 7)
    assert null_timing(resolved) == NullTiming(300, 7)
    assert null_timing(ServeConfig(repo=tmp_path)) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "null", "null_base_us": -1}, "null_base_us: must be in [0, 10000000]"),
        ({"backend": "null", "null_per_row_us": 1_000_001}, "null_per_row_us: must be in [0, 1000000]"),
        ({"null_base_us": 5}, "need backend 'null'"),
    ],
)
def test_config_rejects_bad_timings(tmp_path: Path, values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServeConfig(repo=tmp_path, **values)  # type: ignore[arg-type]


def test_print_config_shows_the_timings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--repo", str(tmp_path), "--backend", "null", "--null-base-us", "4000"]
    assert cli.run(parser.parse_args([*argv, "--null-per-row-us", "25", "--print-config"])) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["backend"], resolved["null_base_us"], resolved["null_per_row_us"]) == ("null", 4000, 25)


def test_a_batch_the_batcher_checked_is_not_validated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batcher validates each request once at submit; the pool takes the batch's rows from the
    CheckedBatch it builds, while a plain mapping (kiln score, warm-up) is still checked."""
    import asyncio

    from serving.runtime.backends import pool
    from serving.runtime.batcher import DynamicBatcher

    calls: list[int] = []
    real = pool.validate_inputs

    def counting(*args: object) -> int:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pool, "validate_inputs", counting)
    backend = _backend(0)

    async def main() -> None:
        batcher = DynamicBatcher(backend, max_queue_delay_us=2000)
        batcher.start()
        outs = await asyncio.gather(*(batcher.submit(_rows(n)) for n in (1, 2, 3)))
        await batcher.stop()
        assert [o["y"].shape[0] for o in outs] == [1, 2, 3]

    asyncio.run(main())
    assert calls == []
    with pytest.raises(InvalidInputError):
        backend.infer({"x": np.ones((2, 2, 4), np.float16)})  # wrong dims: the pool's own check
    assert calls == [1]
