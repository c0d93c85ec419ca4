"""ModelMetadata and ModelConfig replies built from a live model version.

Both describe the version the server runs: the artefact it loaded (whose tensors the loader
checked against kiln.json), the effective batch limit and the batcher settings. ModelConfig is
built by serving/contract/triton_config.py, the function that writes config.pbtxt, so the two
cannot drift. perf_analyzer needs metadata and config to agree: it reads input/output names
from both, `max_batch_size`, the presence of `dynamic_batching`,
`model_transaction_policy.decoupled` and `response_cache.enable`; with max_batch_size > 0 it
drops the first metadata dimension, so metadata shapes carry -1 there and config dims leave the
batch dimension out (Triton's convention).
"""

from __future__ import annotations

from collections.abc import Sequence

from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc
from serving.contract.triton_config import PLATFORMS, ServingSettings
from serving.contract.triton_config import model_config as build_model_config
from serving.grpc.config import ServeConfig
from serving.grpc.model_version import LoadedVersion


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
    """ModelConfig for `loaded` with the effective serving settings.

    Built by the same function as the repository's config.pbtxt, so for the artefact that file
    names and the default settings, the two are equal (tests/integration/test_model_config_agrees.py).
    """
    settings = ServingSettings(
        max_batch_size=loaded.batcher.max_batch_size,  # the effective limit, not only the manifest's
        max_queue_delay_us=config.max_queue_delay_us,
        preferred_batch_sizes=config.preferred_batch_sizes,
        max_queue_size=config.max_queue_size,
        instances=loaded.backend.instances,  # the effective count (precision auto may measure it)
        device=config.device,
        version_policy=config.policy,
    )
    result = build_model_config(loaded.manifest, loaded.artefact, settings)
    tuning = loaded.handle.tuning
    if tuning is not None:  # why this artefact: precision auto's measurement on this machine
        result.parameters["kiln_precision_choice"].string_value = tuning.reason
        result.parameters["kiln_precision_machine"].string_value = (
            f"{tuning.machine.cpu}; {' '.join(tuning.machine.flags)}; {tuning.machine.cores} cores; "
            f"onnxruntime {tuning.machine.onnxruntime}"
        )
    return result
