"""`load_backend`: pick the implementation an artefact needs and prove it matches its manifest."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from serving.contract.manifest import Artefact, Manifest, verify_artefacts
from serving.errors import ModelLoadError
from serving.runtime.backends.base import Backend, BackendOptions, TensorSpec

if TYPE_CHECKING:
    from serving.runtime.backends.null_backend import NullTiming

__all__ = ["backend_device", "expected_specs", "load_backend", "spec_mismatches"]


def load_backend(
    manifest: Manifest,
    artefact: Artefact,
    *,
    version_dir: str | os.PathLike[str],
    device: str | None = None,
    options: BackendOptions | None = None,
    verify: bool = False,
    null_timing: NullTiming | None = None,
) -> Backend:
    """Load `artefact` (a file of `version_dir`) with the backend its format needs.

    `device` ("cpu", "cuda:N") overrides `options.device`. `verify=True` re-checks the file's size
    and sha256 first (the repository normally does that once before calling here). The loaded
    tensor specs must match the manifest (names, datatypes incl. the artefact's io_datatypes
    overrides, non-batch dims) or the backend is closed and ModelLoadError names the mismatch.
    `null_timing` (`backend: null`, see `null_timing(config)`) replaces the compute with the timing
    backend: the artefact is still checked, only never run.
    """
    options = options or BackendOptions()
    if device is not None:
        options = dataclasses.replace(options, device=device)
    if verify:
        verify_artefacts(manifest, version_dir, only=[artefact.path])
    path = Path(version_dir) / artefact.path
    if not path.is_file():
        raise ModelLoadError(f"artefact file not found: {path}")
    if null_timing is not None:
        from serving.runtime.backends.null_backend import NullBackend

        inputs, outputs = expected_specs(manifest, artefact)
        return NullBackend(
            inputs, outputs, max_batch_size=manifest.max_batch_size, timing=null_timing, options=options
        )
    backend = _construct(manifest, artefact, path, options)
    problems = spec_mismatches(expected_specs(manifest, artefact), backend)
    if problems:
        backend.close()
        raise ModelLoadError(f"{path} does not match kiln.json: " + "; ".join(problems))
    return backend


def _construct(manifest: Manifest, artefact: Artefact, path: Path, options: BackendOptions) -> Backend:
    if artefact.format == "onnx":
        from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            path, max_batch_size=manifest.max_batch_size, options=options, precision=artefact.precision
        )
    if artefact.format == "tensorrt_plan":
        from serving.runtime.backends.tensorrt_backend import TensorRTBackend

        assert artefact.tensorrt is not None  # the manifest guarantees it for plans
        return TensorRTBackend(
            path, max_batch_size=manifest.max_batch_size, recorded=artefact.tensorrt, options=options
        )
    raise ModelLoadError(f"no backend for artefact format {artefact.format!r}")


def expected_specs(
    manifest: Manifest, artefact: Artefact
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The input/output specs kiln.json promises for `artefact` (its datatype overrides applied)."""
    spec = manifest.input
    inputs = (TensorSpec(spec.name, manifest.datatype_of(artefact, spec.name), tuple(spec.shape)),)
    outputs = tuple(
        TensorSpec(o.name, manifest.datatype_of(artefact, o.name), tuple(o.shape)) for o in manifest.outputs
    )
    return inputs, outputs


def spec_mismatches(
    expected: tuple[Sequence[TensorSpec], Sequence[TensorSpec]], backend: Backend
) -> list[str]:
    """Human-readable differences between the manifest's specs and what the backend loaded."""
    problems: list[str] = []
    for kind, want, have in (
        ("input", expected[0], backend.inputs),
        ("output", expected[1], backend.outputs),
    ):
        have_by_name = {s.name: s for s in have}
        want_names = {s.name for s in want}
        if set(have_by_name) != want_names:
            problems.append(f"{kind} names {sorted(have_by_name)} != {sorted(want_names)}")
            continue
        for spec in want:
            got = have_by_name[spec.name]
            if got.datatype != spec.datatype:
                problems.append(f"{kind} {spec.name!r} datatype {got.datatype} != {spec.datatype}")
            if len(got.shape) != len(spec.shape) or any(
                g not in (-1, w) for g, w in zip(got.shape[1:], spec.shape[1:], strict=False)
            ):
                problems.append(f"{kind} {spec.name!r} shape {list(got.shape)} != {list(spec.shape)}")
    return problems


def backend_device(device: str) -> str:
    """ServeConfig's device to the backends' spelling ("auto" picks CUDA when ORT has it)."""
    if device != "auto":
        return device
    try:
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    except ImportError:
        return "cpu"
