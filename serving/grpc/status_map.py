"""The one place where serving errors become gRPC statuses.

Handlers raise domain errors (serving.errors.KilnError subclasses, each naming its status in
`code`); `wrap_handler` turns them into `context.abort(status, message)`. The server wraps each
service's handlers once, at registration (`add_mapped_service`), rather than through a server
interceptor: grpc.aio runs every interceptor as an extra coroutine on every call, a measurable
share of the server's per-request CPU (benchmarks/RESULTS-serving.md). Anything else is a
bug: it is logged with its traceback and the client gets INTERNAL with the request's id, never
the exception text (which may leak paths or data).

A request message that does not parse (random bytes, invalid UTF-8 in a string field) is the
client's error too: the wrapped deserializer hands the handler a marker instead of raising, and
the handler answers INVALID_ARGUMENT. Left to grpc, a parse failure is UNKNOWN (unary) or an
unexpected exception logged with a traceback (streams).

The log is for the server's own faults: what a client can cause (a bad request, a Load of a
version that is broken on disk, a client killed while the server writes to it) is logged at most
once per cause, at WARNING and without a traceback, and counted in kiln_client_errors_total.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from serving.errors import InvalidInputError, KilnError
from serving.grpc.metrics import CLIENT_ERRORS

log = logging.getLogger("kiln.grpc")

# A KilnError with one of these codes is the server's own failure (a backend that raised): ERROR,
# with the traceback. Every other KilnError answers something the client asked or sent (a bad
# request, a model that is not ready, a Load the repository cannot satisfy): logged at debug only,
# since logging each one would let a misbehaving client flood the log, and counted.
_SERVER_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
_SAID_MAX = 1024  # causes remembered by warn_once; past it, new causes are counted but not logged
_said: set[tuple[str, ...]] = set()


# Messages travel in the grpc-message trailer, and clients refuse trailers over ~8 KiB; messages
# echo client-chosen values (a 20 kB model name), so they are clipped.
MAX_MESSAGE_CHARS = 1000


def clip_message(message: str) -> str:
    """`message`, cut to MAX_MESSAGE_CHARS characters (saying how long it was)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters, clipped)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The (status, client message) for an exception: a KilnError's own code, else INTERNAL."""
    if isinstance(exc, KilnError):
        try:
            return grpc.StatusCode[exc.code], clip_message(exc.message)
        except KeyError:
            return grpc.StatusCode.UNKNOWN, clip_message(exc.message)
    return grpc.StatusCode.INTERNAL, "internal server error"


def log_failure(method: str, exc: BaseException, code: grpc.StatusCode) -> None:
    """Log a failed RPC: bugs and backend failures loudly with the traceback, client errors quietly
    (debug) and counted in kiln_client_errors_total{reason=<the status, lower case>}."""
    if not isinstance(exc, KilnError):
        log.error("%s failed with an unexpected error", method, exc_info=exc)
    elif code in _SERVER_CODES:
        log.error("%s -> %s: %s", method, code.name, exc, exc_info=exc)
    else:
        CLIENT_ERRORS.add(code.name.lower())
        log.debug("%s -> %s: %s", method, code.name, exc)


def warn_once(key: tuple[str, ...], message: str, *args: object) -> None:
    """Log `message` at WARNING the first time this process sees `key` (a bounded cause)."""
    if key in _said or len(_said) >= _SAID_MAX:
        return
    _said.add(key)
    log.warning(message, *args)


_GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_WRITE_FAILED = "ExecuteBatchError raised in core by servicer method ["


class _WriteFailedFilter(logging.Filter):
    """grpc aio's own record of a write that failed, made a counted warning.

    When a client is killed while the server writes to it (a stream blocked by flow control, the
    last message of a call), the write can fail before grpc has noticed the peer closing; an
    answer larger than max_send_message_bytes fails its write too (the client gets
    RESOURCE_EXHAUSTED from grpc core). Either way grpc logs ExecuteBatchError at ERROR with a
    traceback, for every such call. The client caused it and nothing is wrong with the server:
    count it (reason "write_failed") and say it once per method. grpc's other records pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_WRITE_FAILED):
            return True
        method = message[len(_WRITE_FAILED) :].rstrip("]")
        CLIENT_ERRORS.add("write_failed")
        warn_once(
            ("write_failed", method),
            "%s: a write to the client failed: the client went away (killed, or its connection "
            "broke) while the server answered, or an answer exceeded max_send_message_bytes; "
            'counted in kiln_client_errors_total{reason="write_failed"}, said once per method',
            method,
        )
        return False


def install_log_filters() -> None:
    """Put _WriteFailedFilter on grpc's aio logger (idempotent; add_mapped_service calls it)."""
    logger = logging.getLogger(_GRPC_CORE_LOGGER)
    if not any(isinstance(f, _WriteFailedFilter) for f in logger.filters):
        logger.addFilter(_WriteFailedFilter())


class _Undecodable:
    """Stands for a request message that failed to parse (see the module docstring)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything a parser of hostile bytes may raise
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return safe


def _check_decoded(request: Any) -> Any:
    if type(request) is _Undecodable:
        raise InvalidInputError(f"the request message could not be parsed ({request.reason[:200]})")
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _check_decoded(request)


async def _abort(method: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    """The mapping point: every error a handler raises ends the call with its status."""
    if isinstance(exc, grpc.aio.AbortError):  # already a status (a handler aborted itself)
        raise exc
    code, message = status_of(exc)
    log_failure(method, exc, code)
    await context.abort(code, message)


def _wrap_unary(
    method: str, behavior: Callable[..., Awaitable[Any]], streaming: bool = False
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = _checked_stream(request) if streaming else _check_decoded(request)
            return await behavior(request, context)
        except Exception as exc:  # CancelledError is a BaseException: it passes through
            await _abort(method, exc, context)

    return handler


def _wrap_stream(
    method: str, behavior: Callable[..., AsyncIterator[Any]], streaming: bool = False
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            request = _checked_stream(request) if streaming else _check_decoded(request)
            async for item in behavior(request, context):
                yield item
        except Exception as exc:  # CancelledError is a BaseException: it passes through
            await _abort(method, exc, context)

    return handler


def wrap_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose async behaviour maps exceptions to statuses."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, factory in kinds:
        behavior = getattr(handler, attr)
        if behavior is None:
            continue
        if inspect.isasyncgenfunction(behavior):  # yields its responses
            wrapper = _wrap_stream
        elif inspect.iscoroutinefunction(behavior):  # returns its response, or writes them
            wrapper = _wrap_unary  # (grpc's aio Health.Watch streams with `await context.write`)
        else:
            return handler  # sync behaviours run in grpc's executor; leave them as they are
        return factory(
            wrapper(method, behavior, handler.request_streaming),
            request_deserializer=_safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    return handler


class _MappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers map exceptions (wrapped once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # not ours: junk paths never grow the cache
            cached = self._cache[method] = wrap_handler(method, handler)
        return cached


class _MappingRegistrar:
    """Stands in for the server while a generated `add_*Servicer_to_server` registers a service."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_MappedGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {name: wrap_handler(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)


def add_mapped_service(
    add_servicer: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server
) -> None:
    """Register `servicer` through its generated `add_servicer` with every handler error-mapped.

    The per-call cost is nil (the wrapping happens here, once), unlike a server interceptor's.
    grpc's logger gets the filter that turns a failed write (a vanished client) into a warning.
    """
    install_log_filters()
    add_servicer(servicer, _MappingRegistrar(server))
