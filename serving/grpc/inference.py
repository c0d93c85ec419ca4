"""`inference.GRPCInferenceService`: the KServe v2 servicer (with Triton's extensions).

Handlers stay thin: decode (serving.protocol.codec), route (ModelManager.get), submit to the model's
batcher with the call's deadline, encode. Errors are raised as serving.errors types and turned
into statuses by serving.grpc.status_map in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from serving.errors import InvalidInputError, KilnError, UnimplementedError
from serving.grpc.admin import RepositoryControl
from serving.grpc.admission import Admission
from serving.grpc.config import ServeConfig
from serving.grpc.metadata import model_config, model_metadata
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_manager import READY, ModelManager
from serving.grpc.model_version import LoadedVersion
from serving.grpc.request_log import REQUEST_ID
from serving.grpc.status_map import log_failure, status_of
from serving.grpc.streams import serve_stream
from serving.protocol.codec import decode_inputs, encode_outputs, param_value, requested_outputs

SERVER_NAME = "kiln"
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics", "binary_tensor_data")


def record_outcome(
    metrics: KilnMetrics | None,
    loaded: LoadedVersion | None,
    rows: int,
    start: float,
    exc: BaseException | None,
) -> None:
    """Count one finished request in the version's statistics and in Prometheus.

    Requests that never reached a model (bad name, undecodable) are labelled model="" so clients
    cannot grow the metric series with made-up names.
    """
    elapsed = time.perf_counter() - start
    if loaded is not None:
        loaded.stats.record_request(rows=rows, ok=exc is None, total_ns=int(elapsed * 1e9))
    if metrics is not None:
        if exc is None:
            code = "OK"
        elif isinstance(exc, asyncio.CancelledError):
            code = "CANCELLED"
        else:
            code = status_of(exc)[0].name
        model, version = (loaded.model, str(loaded.version)) if loaded is not None else ("", "")
        metrics.observe_request(model, version, code, elapsed)


def track_inflight(metrics: KilnMetrics | None, loaded: LoadedVersion) -> AbstractContextManager[None]:
    """`kiln_inflight_requests` of the version for the duration of the block (none without metrics)."""
    if metrics is None:
        return nullcontext()
    return metrics.track_inflight(loaded.model, str(loaded.version))


def deadline_of(
    context: grpc.aio.ServicerContext, request: pb.ModelInferRequest | None = None
) -> float | None:
    """The call's deadline as a time.monotonic() value (the earlier of gRPC's and a `timeout` parameter)."""
    remaining = context.time_remaining()
    if request is not None and "timeout" in request.parameters:
        timeout_us = param_value(request.parameters["timeout"])
        if isinstance(timeout_us, int) and not isinstance(timeout_us, bool) and timeout_us > 0:
            remaining = timeout_us / 1e6 if remaining is None else min(remaining, timeout_us / 1e6)
    return None if remaining is None else time.monotonic() + remaining


def _not_offered(rpc: str) -> Callable[..., Awaitable[Any]]:
    """A servicer method for an RPC of the protocol that Kiln does not offer: UNIMPLEMENTED."""

    async def method(self: Any, request: Any, context: Any) -> Any:
        raise UnimplementedError(f"{rpc} is not supported by Kiln")

    method.__name__ = method.__qualname__ = rpc
    return method


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 over the ModelManager; see the module docstring."""

    def __init__(
        self,
        manager: ModelManager,
        config: ServeConfig,
        *,
        server_version: str,
        is_ready: Callable[[], bool],
        metrics: KilnMetrics | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._manager, self._config = manager, config
        self._version, self._is_ready, self._metrics = server_version, is_ready, metrics
        self._admission = admission or Admission()
        self._control = RepositoryControl.from_config(config)

    # -- health and metadata -----------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self._is_ready() and self._manager.is_ready(request.name, request.version)
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        loaded = self._manager.get(request.name, request.version)
        ready = [lv.version for lv in self._manager.loaded() if lv.model == request.name]
        return model_metadata(loaded, sorted(ready))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        loaded = self._manager.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(loaded, self._config))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self._manager.get(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as for inference
        chosen = [
            lv
            for lv in self._manager.loaded()
            if (not request.name or lv.model == request.name)
            and (not request.version or str(lv.version) == request.version)
        ]
        chosen.sort(key=lambda lv: (lv.model, lv.version))
        return pb.ModelStatisticsResponse(model_stats=[lv.stats.to_proto() for lv in chosen])

    # -- inference ---------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        with self._admission.admit():
            return await self._infer(request, deadline_of(context, request), context.peer())

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, client: str
    ) -> pb.ModelInferResponse:
        start, loaded, rows = time.perf_counter(), None, 0
        REQUEST_ID.set(request.id)
        try:
            if not request.model_name:
                raise InvalidInputError("model_name is empty")
            inputs = decode_inputs(request)
            first = next(iter(inputs.values()))
            rows = first.shape[0] if first.ndim else 0
            # get() and submit() with no await in between: a hot swap cannot slip between them.
            loaded = self._manager.get(request.model_name, request.model_version)
            wanted = requested_outputs(request, [s.name for s in loaded.backend.outputs])
            with track_inflight(self._metrics, loaded):
                outputs = await loaded.batcher.submit(inputs, deadline=deadline, client=client)
            response = pb.ModelInferResponse(
                model_name=loaded.model, model_version=str(loaded.version), id=request.id
            )
            encode_outputs(response, outputs, wanted, loaded.labels)
        except BaseException as exc:
            record_outcome(self._metrics, loaded, rows, start, exc)
            raise
        record_outcome(self._metrics, loaded, rows, start, None)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (so they batch); answers come as they finish.

        A failed request yields `error_message` and the stream carries on, as Triton does. What
        the stream may cost (stream_max_inflight) and how it drains: serving.grpc.streams.
        """
        client = context.peer()

        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                response = await self._infer(request, deadline_of(context, request), client)
            except KilnError as exc:
                log_failure("/inference.GRPCInferenceService/ModelStreamInfer", exc, status_of(exc)[0])
                echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                return pb.ModelStreamInferResponse(error_message=str(exc), infer_response=echo)
            return pb.ModelStreamInferResponse(infer_response=response)

        async for item in serve_stream(request_iterator, one, self._config, self._admission, ordered=False):
            yield item

    # -- repository --------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        models = [
            entry(name=s.model, version=str(s.version) if s.version else "", state=s.state, reason=s.reason)
            for s in self._manager.index()
            if not request.ready or s.state == READY
        ]
        if not request.ready:  # models on disk never loaded (filtered by --models) are listed too
            known = {s.model for s in self._manager.index()}
            names = await asyncio.to_thread(self._manager.repository.model_names)
            models += [entry(name=n) for n in names if n not in known]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        model = self._control.model_to_change("RepositoryModelLoad", request, context)  # admin.py
        # parameter promote=true: a candidate (promotion: shadow) is promoted now, unshadowed
        promote = "promote" in request.parameters and request.parameters["promote"].bool_param
        await self._manager.load(model, promote=promote)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._manager.unload(self._control.model_to_change("RepositoryModelUnload", request, context))
        return pb.RepositoryModelUnloadResponse()

    # -- Triton extensions Kiln does not offer: methods of the class, answered through the error map

    SystemSharedMemoryStatus = _not_offered("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _not_offered("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _not_offered("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _not_offered("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _not_offered("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _not_offered("CudaSharedMemoryUnregister")
    TraceSetting = _not_offered("TraceSetting")
    LogSettings = _not_offered("LogSettings")


__all__ = ["EXTENSIONS", "InferenceServicer", "deadline_of", "record_outcome", "track_inflight"]
