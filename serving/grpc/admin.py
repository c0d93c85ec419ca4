"""Who may change what is served: the repository-control RPCs (RepositoryModelLoad/Unload).

Loading and unloading models is an operator's action, not a client's. `ServeConfig` offers two
switches, applied here to the inference servicer before it is registered:

- `repository_control` (off by default, as Triton's default model-control mode "none"): off, both
  RPCs answer UNIMPLEMENTED ("not supported/enabled in this service"); RepositoryIndex stays.
  Anyone who reaches the port could otherwise unload every model.
- `admin_token` / `admin_token_file`: both RPCs also need the metadata
  `x-kiln-admin-token: <token>` (PERMISSION_DENIED otherwise), on top of the bearer token every
  RPC needs when one is set. Compared in constant time, as the bearer token is.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from serving.grpc.config import ServeConfig
from serving.grpc.metrics import CLIENT_ERRORS

ADMIN_HEADER = "x-kiln-admin-token"
GUARDED = ("RepositoryModelLoad", "RepositoryModelUnload")

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def digest(token: str | bytes) -> bytes:
    """sha256 of a token: comparing digests takes the same time whatever the presented length."""
    return hashlib.sha256(token.encode("utf-8") if isinstance(token, str) else token).digest()


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The first value of `key` in the call's metadata (bytes values decoded), or None."""
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def _disabled(name: str) -> Handler:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        CLIENT_ERRORS.add("unimplemented")
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{name} is disabled on this server (repository_control is off)",
        )

    return handler


def _admin_only(name: str, inner: Handler, expected: bytes) -> Handler:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        presented = metadata_value(context, ADMIN_HEADER)
        if presented is None or not hmac.compare_digest(digest(presented.strip()), expected):
            CLIENT_ERRORS.add("permission_denied")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs the admin token (metadata '{ADMIN_HEADER}')",
            )
        return await inner(request, context)

    return handler


def guard_repository_control(servicer: Any, config: ServeConfig) -> None:
    """Replace the servicer's Load/Unload handlers as the config says (before registration)."""
    admin = config.admin_secret()
    for name in GUARDED:
        if not config.repository_control:
            setattr(servicer, name, _disabled(name))
        elif admin is not None:
            setattr(servicer, name, _admin_only(name, getattr(servicer, name), digest(admin)))
