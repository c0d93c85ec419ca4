"""`kiln.classify.v1.Classifier`: images (or, for a 1-D model, raw signals) in, top-k labels out.

Decode/resize/normalise runs in a thread pool (serving.runtime.preprocess), never on the event loop; the
rows then go through the model's batcher like any KServe request, so Classify and ModelInfer
traffic batch together. Scores are softmax probabilities (or the model's own, when its output
kind is "probabilities"). Timings: `preprocess_us` and `total_us` are exact; `compute_us` is the
backend time of the batch(es) that served this request (each counted once, never another
request's batch) and `queue_us` the rest of the batcher wait.

A signal model (kiln.json input kind "signal") answers FAILED_PRECONDITION to images and takes
`signals` instead: float32 [C, L] of exactly the model's shape, normalised in its graph, so its
"preprocessing" is a check and a copy. The count limit is the images' one; the shape is the
model's, so no other size limit is needed (the message size limit bounds the request).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from protos.kiln.classify.v1 import classify_pb2 as cpb
from protos.kiln.classify.v1 import classify_pb2_grpc as cpb_grpc
from serving.errors import (
    FailedPreconditionError,
    InvalidInputError,
    KilnError,
    ModelUnavailableError,
    PayloadTooLargeError,
)
from serving.grpc.admission import Admission
from serving.grpc.config import ServeConfig
from serving.grpc.inference import deadline_of, record_outcome, track_inflight
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_manager import ModelManager
from serving.grpc.model_version import LoadedVersion
from serving.grpc.request_log import REQUEST_ID
from serving.grpc.status_map import log_failure, status_of
from serving.grpc.streams import serve_stream
from serving.runtime.batcher import BatchTiming
from serving.runtime.preprocess import ImageLimits, Preprocessor
from serving.runtime.topk import ClassificationHead


def _results(head: ClassificationHead, scores: np.ndarray, k: int) -> list[cpb.ImageResult]:
    """One ImageResult per row: the head's k best classes, highest first."""
    indices, values = head.top_k(scores, k)
    return [
        cpb.ImageResult(
            predictions=[
                cpb.Prediction(label=head.labels[i], index=int(i), score=float(v))
                for i, v in zip(idx, vals, strict=True)
            ]
        )
        for idx, vals in zip(indices, values, strict=True)
    ]


def _image_input(index: int, image: cpb.Image) -> bytes | np.ndarray:
    which = image.WhichOneof("source")
    if which == "encoded":
        return image.encoded
    if which == "raw":
        raw = image.raw
        expected = raw.height * raw.width * raw.channels
        if raw.channels not in (1, 3, 4) or raw.height < 1 or raw.width < 1:
            raise InvalidInputError(
                f"image {index}: raw image needs height, width >= 1 and channels 1, 3 or 4, "
                f"got {raw.height}x{raw.width}x{raw.channels}"
            )
        if len(raw.data) != expected:
            raise InvalidInputError(
                f"image {index}: raw data is {len(raw.data)} bytes, expected {expected} "
                f"({raw.height}x{raw.width}x{raw.channels} uint8)"
            )
        return np.frombuffer(raw.data, dtype=np.uint8).reshape(raw.height, raw.width, raw.channels)
    raise InvalidInputError(f"image {index}: neither encoded bytes nor a raw image given")


def _signal_input(index: int, signal: cpb.Signal) -> np.ndarray:
    """A zero-copy float32 [C, L] view of one Signal (sizes checked; values in `_signal_rows`)."""
    shape = (signal.channels, signal.length)
    if min(shape) < 1:
        raise InvalidInputError(f"signal {index}: channels and length must be >= 1, got {shape}")
    expected = shape[0] * shape[1] * 4
    if len(signal.data) != expected:
        raise InvalidInputError(
            f"signal {index}: data is {len(signal.data)} bytes, expected {expected} "
            f"({shape[0]}x{shape[1]} float32)"
        )
    return np.frombuffer(signal.data, dtype="<f4").reshape(shape)


def _signal_rows(loaded: LoadedVersion, signals: list[np.ndarray]) -> np.ndarray:
    """Signals -> [N, C, L] rows in the backend's dtype (CPU work: runs in the thread pool)."""
    spec = loaded.manifest.input
    for i, signal in enumerate(signals):
        if signal.shape != (spec.channels, spec.length):
            raise InvalidInputError(
                f"signal {i} is {signal.shape[0]}x{signal.shape[1]} (channels x length), "
                f"model {loaded.model} takes {spec.channels}x{spec.length}"
            )
        if not np.isfinite(signal).all():  # NaN/inf would come back as NaN scores
            raise InvalidInputError(f"signal {i}: values must be finite (found NaN or infinity)")
    return np.stack(signals).astype(loaded.backend.inputs[0].dtype, copy=False)


