"""ModelMetadata and ModelConfig replies built from a live model version.

Both describe what the server actually runs (the loaded backend's tensors, the effective batch
limit and batcher settings), not only what the repository's config.pbtxt says. perf_analyzer
needs the two to agree: it reads input/output names from both, `max_batch_size`, the presence of
`dynamic_batching`, `model_transaction_policy.decoupled` and `response_cache.enable`; with
max_batch_size > 0 it drops the first metadata dimension, so metadata shapes carry -1 there and
config dims leave the batch dimension out (Triton's convention).
"""

from __future__ import annotations

from collections.abc import Sequence

from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc
from serving.contract.triton_config import LABELS_FILENAME
from serving.grpc.config import ServeConfig
from serving.grpc.model_version import LoadedVersion

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt_plan": "tensorrt_plan"}
BACKENDS = {"onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
_LAYOUTS = {"NCHW": mc.ModelInput.FORMAT_NCHW, "NHWC": mc.ModelInput.FORMAT_NHWC}


def config_datatype(datatype: str) -> int:
    """KServe datatype name -> model_config DataType enum ("BYTES" is TYPE_STRING)."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def model_metadata(loaded: LoadedVersion, versions: Sequence[int]) -> pb.ModelMetadataResponse:
    """ModelMetadata for `loaded`; `versions` are the model's ready versions."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=loaded.model,
        versions=[str(v) for v in versions],
        platform=PLATFORMS.get(loaded.artefact.format, loaded.artefact.format),
        inputs=[
            tensor(name=s.name, datatype=s.datatype, shape=[-1, *s.shape[1:]]) for s in loaded.backend.inputs
        ],
        outputs=[
            tensor(name=s.name, datatype=s.datatype, shape=[-1, *s.shape[1:]]) for s in loaded.backend.outputs
        ],
    )


def model_config(loaded: LoadedVersion, config: ServeConfig) -> mc.ModelConfig:
    """ModelConfig for `loaded` with the effective serving settings."""
    manifest = loaded.manifest
    result = mc.ModelConfig(
        name=loaded.model,
        platform=PLATFORMS.get(loaded.artefact.format, loaded.artefact.format),
        backend=BACKENDS.get(loaded.artefact.format, ""),
        max_batch_size=loaded.batcher.max_batch_size,
        default_model_filename=loaded.artefact.path,
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
        response_cache=mc.ModelResponseCache(enable=False),
    )
    _set_version_policy(result, config.version_policy)
    layout = _LAYOUTS.get(manifest.input.layout, mc.ModelInput.FORMAT_NONE)
    for spec in loaded.backend.inputs:
        result.input.add(
            name=spec.name, data_type=config_datatype(spec.datatype), format=layout, dims=spec.shape[1:]
        )
    kinds = {o.name: o.kind for o in manifest.outputs}
    for spec in loaded.backend.outputs:
        labelled = kinds.get(spec.name, "other") != "other"
        result.output.add(
            name=spec.name,
            data_type=config_datatype(spec.datatype),
            dims=spec.shape[1:],
            label_filename=LABELS_FILENAME if labelled else "",
        )
    batching = result.dynamic_batching
    batching.max_queue_delay_microseconds = config.max_queue_delay_us
    batching.preferred_batch_size.extend(
        b for b in config.preferred_batch_sizes if b <= result.max_batch_size
    )
    batching.default_queue_policy.max_queue_size = config.max_queue_size
    kind = (
        mc.ModelInstanceGroup.KIND_GPU if config.device.startswith("cuda") else mc.ModelInstanceGroup.KIND_CPU
    )
    result.instance_group.add(name=f"{loaded.model}_0", kind=kind, count=config.instances)
    result.parameters["kiln_artefact_precision"].string_value = loaded.artefact.precision
    result.parameters["kiln_artefact_sha256"].string_value = loaded.artefact.sha256
    return result


def _set_version_policy(result: mc.ModelConfig, policy: str) -> None:
    kind, _, arg = policy.partition(":")
    if kind == "latest":
        result.version_policy.latest.num_versions = int(arg or 1)
    elif kind == "all":
        result.version_policy.all.SetInParent()
    else:
        result.version_policy.specific.versions.extend(int(v) for v in arg.split(","))
