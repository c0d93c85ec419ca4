"""Model files damaged on disk: the sha256 check refuses the damaged version, at start and at
(re)load, with a reason that says so; every other model and version keeps serving throughout,
under load, with no failed request, and a repaired version is swapped in, still without one.
Damage here keeps the file size (a bit flip), so the refusal comes from the checksum, not the
cheaper size check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from tests.fuzz.load import BATCH, Hammer, wait_until
from tests.integration.server_fixtures import publish_tiny_model, running_server


def flip_a_bit(path: Path, offset: int = -40) -> None:
    """Damage `path` in place, keeping its size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _config(repo: Path) -> ServeConfig:
    return ServeConfig(
        repo=repo,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        version_policy="latest",
        repository_control=True,
    )


def _states(client: KilnClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.repository_index().models}


def _error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_damaged_model_is_refused_at_start_and_the_others_serve(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, "alpha", seed=1)
    flip_a_bit(publish_tiny_model(tmp_path, "beta", seed=2) / "model.onnx")
    with running_server(_config(tmp_path)) as srv, KilnClient(srv.address) as client:
        assert client.infer("alpha", {"input": BATCH})["logits"].shape == (1, 4)
        error = _error(lambda: client.infer("beta", {"input": BATCH}))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "sha256 mismatch" in error.details()
        state, reason = _states(client)[("beta", "1")]
        assert state == "UNAVAILABLE" and "model.onnx: sha256 mismatch" in reason
        assert client.health("beta") == "NOT_SERVING" and client.health("alpha") == "SERVING"


def test_damaged_new_version_is_refused_under_load_and_nothing_fails(tmp_path: Path) -> None:
    repo, staging = tmp_path / "repo", tmp_path / "staging"
    publish_tiny_model(repo, "alpha", seed=1)
    publish_tiny_model(repo, "beta", seed=2)
    damaged = publish_tiny_model(staging, "beta", seed=3, version=2)
    good = (damaged / "model.onnx").read_bytes()
    flip_a_bit(damaged / "model.onnx")
    with running_server(_config(repo)) as srv, KilnClient(srv.address) as client:
        with Hammer(srv.address, ("alpha", "beta"), threads=3) as load:
            wait_until(lambda: min(load.ok.values()) >= 20, what="load on both models")
            shutil.move(damaged, repo / "beta" / "2")
            error = _error(lambda: client.load_model("beta"))  # reload: v2 refused, v1 kept
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "version 2 failed to load" in error.details() and "sha256 mismatch" in error.details()
            assert "still serving [1]" in error.details()
            served = dict(load.ok)
            wait_until(lambda: all(load.ok[m] >= served[m] + 20 for m in served), what="serving on")
            states = _states(client)
            assert client.infer("beta", {"input": BATCH}, version="1")["logits"].shape == (1, 4)
            (repo / "beta" / "2" / "model.onnx").write_bytes(good)  # repaired: the reload swaps it in
            client.load_model("beta")
            served = dict(load.ok)
            wait_until(lambda: all(load.ok[m] >= served[m] + 20 for m in served), what="serving after swap")
        assert load.failures == []
        assert states[("beta", "1")][0] == "READY" and states[("alpha", "1")][0] == "READY"
        assert states[("beta", "2")][0] == "UNAVAILABLE" and "sha256 mismatch" in states[("beta", "2")][1]
        assert [(m.version, m.state) for m in client.repository_index().models if m.name == "beta"] == [
            ("2", "READY")
        ]


def test_reload_of_a_damaged_file_is_refused_until_it_is_repaired(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, "alpha", seed=1)
    model_file = publish_tiny_model(tmp_path, "beta", seed=2) / "model.onnx"
    good = model_file.read_bytes()
    with running_server(_config(tmp_path)) as srv, KilnClient(srv.address) as client:
        with Hammer(srv.address, ("alpha",)) as load:
            client.unload_model("beta")
            flip_a_bit(model_file)
            error = _error(lambda: client.load_model("beta"))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "sha256 mismatch" in error.details()
            assert not client.model_ready("beta")
            model_file.write_bytes(good)  # repaired: the same RPC now brings it back
            client.load_model("beta")
            assert client.model_ready("beta") and client.health("beta") == "SERVING"
            wait_until(lambda: load.count("alpha") >= 20, what="load on alpha")
        assert load.failures == []


def test_damaged_manifest_is_refused_with_its_reason(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, "alpha", seed=1)
    manifest = publish_tiny_model(tmp_path, "beta", seed=2) / "kiln.json"
    manifest.write_text(manifest.read_text()[:-20])  # a torn write
    with running_server(_config(tmp_path)) as srv, KilnClient(srv.address) as client:
        state, reason = _states(client)[("beta", "1")]
        assert state == "UNAVAILABLE" and "kiln.json" in reason
        assert client.infer("alpha", {"input": BATCH})["logits"].shape == (1, 4)
