"""Transport security for `kiln serve`: TLS/mTLS credentials and an optional bearer token.

The token check is a server interceptor placed first in the chain. It compares
`authorization: Bearer <token>` with `hmac.compare_digest` (constant time, so the token cannot be
guessed byte by byte from response times) on sha256 digests (so the time does not reveal the
token's length either: compare_digest on raw values returns early when the lengths differ).
Health checks are exempt: Kubernetes probes carry no credentials, and a probe learns nothing but
SERVING / NOT_SERVING.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from serving.errors import UnauthenticatedError
from serving.grpc.status_map import wrap_handler

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_BEARER = "bearer "


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca`, clients must present a cert it signed."""
    root = client_ca.read_bytes() if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=root,
        require_client_auth=client_ca is not None,
    )


def _rejecting_handlers(message: str) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per call kind that fails at once with UNAUTHENTICATED, reading no request.

    An interceptor decides before any handler runs, so it cannot raise into the call; it answers
    with one of these instead. They raise the domain error and are wrapped by the one error map
    (serving.grpc.status_map), like every servicer's handlers, so no status is set here.
    """

    async def deny_unary(request: object, context: grpc.aio.ServicerContext) -> None:
        raise UnauthenticatedError(message)

    async def deny_stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        raise UnauthenticatedError(message)
        yield  # pragma: no cover - makes this an async generator; the raise comes first

    handlers = {
        "unary_unary": grpc.unary_unary_rpc_method_handler(deny_unary),
        "unary_stream": grpc.unary_stream_rpc_method_handler(deny_stream),
        "stream_unary": grpc.stream_unary_rpc_method_handler(deny_unary),
        "stream_stream": grpc.stream_stream_rpc_method_handler(deny_stream),
    }
    return {kind: wrap_handler("bearer-token", handler) for kind, handler in handlers.items()}


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls whose `authorization` metadata is not `Bearer <token>` (health exempt)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = hashlib.sha256(token.encode("utf-8")).digest()
        self._missing = _rejecting_handlers("missing bearer token (send 'authorization: Bearer <token>')")
        self._wrong = _rejecting_handlers("invalid bearer token")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("utf-8", "replace")
                break
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED either way
        if header is None or not header.lower().startswith(_BEARER):
            return self._missing[_kind(handler)]
        presented = hashlib.sha256(header[len(_BEARER) :].strip().encode("utf-8")).digest()
        if not hmac.compare_digest(presented, self._expected):
            return self._wrong[_kind(handler)]
        return handler
