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

from typing import Any, ClassVar

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
    """Base of every serving error; `code` names the grpc.StatusCode member it maps to.

    A subclass names its code in its class line, `class QueueFullError(KilnError,
    code="RESOURCE_EXHAUSTED")`, or inherits its base's.
    """

    code: ClassVar[str] = "UNKNOWN"

    def __init_subclass__(cls, *, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code

    @property
    def message(self) -> str:
        """The client-facing message (the first argument)."""
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidInputError(KilnError, code="INVALID_ARGUMENT"):
    """The request is malformed: wrong tensor name, datatype, shape, byte count, undecodable image."""


class PayloadTooLargeError(KilnError, code="RESOURCE_EXHAUSTED"):
    """Too many bytes or decoded pixels (RESOURCE_EXHAUSTED, like gRPC's own size limit)."""


class ModelNotFoundError(KilnError, code="NOT_FOUND"):
    """No such model, or no such version of it, in the repository."""


class ModelUnavailableError(KilnError, code="UNAVAILABLE"):
    """The model exists but cannot serve now (loading, unloading, failed to load, shutting down)."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # short machine-friendly state, e.g. "loading", "failed", "stopped"


class QueueFullError(KilnError, code="RESOURCE_EXHAUSTED"):
    """The model's batching queue is full: shed load now rather than queue without bound."""


class DeadlineExceededError(KilnError, code="DEADLINE_EXCEEDED"):
    """The request's deadline passed before it could be computed; it never reached the backend."""


class RequestCancelledError(KilnError, code="CANCELLED"):
    """The client cancelled the request."""


class BackendError(KilnError, code="INTERNAL"):
    """The backend failed while computing a batch; every request of that batch gets this."""


class FailedPreconditionError(KilnError, code="FAILED_PRECONDITION"):
    """The system is not in the state the operation needs (e.g. an engine built for another GPU)."""


class ModelLoadError(FailedPreconditionError):
    """An artefact could not be loaded; the message is the reason the model is UNAVAILABLE."""


class UnauthenticatedError(KilnError, code="UNAUTHENTICATED"):
    """Missing or wrong bearer token / client certificate."""


class PermissionDeniedError(KilnError, code="PERMISSION_DENIED"):
    """The caller is known but may not do this (e.g. Load/Unload without the admin token)."""


class UnimplementedError(KilnError, code="UNIMPLEMENTED"):
    """The RPC exists in the protocol but this server does not offer it (or has it switched off)."""
