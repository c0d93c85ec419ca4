"""Who can do what: repository control switched off or behind an admin token, reflection switched
off, the bearer token on every RPC but health, and model names/versions that try to leave the
repository (../, absolute paths, NUL bytes) refused by every RPC that takes one, without revealing
whether the path they name exists."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.inference import grpc_service_pb2 as pb
from protos.kiln.classify.v1 import classify_pb2 as cpb
from serving.clients.client import KilnClient, build_infer_request
from serving.grpc.admin import ADMIN_HEADER
from serving.grpc.config import ServeConfig, load_config
from tests.integration.server_fixtures import ServerThread, publish_tiny_model, running_server

C = grpc.StatusCode
ADMIN = "admin-token-for-tests"
BATCH = np.zeros((1, 3, 8, 8), np.float32)


def _code(call: Callable[[], object]) -> tuple[C, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _config(repo: Path, **extra: object) -> ServeConfig:
    return ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, warmup=False, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<tmp>/repo holds "tiny"; <tmp>/evil, outside the repository, holds a real model too."""
    root = tmp_path_factory.mktemp("tree")
    publish_tiny_model(root / "repo", "tiny")
    publish_tiny_model(root, "evil")
    return root / "repo"


def test_repository_control_off_refuses_load_and_unload(repo: Path) -> None:
    config = load_config(
        env={"KILN_REPO": str(repo), "KILN_REPOSITORY_CONTROL": "false"}, overrides={"port": 0}
    )
    with running_server(config) as srv, KilnClient(srv.address) as client:
        for call in (lambda: client.load_model("tiny"), lambda: client.unload_model("tiny")):
            code, details = _code(call)
            assert code == C.UNIMPLEMENTED and "repository_control is off" in details
        assert client.model_ready("tiny") and [m.name for m in client.repository_index().models] == ["tiny"]


def test_admin_token_guards_load_and_unload(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "admin").write_text(ADMIN + "\n")
    config = _config(repo, repository_control=True, admin_token_file=tmp_path / "admin")
    with running_server(config) as srv, KilnClient(srv.address) as client:
        stub, admin = client.inference, ((ADMIN_HEADER, ADMIN),)
        unload = pb.RepositoryModelUnloadRequest(model_name="tiny")
        for metadata in ((), ((ADMIN_HEADER, "wrong-token-1234"),), ((ADMIN_HEADER, ADMIN + "x"),)):
            code, details = _code(
                lambda m=metadata: stub.RepositoryModelUnload(unload, metadata=m, timeout=10)
            )
            assert code == C.PERMISSION_DENIED and ADMIN_HEADER in details
        assert client.model_ready("tiny")
        stub.RepositoryModelUnload(unload, metadata=admin, timeout=10)
        assert not client.model_ready("tiny")
        load = pb.RepositoryModelLoadRequest(model_name="tiny")
        assert _code(lambda: stub.RepositoryModelLoad(load, timeout=10))[0] == C.PERMISSION_DENIED
        stub.RepositoryModelLoad(load, metadata=admin, timeout=30)
        assert client.model_ready("tiny")


