"""TLS, mutual TLS and the bearer token, with certificates made by the openssl CLI in the test."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.kiln.classify.v1 import classify_pb2 as cpb
from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import publish_tiny_model, running_server

TOKEN = "s3cret-token-for-tests"
pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl CLI is needed to make certificates"
)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kiln-test-ca",
             "-keyout", d / "ca.key", "-out", d / "ca.pem")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", d / "san.ext"), ("client", None)):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=kiln-test-{name}",
                 "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")  # fmt: skip
        extra = ["-extfile", ext] if ext else []
        _openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", d / f"{name}.pem", *extra)  # fmt: skip
    return d


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_tiny_model(root)
    return root


def _config(repo: Path, **extra: object) -> ServeConfig:
    return ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, warmup=False, **extra)  # type: ignore[arg-type]


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _infer(client: KilnClient) -> np.ndarray:
    return client.infer("tiny", {"input": np.zeros((1, 3, 8, 8), np.float32)}, timeout=10)["logits"]


def test_tls_server(repo: Path, pki: Path) -> None:
    with running_server(_config(repo, tls_cert=pki / "server.pem", tls_key=pki / "server.key")) as srv:
        with KilnClient(srv.address, ca_cert=pki / "ca.pem") as client:
            assert _infer(client).shape == (1, 4)
        with KilnClient(srv.address, timeout=5) as plaintext:
            assert _code(plaintext.server_live) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_health_port_beside_a_tls_server(repo: Path, pki: Path) -> None:
    """Kubelet gRPC probes cannot speak TLS: the health-only port answers them in plaintext."""
    config = _config(repo, tls_cert=pki / "server.pem", tls_key=pki / "server.key", health_port=0)
    with running_server(config) as srv:
        health_address = f"127.0.0.1:{srv.server.health_port}"
        with KilnClient(health_address, timeout=5) as probe:
            assert probe.health("") == "SERVING" and probe.health("tiny") == "SERVING"
            # only health lives there: inference still needs the TLS port
            assert _code(lambda: _infer(probe)) == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_requires_a_client_certificate(repo: Path, pki: Path) -> None:
    config = _config(
        repo, tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem"
    )
    with running_server(config) as srv:
        with KilnClient(
            srv.address, ca_cert=pki / "ca.pem", client_cert=pki / "client.pem", client_key=pki / "client.key"
        ) as client:
            assert client.server_ready()
        with KilnClient(srv.address, ca_cert=pki / "ca.pem", timeout=5) as anonymous:
            assert _code(anonymous.server_live) == grpc.StatusCode.UNAVAILABLE


def test_bearer_token(repo: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running_server(_config(repo, auth_token_file=token_file)) as srv:
        with KilnClient(srv.address, token=TOKEN) as good:
            assert _infer(good).shape == (1, 4) and good.server_ready()
        with KilnClient(srv.address) as missing, KilnClient(srv.address, token="wrong-token-123") as wrong:
            for client in (missing, wrong):
                assert _code(client.server_live) == grpc.StatusCode.UNAUTHENTICATED
                assert _code(lambda c=client: _infer(c)) == grpc.StatusCode.UNAUTHENTICATED
                stream = client.classify_stream([cpb.ClassifyRequest(model="tiny")], timeout=10)
                assert _code(lambda s=stream: list(s)) == grpc.StatusCode.UNAUTHENTICATED
                assert client.health() == "SERVING"  # probes carry no credentials
            with pytest.raises(grpc.RpcError) as info:
                missing.server_live()
            assert "missing bearer token" in info.value.details()
