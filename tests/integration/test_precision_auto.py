"""`precision: auto` measures the artefacts that passed the gate on this CPU and takes the fastest
(serving/runtime/tuning.py): real ONNX Runtime sessions of a real FP32 and INT8 artefact."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from serving.contract.repository import ModelRepository
from serving.runtime import tuning
from tests.integration.tuning_fixtures import publish_convnet

SIZES = (1, 8, 16)


def _manifest(repo: Path, version: int = 1):  # type: ignore[no-untyped-def]
    return ModelRepository(repo).read_version("convnet", version).manifest


@pytest.fixture(autouse=True)
def _quiet_quantizer() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice on the root logger


def test_auto_serves_int8_where_this_cpu_runs_it_faster(tmp_path: Path) -> None:
    version_dir = publish_convnet(tmp_path)
    choice = tuning.tune(_manifest(tmp_path), version_dir, batch_sizes=SIZES, seconds_per_trial=0.1)
    best = {p: max(t.score for t in choice.trials if t.precision == p) for p in ("fp32", "int8")}
    if best["int8"] < 1.1 * best["fp32"]:
        pytest.skip(f"INT8 gives this CPU no clear advantage ({choice.reason}); nothing to prefer")
    assert choice.precision == "int8" and choice.path == "model.int8.onnx"
    assert "int8" in choice.reason and choice.machine.cpu in choice.reason
    assert {t.layout for t in choice.trials} == set(tuning.layouts(choice.machine.cores, None, None))


def test_int8_outside_its_tolerance_is_never_chosen(tmp_path: Path) -> None:
    version_dir = publish_convnet(tmp_path, int8_forced=True)
    manifest = _manifest(tmp_path)
    assert [a.precision for a in tuning.eligible(manifest)] == ["fp32"]
    choice = tuning.tune(manifest, version_dir, batch_sizes=SIZES, seconds_per_trial=0.05)
    assert choice.precision == "fp32" and {t.precision for t in choice.trials} == {"fp32"}


def test_explicit_threads_and_instances_are_kept(tmp_path: Path) -> None:
    version_dir = publish_convnet(tmp_path)
    choice = tuning.tune(
        _manifest(tmp_path), version_dir, batch_sizes=(1,), seconds_per_trial=0.05, threads=1, instances=1
    )
    assert {t.layout for t in choice.trials} == {tuning.Layout(1, 1)}


def test_cache_is_used_on_restart_and_invalidated_by_a_new_artefact_or_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_dir = publish_convnet(tmp_path, seed=0)
    first = tuning.tune(_manifest(tmp_path), first_dir, batch_sizes=(1,), seconds_per_trial=0.05)
    assert not first.cached and (tmp_path / tuning.CACHE_FILE).is_file()
    again = tuning.tune(_manifest(tmp_path), first_dir, batch_sizes=(1,), seconds_per_trial=0.05)
    assert again.cached and again.precision == first.precision and again.trials == first.trials

    second_dir = publish_convnet(tmp_path, seed=1)  # new weights: other sha256
    assert not tuning.tune(
        _manifest(tmp_path, 2), second_dir, batch_sizes=(1,), seconds_per_trial=0.05
    ).cached

    # Another CPU model cannot be had on this machine: the one fault here that needs a stand-in.
    real = tuning.this_machine()
    monkeypatch.setattr(tuning, "this_machine", lambda: dataclasses.replace(real, cpu="another CPU"))
    moved = tuning.tune(_manifest(tmp_path), first_dir, batch_sizes=(1,), seconds_per_trial=0.05)
    assert not moved.cached and moved.machine.cpu == "another CPU"


def test_an_unwritable_cache_still_chooses(tmp_path: Path) -> None:
    version_dir = publish_convnet(tmp_path)
    (tmp_path / tuning.CACHE_FILE).mkdir()  # unreadable and unreplaceable, even for root
    choice = tuning.tune(_manifest(tmp_path), version_dir, batch_sizes=(1,), seconds_per_trial=0.05)
    assert choice.precision in ("fp32", "int8") and not choice.cached


def test_kiln_bench_prints_the_table_the_choice_was_made_from(tmp_path: Path) -> None:
    import subprocess
    import sys

    publish_convnet(tmp_path)
    cmd = [sys.executable, "-m", "serving.dispatch", "bench", "--repo", str(tmp_path), "--model", "convnet",
           "--precision", "auto"]  # fmt: skip
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[2]
    )
    assert done.returncode == 0, done.stderr
    assert "(chosen)" in done.stdout and "model.int8.onnx" in done.stdout and "model.onnx" in done.stdout
    assert "fastest of" in done.stdout
    # the server's cache now holds that measurement: tuning again reads it
    again = tuning.tune(
        _manifest(tmp_path), tmp_path / "convnet" / "1", batch_sizes=tuning.batch_sizes_for(16)
    )
    assert again.cached


def test_the_server_serves_the_measured_choice_and_says_why(tmp_path: Path) -> None:
    from protos.inference import grpc_service_pb2 as pb
    from serving.clients.client import KilnClient
    from serving.grpc.config import ServeConfig
    from tests.integration.server_fixtures import running_server

    publish_convnet(tmp_path)
    expected = tuning.tune(
        _manifest(tmp_path), tmp_path / "convnet" / "1", batch_sizes=tuning.batch_sizes_for(16)
    )  # what the server will read from the cache
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=0)
    with running_server(config) as srv, KilnClient(srv.address) as client:
        loaded = srv.server.manager.get("convnet")
        answer = client.inference.ModelConfig(pb.ModelConfigRequest(name="convnet")).config
        info = srv.server.registry.get_sample_value(
            "kiln_model_artefact_info",
            {"model": "convnet", "version": "1", "artefact": expected.path, "precision": expected.precision,
             "threads": str(expected.layout.threads), "instances": str(expected.layout.instances),
             "chosen_by": "cached"},
        )  # fmt: skip
    assert loaded.artefact.path == expected.path and loaded.backend.instances == expected.layout.instances
    assert answer.parameters["kiln_precision_choice"].string_value == expected.reason
    assert answer.parameters["kiln_artefact_precision"].string_value == expected.precision
    assert answer.instance_group[0].count == expected.layout.instances
    assert info == 1


def test_an_explicit_precision_is_not_measured(tmp_path: Path) -> None:
    from serving.grpc.config import ServeConfig
    from tests.integration.server_fixtures import running_server

    publish_convnet(tmp_path)
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=None, precision="int8")
    with running_server(config) as srv:
        loaded = srv.server.manager.get("convnet")
    assert loaded.artefact.precision == "int8" and loaded.handle.tuning is None
    assert not (tmp_path / tuning.CACHE_FILE).exists()


def test_a_damaged_candidate_is_refused_before_anything_is_measured(tmp_path: Path) -> None:
    from serving.contract.repository import ModelRepository
    from serving.contract.version_policy import VersionPolicy
    from serving.errors import ModelUnavailableError
    from serving.runtime.model_handle import ArtefactChoice, choose, resolve

    version_dir = publish_convnet(tmp_path)
    damaged = version_dir / "model.int8.onnx"
    data = bytearray(damaged.read_bytes())
    data[-40] ^= 1  # same size: the sha256 must catch it
    damaged.write_bytes(bytes(data))
    resolved = resolve(ModelRepository(tmp_path), "convnet", None, policy=VersionPolicy.all())
    with pytest.raises(ModelUnavailableError, match=r"model\.int8\.onnx: sha256 mismatch"):
        choose(resolved, ArtefactChoice(), on_cpu=True)
    assert not (tmp_path / tuning.CACHE_FILE).exists()  # refused before the measurement ran