def test_reflection_off(repo: Path) -> None:
    with (
        running_server(_config(repo, reflection=False)) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        code, _ = _code(lambda: list(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        assert code == C.UNIMPLEMENTED
        assert KilnClient(srv.address).server_ready()


def test_bearer_token_on_every_rpc_but_health(repo: Path) -> None:
    token = "bearer-token-for-tests"
    with (
        running_server(_config(repo, auth_token=token)) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        watch = health.Watch(health_pb2.HealthCheckRequest(service="tiny"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        assert (
            _code(lambda: list(reflection.ServerReflectionInfo(iter([listing]), timeout=10)))[0]
            == C.UNAUTHENTICATED
        )
        with (
            KilnClient(srv.address, token=token[:-1] + "X") as wrong,
            KilnClient(srv.address, token=token * 2) as longer,
        ):
            for client in (wrong, longer):  # same length and a different length: both refused
                assert _code(lambda c=client: c.infer("tiny", {"input": BATCH}))[0] == C.UNAUTHENTICATED
                assert _code(lambda c=client: c.repository_index())[0] == C.UNAUTHENTICATED
        with KilnClient(srv.address, token=token) as good:
            assert good.infer("tiny", {"input": BATCH})["logits"].shape == (1, 4)


# ---- path traversal -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with running_server(_config(repo, repository_control=True)) as srv:  # Load/Unload take names too
        yield srv


def _hostile_names(repo: Path) -> list[str]:
    evil = repo.parent / "evil"
    return ["../evil", "../nonexistent", str(evil), "/nonexistent", "..", ".", "tiny/../tiny", "tiny/1",
            "tiny\x00", "\x00../evil", "evil\x00/../tiny", "../" * 20 + "etc"]  # fmt: skip


HOSTILE_VERSIONS = ["../1", "1/../1", "/1", "1\x00", "-1", "1/", "..", "%2e%2e"]


def _every_rpc(client: KilnClient, name: str, version: str) -> dict[str, object]:
    """What each name-taking RPC answers for (name, version): a status code, or a value.
    With a version given, the repository RPCs (which take no version) are left out."""
    stub, answers = client.inference, {}
    calls: dict[str, Callable[[], object]] = {
        "ModelMetadata": lambda: client.model_metadata(name, version),
        "ModelConfig": lambda: client.model_config(name, version),
        "ModelStatistics": lambda: client.statistics(name, version),
        "ModelInfer": lambda: client.infer(name, {"input": BATCH}, version=version),
        "Classify": lambda: client.classify(name, [np.zeros((8, 8, 3), np.uint8)], version=version),
        "RepositoryModelLoad": lambda: client.load_model(name),
        "RepositoryModelUnload": lambda: client.unload_model(name),
        "Health": lambda: client.health(name),
    }
    if version:
        del calls["RepositoryModelLoad"], calls["RepositoryModelUnload"], calls["Health"]
    for rpc, call in calls.items():
        try:
            call()
            answers[rpc] = "OK"
        except grpc.RpcError as exc:
            answers[rpc] = exc.code()
    answers["ModelReady"] = client.model_ready(name, version)
    stream = stub.ModelStreamInfer(
        iter([build_infer_request(name, {"input": BATCH}, version=version)]), timeout=10
    )
    answers["ModelStreamInfer"] = bool(next(stream).error_message)
    classify = cpb.ClassifyRequest(model=name, version=version, images=[cpb.Image(encoded=b"x")])
    answers["ClassifyStream"] = next(client.classify_stream([classify], timeout=10)).error.code
    return answers


def test_names_that_leave_the_repository_are_refused_everywhere(server: ServerThread, repo: Path) -> None:
    manager = server.server.manager
    state_before = (len(manager._locks), dict(manager._model_errors))
    with KilnClient(server.address) as client:
        answers = {name: _every_rpc(client, name, "") for name in _hostile_names(repo)}
        versions = {version: _every_rpc(client, "tiny", version) for version in HOSTILE_VERSIONS}
        index = [(m.name, m.version) for m in client.repository_index().models]
        assert client.infer("tiny", {"input": BATCH})["logits"].shape == (1, 4)
    for name, got in answers.items():
        refused = {
            k: v for k, v in got.items() if k not in ("ModelReady", "ModelStreamInfer", "ClassifyStream")
        }
        assert set(refused.values()) <= {C.INVALID_ARGUMENT, C.NOT_FOUND}, (name, got)
        assert got["RepositoryModelLoad"] == got["RepositoryModelUnload"] == C.INVALID_ARGUMENT, (name, got)
        assert got["ModelReady"] is False and got["ModelStreamInfer"] is True, (name, got)
        assert got["ClassifyStream"] in (C.INVALID_ARGUMENT.value[0], C.NOT_FOUND.value[0]), (name, got)
    # no existence oracle: a path that exists outside the repository answers like one that does not
    assert answers["../evil"] == answers["../nonexistent"]
    assert answers[str(repo.parent / "evil")] == answers["/nonexistent"]
    for version, got in versions.items():
        assert got["ModelInfer"] == got["ModelMetadata"] == C.NOT_FOUND, (version, got)
    assert index == [("tiny", "1")]  # nothing outside the repository was ever loaded or listed
    assert (len(manager._locks), dict(manager._model_errors)) == state_before  # no state per bad name
