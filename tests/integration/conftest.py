"""Clients for the module's `server` fixture (each server test module defines its own server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tritonclient.grpc as grpcclient

from serving.clients.client import KilnClient
from tests.integration.server_fixtures import ServerThread


@pytest.fixture(scope="module")
def triton(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    """tritonclient's gRPC client on the module's server."""
    client = grpcclient.InferenceServerClient(server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[KilnClient]:
    """Kiln's own client on the module's server."""
    with KilnClient(server.address) as kiln:
        yield kiln
