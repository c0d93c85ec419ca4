"""The standard gRPC services: grpc.health.v1 (overall and per model) and server reflection.

Health: "" is the whole server; "inference.GRPCInferenceService" and "kiln.classify.v1.Classifier"
follow it; each model name is SERVING only while at least one of its versions is ready (Kubernetes
gRPC probes can target a model). Triton derives health from overall readiness only.

Reflection serves descriptors from protos._pool.POOL (where Kiln's generated code registers,
see protos/_pool.py), so the health and reflection protos are copied there too; grpcurl can then
list and describe every service.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from protos._pool import POOL
from protos.inference import grpc_service_pb2
from protos.kiln.classify.v1 import classify_pb2
from serving.grpc.status_map import add_mapped_service

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CLASSIFY_SERVICE = classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Owns the aio HealthServicer; the server and the model manager report through it."""

    def __init__(self) -> None:
        self.servicer = grpc_health.aio.HealthServicer()  # starts with "" SERVING: set_server fixes that
        self._models: set[str] = set()
        self._server_serving = False

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register grpc.health.v1.Health on `server` (unparsable requests: INVALID_ARGUMENT)."""
        add_mapped_service(health_pb2_grpc.add_HealthServicer_to_server, self.servicer, server)

    async def set_server(self, serving: bool) -> None:
        """Overall status ("" and the two Kiln services)."""
        self._server_serving = serving
        status = SERVING if serving else NOT_SERVING
        for name in ("", INFERENCE_SERVICE, CLASSIFY_SERVICE):
            await self.servicer.set(name, status)

    async def set_model(self, model: str, ready: bool) -> None:
        """Per-model status (a model is SERVING only while the server is too)."""
        self._models.add(model)
        await self.servicer.set(model, SERVING if ready and self._server_serving else NOT_SERVING)

    async def shutting_down(self) -> None:
        """Every name NOT_SERVING, and no later change (grpc's graceful-shutdown latch)."""
        self._server_serving = False
        await self.servicer.enter_graceful_shutdown()


def enable_reflection(server: grpc.aio.Server) -> tuple[str, ...]:
    """Register server reflection for every service Kiln serves; returns the listed names."""
    for module in (health_pb2, reflection_pb2):
        POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)  # identical re-adds are no-ops
    names = (INFERENCE_SERVICE, CLASSIFY_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
    # what reflection.enable_server_reflection does for an aio server, registered error-mapped
    servicer = reflection.aio.ReflectionServicer(names, pool=POOL)
    add_mapped_service(reflection_pb2_grpc.add_ServerReflectionServicer_to_server, servicer, server)
    return names
