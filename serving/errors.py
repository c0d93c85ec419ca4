"""Domain errors of the serving stage, each naming the gRPC status it should become.

`code` is the *name* of a `grpc.StatusCode` member (a string), so this module and everything that
raises these errors stay free of grpc; the gRPC layer maps them in one place with
`grpc.StatusCode[exc.code]` (KServe's interceptor idea). Messages are written for the client: they
name the bad value and what was expected.

Choice for `PayloadTooLargeError`: RESOURCE_EXHAUSTED, the status gRPC itself returns when a
message exceeds the server's receive limit, so an oversized image and an oversized message look
the same to a client (neither is retriable as-is; the client must send less).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BackendError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidInputError",
    "KilnError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QueueFullError",
    "RequestCancelledError",
    "UnauthenticatedError",
    "UnimplementedError",
]


class KilnError(Exception):
    """Base of every serving error; `code` names the grpc.StatusCode member it maps to."""

    code: ClassVar[str] = "UNKNOWN"

    @property
    def message(self) -> str:
        """The client-facing message (the first argument)."""
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidInputError(KilnError):
    """The request is malformed: wrong tensor name, datatype, shape, byte count, undecodable image."""

    code = "INVALID_ARGUMENT"


class PayloadTooLargeError(KilnError):
    """Too many bytes or decoded pixels (RESOURCE_EXHAUSTED, like gRPC's own size limit)."""

    code = "RESOURCE_EXHAUSTED"


class ModelNotFoundError(KilnError):
    """No such model, or no such version of it, in the repository."""

    code = "NOT_FOUND"


class ModelUnavailableError(KilnError):
    """The model exists but cannot serve now (loading, unloading, failed to load, shutting down)."""

    code = "UNAVAILABLE"

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # short machine-friendly state, e.g. "loading", "failed", "stopped"


class QueueFullError(KilnError):
    """The model's batching queue is full: shed load now rather than queue without bound."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(KilnError):
    """The request's deadline passed before it could be computed; it never reached the backend."""

    code = "DEADLINE_EXCEEDED"


class RequestCancelledError(KilnError):
    """The client cancelled the request."""

    code = "CANCELLED"


class BackendError(KilnError):
    """The backend failed while computing a batch; every request of that batch gets this."""

    code = "INTERNAL"


class FailedPreconditionError(KilnError):
    """The system is not in the state the operation needs (e.g. an engine built for another GPU)."""

    code = "FAILED_PRECONDITION"


class ModelLoadError(FailedPreconditionError):
    """An artefact could not be loaded; the message is the reason the model is UNAVAILABLE."""


class UnauthenticatedError(KilnError):
    """Missing or wrong bearer token / client certificate."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(KilnError):
    """The caller is known but may not do this (e.g. Load/Unload without the admin token)."""

    code = "PERMISSION_DENIED"


class UnimplementedError(KilnError):
    """The RPC exists in the protocol but this server does not offer it (or has it switched off)."""

    code = "UNIMPLEMENTED"
