"""N: the ceiling of any Python gRPC inference server on this machine.

A bare grpc.aio KServe-v2 server that answers ModelInfer with zeros and computes nothing: no
batcher, no model, no interceptors, no metrics. perf_analyzer (or tritonclient) pointed at it
measures the cost of gRPC + protobuf + asyncio alone; a real server that also runs the model is
bounded by L = 1 / (1/E + 1/N), where E is the model's in-process throughput.

    python benchmarks/null_server.py --port 8011 --input-shape 3,32,32 --classes 10
    perf_analyzer -i grpc -u 127.0.0.1:8011 -m null --concurrency-range 16

It answers just what perf_analyzer needs (ServerMetadata, ModelMetadata, ModelConfig, ModelInfer,
ServerLive/Ready, ModelReady); everything else is UNIMPLEMENTED.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc


class NullInference(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with a zero FP32 tensor of shape [batch, classes]."""

    def __init__(self, model: str, input_shape: tuple[int, ...], classes: int, max_batch: int) -> None:
        self.model, self.input_shape, self.classes, self.max_batch = model, input_shape, classes, max_batch
        self._zeros: dict[int, bytes] = {}  # batch size -> raw zeros, built once

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="null", version="0", extensions=[])

    async def ModelMetadata(self, request, context):
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model,
            versions=["1"],
            platform="null",
            inputs=[tensor(name="input", datatype="FP32", shape=[-1, *self.input_shape])],
            outputs=[tensor(name="logits", datatype="FP32", shape=[-1, self.classes])],
        )

    async def ModelConfig(self, request, context):
        config = mc.ModelConfig(name=self.model, platform="null", max_batch_size=self.max_batch)
        config.input.add(name="input", data_type=mc.TYPE_FP32, dims=list(self.input_shape))
        config.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[self.classes])
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):
        batch = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        raw = self._zeros.get(batch)
        if raw is None:
            raw = self._zeros[batch] = bytes(4 * batch * self.classes)
        response = pb.ModelInferResponse(model_name=self.model, model_version="1", id=request.id)
        response.outputs.add(name="logits", datatype="FP32", shape=[batch, self.classes])
        response.raw_output_contents.append(raw)
        return response


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGINT/SIGTERM."""
    shape = tuple(int(d) for d in args.input_shape.split(","))
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        NullInference(args.model, shape, args.classes, args.max_batch_size), server
    )
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"null server listening on {args.host}:{port} (model {args.model!r})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    """Parse flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--model", default="null")
    parser.add_argument("--input-shape", default="3,32,32", help="per-row input dims, e.g. 3,224,224")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=64)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
