"""Who may change what is served: the repository-control RPCs (RepositoryModelLoad/Unload).

Loading and unloading models is an operator's action, not a client's. `ServeConfig` offers two
switches, which `RepositoryControl` checks at the top of both handlers:

- `repository_control` (off by default, as Triton's default model-control mode "none"): off, both
  RPCs answer UNIMPLEMENTED ("not supported/enabled in this service"); RepositoryIndex stays.
  Anyone who reaches the port could otherwise unload every model.
- `admin_token` / `admin_token_file`: both RPCs also need the metadata
  `x-kiln-admin-token: <token>` (PERMISSION_DENIED otherwise), on top of the bearer token every
  RPC needs when one is set. Compared in constant time, as the bearer token is.

Refusals are raised as domain errors, so the one error map (serving.grpc.status_map) turns them
into statuses and counts them like every other client error.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import grpc

from serving.errors import InvalidInputError, PermissionDeniedError, UnimplementedError
from serving.grpc.config import ServeConfig

ADMIN_HEADER = "x-kiln-admin-token"


def digest(token: str | bytes) -> bytes:
    """sha256 of a token: comparing digests takes the same time whatever the presented length."""
    return hashlib.sha256(token.encode("utf-8") if isinstance(token, str) else token).digest()


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The first value of `key` in the call's metadata (bytes values decoded), or None."""
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


@dataclass(frozen=True, slots=True)
class RepositoryControl:
    """The policy for Load/Unload: `enabled` at all, and the admin token's digest if one is set."""

    enabled: bool = False
    admin_digest: bytes | None = None

    @classmethod
    def from_config(cls, config: ServeConfig) -> RepositoryControl:
        """The policy `config` asks for (reads admin_token_file once, at server start)."""
        admin = config.admin_secret()
        return cls(config.repository_control, digest(admin) if admin is not None else None)

    def model_to_change(self, rpc: str, request: Any, context: grpc.aio.ServicerContext) -> str:
        """The Load/Unload request's model name, once this call may run `rpc` (see `check`) and
        the name is not empty (InvalidInputError)."""
        self.check(rpc, context)
        if not request.model_name:
            raise InvalidInputError("model_name is empty")
        return request.model_name

    def check(self, rpc: str, context: grpc.aio.ServicerContext) -> None:
        """Raise UnimplementedError / PermissionDeniedError unless this call may run `rpc`."""
        if not self.enabled:
            raise UnimplementedError(f"{rpc} is disabled on this server (repository_control is off)")
        if self.admin_digest is None:
            return
        presented = metadata_value(context, ADMIN_HEADER)
        if presented is None or not hmac.compare_digest(digest(presented.strip()), self.admin_digest):
            raise PermissionDeniedError(f"{rpc} needs the admin token (metadata '{ADMIN_HEADER}')")
