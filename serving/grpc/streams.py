"""One bidirectional stream's requests, run concurrently within a bounded window.

Both streaming RPCs (KServe's ModelStreamInfer, Kiln's ClassifyStream) read requests from the
client, run each as its own task (so they batch with everyone else's), and write the answers
back: ModelStreamInfer in finishing order (as Triton does), ClassifyStream in request order.

What one stream may cost is bounded here, before anything is read:
- at most `window` requests are read and not yet answered. A slot is freed only once gRPC has
  taken the answer, so a client that stops reading stops the server reading (and computing) its
  requests as soon as HTTP/2 flow control holds the answers back;
- when the server drains (serving.grpc.admission), the stream stops reading, answers every request it
  has read, and then ends with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from serving.grpc.admission import Admission
from serving.grpc.config import ServeConfig

__all__ = ["BoundedStream", "serve_stream"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class BoundedStream(Generic[Req, Resp]):
    """Runs `handle(request)` for each request of a stream; see the module docstring.

    `handle` answers every request, failures included (as an error message in the response);
    an exception it raises ends the stream.
    """

    def __init__(
        self,
        requests: AsyncIterator[Req],
        handle: Callable[[Req], Awaitable[Resp]],
        *,
        window: int,
        admission: Admission,
        ordered: bool,
    ) -> None:
        self._requests, self._handle, self._admission = requests, handle, admission
        self._ordered = ordered
        self._window = asyncio.Semaphore(window)
        # Tasks in the order their answers go out (request order, or finishing order); None ends.
        self._answers: asyncio.Queue[asyncio.Task[Resp] | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Resp]] = set()
        self._drained = False

    async def run(self) -> AsyncIterator[Resp]:
        reading = asyncio.create_task(self._read())
        helpers = [
            asyncio.create_task(self._stop_reading_on_drain(reading)),
            asyncio.create_task(self._close_after(reading)),
        ]
        try:
            while (task := await self._answers.get()) is not None:
                yield await task
                self._window.release()
            if not reading.cancelled():
                await reading  # re-raise a broken request stream
            if self._drained:
                self._admission.check()  # ends the stream with UNAVAILABLE
        finally:
            for pending in (reading, *helpers, *self._tasks):
                pending.cancel()

    async def _read(self) -> None:
        while True:
            await self._window.acquire()
            request = await anext(self._requests, None)
            if request is None:
                return
            # No await between reading a request and owning its task: a drain never loses one.
            task = asyncio.create_task(self._handle(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if self._ordered:
                self._answers.put_nowait(task)
            else:
                task.add_done_callback(self._answers.put_nowait)

    async def _stop_reading_on_drain(self, reading: asyncio.Task[None]) -> None:
        await self._admission.wait_draining()
        self._drained = True
        reading.cancel()  # safe at any await of _read (see there)

    async def _close_after(self, reading: asyncio.Task[None]) -> None:
        """Once reading ended (client half-closed, broke, or drain): let every answer out, then end."""
        await asyncio.wait({reading})
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self._answers.put_nowait(None)


async def serve_stream(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    config: ServeConfig,
    admission: Admission,
    *,
    ordered: bool,
) -> AsyncIterator[Resp]:
    """A streaming RPC's answers, within the stream limits of `config` (stream_max_inflight); the
    whole stream holds one admission slot (see serving.grpc.admission)."""
    window = config.stream_max_inflight
    with admission.admit():
        stream = BoundedStream(requests, handle, window=window, admission=admission, ordered=ordered)
        async for item in stream.run():
            yield item
