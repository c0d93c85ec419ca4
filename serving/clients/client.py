"""A small synchronous Python client for a Kiln server: KServe v2 inference, Classify, health.

    with KilnClient("127.0.0.1:8001") as client:
        client.server_ready()
        logits = client.infer("resnet20", {"input": batch})["logits"]
        response = client.classify("resnet20", [Path("cat.jpg").read_bytes()], top_k=3)
        response = client.classify_signals("mnist1d-cnn", signals_ncl, top_k=3)  # 1-D models

Failures raise `grpc.RpcError` (inspect `.code()` / `.details()`). TLS: pass `ca_cert` (and
`client_cert` + `client_key` for mTLS); a bearer token is sent as `authorization: Bearer <token>`.

`connections=N` spreads inference calls round-robin over N HTTP/2 connections. A server with
`workers` > 1 shares its port with SO_REUSEPORT, which places *connections* on workers, so one
connection would use one worker however many threads call through it (docs/design.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from protos.kiln.classify.v1 import classify_pb2 as cpb
from protos.kiln.classify.v1 import classify_pb2_grpc as cpb_grpc
from serving.protocol.codec import DATATYPES, decode_bytes_elements, to_raw

ImageLike = bytes | np.ndarray | Path
MAX_CONNECTIONS = 64


class ClassifyOptions(TypedDict, total=False):
    """The keyword options of KilnClient.classify and classify_signals (all optional)."""

    top_k: int  # classes per item; 0 (the default) = the server's default_top_k
    version: str  # "" = the version the server routes to
    request_id: str  # echoed in the response; "" = the server makes one
    timeout: float | None  # seconds; None = the client's timeout


def image_message(image: ImageLike) -> cpb.Image:
    """A Classify image from encoded bytes, a file path, or a uint8 HxW / HxWxC array."""
    if isinstance(image, Path):
        return cpb.Image(encoded=image.read_bytes())
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"raw images must be uint8 HxW or HxWxC, got {image.dtype} {list(image.shape)}")
        hwc = image[:, :, None] if image.ndim == 2 else image
        raw = cpb.RawImage(height=hwc.shape[0], width=hwc.shape[1], channels=hwc.shape[2], data=hwc.tobytes())
        return cpb.Image(raw=raw)
    return cpb.Image(encoded=bytes(image))


def signal_message(signal: np.ndarray) -> cpb.Signal:
    """A Classify signal from a [L] or [C, L] array (sent as little-endian float32)."""
    array = np.asarray(signal)
    if array.ndim not in (1, 2) or array.dtype.kind not in "fiu":
        raise ValueError(f"signals must be numeric [L] or [C, L], got {array.dtype} {list(array.shape)}")
    cl = array.reshape(1, -1) if array.ndim == 1 else array
    data = np.ascontiguousarray(cl, dtype="<f4").tobytes()
    return cpb.Signal(channels=cl.shape[0], length=cl.shape[1], data=data)


def build_infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str = "",
    outputs: Sequence[str] = (),
    classification: int = 0,
    raw: bool = True,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw (default) or typed contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        datatype, data = to_raw(np.asarray(array))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            request.raw_input_contents.append(data)
        else:
            field = DATATYPES[datatype][1]
            if field is None:
                raise ValueError(f"{datatype} has no typed contents field; send it raw")
            getattr(tensor.contents, field).extend(np.asarray(array).reshape(-1).tolist())
    for name in outputs:
        out = request.outputs.add(name=name)
        if classification:
            out.parameters["classification"].int64_param = classification
    return request


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs of a ModelInferResponse as numpy arrays (raw or typed contents)."""
    result: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        dtype, field = DATATYPES[tensor.datatype]
        shape = tuple(tensor.shape)
        if i < len(response.raw_output_contents):
            data = response.raw_output_contents[i]
            if tensor.datatype == "BYTES":
                array = decode_bytes_elements(tensor.name, data, int(np.prod(shape))).reshape(shape)
            else:
                array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            array = np.asarray(list(getattr(tensor.contents, field or "")), dtype=dtype).reshape(shape)
        result[tensor.name] = array
    return result


