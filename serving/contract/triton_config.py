"""A model's Triton ModelConfig: one builder for the written `config.pbtxt` and the ModelConfig RPC.

`model_config` builds `inference.ModelConfig` (the compiled model_config.proto, wire-compatible
with Triton's) for one artefact and the serving settings. Export writes it to
`<repo>/<model>/config.pbtxt` in protobuf text format (`render_config`, for the ONNX artefact
Triton can load), and the server's ModelConfig RPC (serving/grpc/metadata.py) answers with the
same function for the version it runs, so the file and the RPC agree by construction. The
settings default to what `kiln serve` does without any (serving/contract/serving_defaults.py).

IO dims leave the batch dimension out (Triton adds it when max_batch_size > 0). Kiln's own
source of truth stays kiln.json; the file makes the repository portable to Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format

from protos.inference import model_config_pb2 as mc
from serving.contract import serving_defaults
from serving.contract.manifest import Artefact, Manifest, OutputSpec
from serving.contract.version_policy import VersionPolicy

CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt_plan": "tensorrt_plan"}
BACKENDS = {"onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
_LAYOUTS = {"NCHW": mc.ModelInput.FORMAT_NCHW, "NHWC": mc.ModelInput.FORMAT_NHWC}


class TritonConfigError(ValueError):
    """A ModelConfig cannot be built for these values (names the bad value)."""


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    """The serving settings a ModelConfig states; each default is `kiln serve`'s."""

    max_batch_size: int | None = None  # None: the manifest's
    max_queue_delay_us: int = serving_defaults.MAX_QUEUE_DELAY_US
    # sizes above the batch limit are left out, as the server leaves them out of its batcher
    preferred_batch_sizes: tuple[int, ...] = serving_defaults.PREFERRED_BATCH_SIZES
    max_queue_size: int = serving_defaults.MAX_QUEUE_SIZE  # requests
    instances: int = serving_defaults.INSTANCES
    device: str = serving_defaults.DEVICE  # "cuda" or "cuda:N" -> KIND_GPU instances, else KIND_CPU
    version_policy: VersionPolicy = serving_defaults.VERSION_POLICY

    def __post_init__(self) -> None:
        low = {"instances": 1, "max_queue_size": 1, "max_queue_delay_us": 0}
        for name, minimum in low.items():
            if getattr(self, name) < minimum:
                raise TritonConfigError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise TritonConfigError(
                f"preferred batch sizes must be >= 1, got {list(self.preferred_batch_sizes)}"
            )


def model_config(manifest: Manifest, artefact: Artefact, settings: ServingSettings) -> mc.ModelConfig:
    """The ModelConfig of `manifest`'s `artefact` served with `settings`."""
    max_batch = manifest.max_batch_size if settings.max_batch_size is None else settings.max_batch_size
    if not 1 <= max_batch <= manifest.max_batch_size:
        raise TritonConfigError(f"max_batch_size must be in [1, {manifest.max_batch_size}], got {max_batch}")
    kind = (
        mc.ModelInstanceGroup.KIND_GPU
        if settings.device.startswith("cuda")
        else mc.ModelInstanceGroup.KIND_CPU
    )
    result = mc.ModelConfig(
        name=manifest.name,
        platform=PLATFORMS.get(artefact.format, artefact.format),
        backend=BACKENDS.get(artefact.format, ""),
        max_batch_size=max_batch,
        default_model_filename=artefact.path,
        version_policy=_version_policy(settings.version_policy),
        input=[_input(manifest, artefact)],
        output=[_output(manifest, artefact, spec) for spec in manifest.outputs],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=sorted({b for b in settings.preferred_batch_sizes if b <= max_batch}),
            max_queue_delay_microseconds=settings.max_queue_delay_us,
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=settings.max_queue_size),
        ),
        instance_group=[
            mc.ModelInstanceGroup(name=f"{manifest.name}_0", kind=kind, count=settings.instances)
        ],
        # present though default: perf_analyzer reads both to decide how to drive the model
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
        response_cache=mc.ModelResponseCache(enable=False),
    )
    result.parameters["kiln_artefact_precision"].string_value = artefact.precision
    result.parameters["kiln_artefact_sha256"].string_value = artefact.sha256
    return result


def render_config(
    manifest: Manifest, *, artefact: Artefact | None = None, settings: ServingSettings | None = None
) -> str:
    """config.pbtxt text for `manifest`'s ONNX artefact (default: the FP32 one, else any ONNX)."""
    onnx = [a for a in manifest.artefacts if a.format == "onnx"]
    art = artefact or manifest.find_artefact("onnx", "fp32") or (onnx[0] if onnx else None)
    if art is None or art.format != "onnx":
        raise TritonConfigError(
            f"config.pbtxt needs an ONNX artefact; {manifest.name} has "
            f"{[(a.path, a.format, a.precision) for a in manifest.artefacts]}"
        )
    return text_format.MessageToString(model_config(manifest, art, settings or ServingSettings()))


def render_labels(manifest: Manifest) -> str:
    """labels.txt: one class name per line, in output index order."""
    bad = [label for label in manifest.labels if "\n" in label or "\r" in label]
    if bad:
        raise TritonConfigError(f"labels cannot contain line breaks: {bad!r}")
    return "".join(f"{label}\n" for label in manifest.labels)


def config_datatype(datatype: str) -> int:
    """KServe datatype name -> model_config DataType enum ("BYTES" is TYPE_STRING in Triton)."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _input(manifest: Manifest, artefact: Artefact) -> mc.ModelInput:
    spec = manifest.input
    return mc.ModelInput(
        name=spec.name,
        data_type=config_datatype(manifest.datatype_of(artefact, spec.name)),
        format=_LAYOUTS.get(spec.layout, mc.ModelInput.FORMAT_NONE),
        dims=spec.shape[1:],
    )


def _output(manifest: Manifest, artefact: Artefact, spec: OutputSpec) -> mc.ModelOutput:
    return mc.ModelOutput(
        name=spec.name,
        data_type=config_datatype(manifest.datatype_of(artefact, spec.name)),
        dims=spec.shape[1:],
        # the classification extension reads class names for the outputs that score classes
        label_filename=LABELS_FILENAME if spec.kind != "other" else "",
    )


def _version_policy(policy: VersionPolicy) -> mc.ModelVersionPolicy:
    if policy.kind == "latest":
        return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=policy.num_versions))
    if policy.kind == "specific":
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=policy.versions))
    return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