class ClassifierServicer(cpb_grpc.ClassifierServicer):
    """Classify / ClassifyStream over the ModelManager; see the module docstring."""

    def __init__(
        self,
        manager: ModelManager,
        config: ServeConfig,
        *,
        metrics: KilnMetrics | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._manager, self._config, self._metrics = manager, config, metrics
        self._admission = admission or Admission()
        self._limits = ImageLimits(
            max_bytes=config.max_image_bytes,
            max_pixels=config.max_image_pixels,
            max_aspect_ratio=config.max_image_aspect_ratio,
        )
        self._pool = ThreadPoolExecutor(config.preprocess_workers, thread_name_prefix="kiln-preprocess")
        self._preprocessors: dict[LoadedVersion, Preprocessor] = {}

    def close(self) -> None:
        """Stop the preprocessing threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _preprocessor(self, loaded: LoadedVersion) -> Preprocessor:
        pre = self._preprocessors.get(loaded)
        if pre is None:
            live = set(self._manager.loaded())
            for stale in [lv for lv in self._preprocessors if lv not in live]:
                del self._preprocessors[stale]  # retired versions
            try:
                pre = Preprocessor(
                    loaded.manifest.input, limits=self._limits, dtype=loaded.backend.inputs[0].dtype
                )
            except ValueError as exc:
                raise InvalidInputError(f"model {loaded.model!r} does not take images: {exc}") from None
            self._preprocessors[loaded] = pre
        return pre

    async def Classify(self, request: cpb.ClassifyRequest, context: Any) -> cpb.ClassifyResponse:
        with self._admission.admit():
            return await self._classify(request, deadline_of(context), context.peer())

    async def _classify(
        self, request: cpb.ClassifyRequest, deadline: float | None, client: str
    ) -> cpb.ClassifyResponse:
        start, loaded = time.perf_counter(), None
        REQUEST_ID.set(request.request_id)
        try:
            if not request.model:
                raise InvalidInputError("model is empty")
            if request.images and request.signals:
                raise InvalidInputError("send images or signals in one request, not both")
            kind = "signals" if request.signals else "images"
            count = len(request.signals) + len(request.images)
            most = self._config.max_images_per_request  # larger jobs: ClassifyStream or `kiln score`
            if not 1 <= count <= most:
                raise InvalidInputError(f"send 1 to {most} {kind} per request, got {count}")
            if request.signals:
                inputs = [_signal_input(i, signal) for i, signal in enumerate(request.signals)]
            else:
                inputs = [_image_input(i, image) for i, image in enumerate(request.images)]
            loaded, rows = await self._preprocess(request, inputs)
            preprocess_s = time.perf_counter() - start
            head = loaded.handle.head  # InvalidInputError if the model has no classification output
            with track_inflight(self._metrics, loaded):
                scores, compute = await self._run(loaded, head, rows, deadline, client)
        except BaseException as exc:
            record_outcome(self._metrics, loaded, len(request.images) + len(request.signals), start, exc)
            raise
        record_outcome(self._metrics, loaded, len(inputs), start, None)
        total = time.perf_counter() - start
        compute = min(compute, total - preprocess_s)
        if self._metrics is not None:
            self._metrics.observe_preprocess(loaded.model, str(loaded.version), preprocess_s)
        return cpb.ClassifyResponse(
            model=loaded.model,
            version=str(loaded.version),
            results=_results(head, scores, request.top_k or self._config.default_top_k),
            timings=cpb.Timings(
                preprocess_us=int(preprocess_s * 1e6),
                compute_us=int(compute * 1e6),
                queue_us=max(0, int((total - preprocess_s - compute) * 1e6)),
                total_us=int(total * 1e6),
            ),
            request_id=request.request_id or uuid.uuid4().hex,
        )

    async def _preprocess(
        self, request: cpb.ClassifyRequest, inputs: list[bytes | np.ndarray]
    ) -> tuple[LoadedVersion, np.ndarray]:
        """Rows for the version that will serve; redone if a hot swap changed the input spec."""
        signals = bool(request.signals)
        loaded = self._manager.get(request.model, request.version)
        rows = await self._rows(loaded, inputs, signals)
        current = self._manager.get(request.model, request.version)
        if current is not loaded and current.manifest.input != loaded.manifest.input:
            rows = await self._rows(current, inputs, signals)
            current = self._manager.get(request.model, request.version)
        return current, rows

    async def _rows(
        self, loaded: LoadedVersion, inputs: list[bytes | np.ndarray], signals: bool
    ) -> np.ndarray:
        """Model input rows from images or signals, refusing the kind the model does not take."""
        spec = loaded.manifest.input
        if spec.kind == "signal" and not signals:
            raise FailedPreconditionError(
                f"model {loaded.model} takes a signal of length {spec.length}, not an image"
            )
        if spec.kind != "signal" and signals:
            raise FailedPreconditionError(f"model {loaded.model} takes images, not signals")
        if signals:  # rows no larger than the float32 signals the message carried
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, _signal_rows, loaded, inputs)
        pre = self._preprocessor(loaded)
        total, most = len(inputs) * pre.row_bytes, self._config.max_preprocessed_bytes
        if total > most:  # tiny images can make huge rows: refuse before allocating them
            raise PayloadTooLargeError(
                f"{len(inputs)} images make {total} bytes of model input ({pre.row_bytes} each), "
                f"the limit is max_preprocessed_bytes {most}: send fewer per request"
            )
        return await pre.preprocess_async(inputs, self._pool)

    async def _run(
        self,
        loaded: LoadedVersion,
        head: ClassificationHead,
        rows: np.ndarray,
        deadline: float | None,
        client: str,
    ) -> tuple[np.ndarray, float]:
        """Submit in chunks of max_batch_size (they batch together); class scores and the backend
        seconds of the batches that served them (a batch shared by two chunks counted once)."""
        name, step = loaded.manifest.input.name, loaded.batcher.max_batch_size
        chunks = [rows[i : i + step] for i in range(0, len(rows), step)]
        if len(chunks) == 1:  # submitted in this step: a hot swap cannot slip in (see ModelManager)
            results = [await loaded.batcher.submit_timed({name: chunks[0]}, deadline=deadline, client=client)]
        else:
            results = await asyncio.gather(
                *(self._submit(loaded, {name: c}, deadline, client) for c in chunks)
            )
        outputs = np.concatenate([out[head.output] for out, _ in results]).reshape(len(rows), -1)
        compute = sum(timing.compute_seconds for timing in {timing for _, timing in results})
        return head.scores(outputs), compute

    async def _submit(
        self, loaded: LoadedVersion, inputs: dict[str, np.ndarray], deadline: float | None, client: str
    ) -> tuple[dict[str, np.ndarray], BatchTiming]:
        """Submit from a task (a loop step after routing): follow a hot swap that retired `loaded`."""
        try:
            return await loaded.batcher.submit_timed(inputs, deadline=deadline, client=client)
        except ModelUnavailableError as exc:
            if exc.reason != "stopped":
                raise
            current = self._manager.get(loaded.model)
            if current is loaded or current.manifest.input != loaded.manifest.input:
                raise
            return await current.batcher.submit_timed(inputs, deadline=deadline, client=client)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[cpb.ClassifyRequest], context: Any
    ) -> AsyncIterator[cpb.ClassifyStreamResponse]:
        """Requests run concurrently (so they batch); answers come back in request order.

        What the stream may cost (stream_max_inflight) and how it drains: serving.grpc.streams.
        """
        client = context.peer()
        answers = serve_stream(
            request_iterator,
            lambda request: self._stream_one(request, deadline_of(context), client),
            self._config,
            self._admission,
            ordered=True,
        )
        async for item in answers:
            yield item

    async def _stream_one(
        self, request: cpb.ClassifyRequest, deadline: float | None, client: str
    ) -> cpb.ClassifyStreamResponse:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        request_id = request.request_id
        try:
            response = await self._classify(request, deadline, client)
        except KilnError as exc:
            code = status_of(exc)[0]
            log_failure("/kiln.classify.v1.Classifier/ClassifyStream", exc, code)
            error = cpb.Error(code=code.value[0], message=exc.message)
            return cpb.ClassifyStreamResponse(error=error, request_id=request_id)
        return cpb.ClassifyStreamResponse(response=response, request_id=request_id)