class KilnClient:
    """Blocking client for one server; see the module docstring."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        ca_cert: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        connections: int = 1,
    ) -> None:
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be in [1, {MAX_CONNECTIONS}], got {connections}")
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # grpc shares one connection between channels with equal arguments (its global
            # subchannel pool); a local pool per channel gives each channel its own connection
            ("grpc.use_local_subchannel_pool", 1 if connections > 1 else 0),
        ]
        creds = None
        if ca_cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca_cert.read_bytes(),
                private_key=client_key.read_bytes() if client_key else None,
                certificate_chain=client_cert.read_bytes() if client_cert else None,
            )
        self._channels = [
            grpc.insecure_channel(address, options=options)
            if creds is None
            else grpc.secure_channel(address, creds, options=options)
            for _ in range(connections)
        ]
        self.channel = self._channels[0]  # metadata, health and control calls
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._spread = [
            (pb_grpc.GRPCInferenceServiceStub(c), cpb_grpc.ClassifierStub(c)) for c in self._channels
        ]
        self.inference, self.classifier = self._spread[0]  # the first connection's
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._turn = itertools.count()  # next() is atomic under the GIL: safe from many threads

    def __enter__(self) -> KilnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection."""
        for channel in self._channels:
            channel.close()

    def _stubs(self) -> tuple[pb_grpc.GRPCInferenceServiceStub, cpb_grpc.ClassifierStub]:
        """The next connection's stubs, round-robin: inference calls spread over `connections`."""
        return self._spread[next(self._turn) % len(self._spread)]

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        return method(request, timeout=timeout or self.timeout, metadata=self._metadata)

    # -- health and metadata ---------------------------------------------------------------------

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name of `service` ("" = the server, or a model name)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def server_live(self) -> bool:
        """ServerLive."""
        return self._call(self.inference.ServerLive, pb.ServerLiveRequest()).live

    def server_ready(self) -> bool:
        """ServerReady."""
        return self._call(self.inference.ServerReady, pb.ServerReadyRequest()).ready

    def model_ready(self, model: str, version: str = "") -> bool:
        """ModelReady."""
        return self._call(self.inference.ModelReady, pb.ModelReadyRequest(name=model, version=version)).ready

    def server_metadata(self) -> pb.ServerMetadataResponse:
        """ServerMetadata."""
        return self._call(self.inference.ServerMetadata, pb.ServerMetadataRequest())

    def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        """ModelMetadata."""
        return self._call(self.inference.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))

    def model_config(self, model: str, version: str = "") -> mc.ModelConfig:
        """ModelConfig."""
        request = pb.ModelConfigRequest(name=model, version=version)
        return self._call(self.inference.ModelConfig, request).config

    def statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        """ModelStatistics ("" = every model)."""
        return self._call(
            self.inference.ModelStatistics, pb.ModelStatisticsRequest(name=model, version=version)
        )

    def repository_index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        """RepositoryIndex."""
        return self._call(self.inference.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready_only))

    def load_model(self, model: str, timeout: float | None = None) -> None:
        """RepositoryModelLoad (load or reload)."""
        self._call(
            self.inference.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=model), timeout
        )

    def unload_model(self, model: str, timeout: float | None = None) -> None:
        """RepositoryModelUnload."""
        self._call(
            self.inference.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=model), timeout
        )

    # -- inference -------------------------------------------------------------------------------

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None, **options: Any
    ) -> dict[str, np.ndarray]:
        """ModelInfer; `options` go to build_infer_request (version, outputs, classification, raw, ...)."""
        request = build_infer_request(model, inputs, **options)
        return decode_outputs(self._call(self._stubs()[0].ModelInfer, request, timeout))

    def classify(
        self, model: str, images: Sequence[ImageLike], **options: Unpack[ClassifyOptions]
    ) -> cpb.ClassifyResponse:
        """Classify images (encoded bytes, paths or uint8 arrays); `options`: ClassifyOptions."""
        return self._classify(model, {"images": [image_message(i) for i in images]}, options)

    def classify_signals(
        self, model: str, signals: Sequence[np.ndarray] | np.ndarray, **options: Unpack[ClassifyOptions]
    ) -> cpb.ClassifyResponse:
        """Classify raw signals ([L] or [C, L] each, or one [N, C, L] array) with a 1-D model."""
        return self._classify(model, {"signals": [signal_message(s) for s in signals]}, options)

    def _classify(self, model: str, items: dict[str, Any], options: ClassifyOptions) -> cpb.ClassifyResponse:
        """One Classify call; `items` holds the request's `images` or its `signals`."""
        fields = {name: value for name, value in options.items() if name != "timeout"}
        request = cpb.ClassifyRequest(model=model, **fields, **items)
        return self._call(self._stubs()[1].Classify, request, options.get("timeout"))

    def classify_stream(
        self, requests: Iterable[cpb.ClassifyRequest], *, timeout: float | None = None
    ) -> Iterator[cpb.ClassifyStreamResponse]:
        """ClassifyStream: one response per request, in order."""
        classifier = self._stubs()[1]
        return classifier.ClassifyStream(iter(requests), timeout=timeout, metadata=self._metadata)
