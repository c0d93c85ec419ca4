"""The backend holder of a scoring job: a verified artefact, its preprocessing and its class maths.

Everything numeric goes through the same code as the online path (serving.contract.repository verifies the
sha256, serving.runtime.backends runs the artefact, serving.runtime.preprocess turns bytes into rows,
serving.runtime.topk turns outputs into top-k), so `kiln score` and Classify agree on every image.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np

from serving.contract.manifest import Artefact, Manifest
from serving.contract.repository import ModelRepository, ResolvedVersion
from serving.contract.version_policy import VersionPolicy
from serving.errors import KilnError
from serving.runtime.backends import Backend, BackendOptions, load_backend, numpy_dtype
from serving.runtime.preprocess import ImageLimits, Preprocessor
from serving.runtime.topk import class_scores, classification_output, top_k

__all__ = ["ModelIdentity", "RowLoader", "Scored", "ScoringModel", "choose_artefact", "resolve_model"]


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """Which model produced a result: written into every output row and into the job ledger."""

    model: str
    version: int
    artefact: str  # file name inside the version folder, e.g. "model.onnx"
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Scored:
    """Results of one batch of decoded rows: top-k per row and, when asked for, the raw output."""

    indices: np.ndarray  # int64 [n, k]
    scores: np.ndarray  # float64 [n, k]
    outputs: np.ndarray | None  # float32 [n, classes] (the classification output as produced)


def choose_artefact(manifest: Manifest, wanted: str | None) -> Artefact:
    """`wanted` (a file name) or the FP32 ONNX artefact, which runs on every device."""
    if wanted is not None:
        if wanted not in {a.path for a in manifest.artefacts}:
            have = [a.path for a in manifest.artefacts]
            raise ValueError(
                f"model {manifest.name!r} v{manifest.version} has no artefact {wanted!r}; have {have}"
            )
        return manifest.artefact(wanted)
    art = manifest.find_artefact("onnx", "fp32") or next(
        (a for a in manifest.artefacts if a.format == "onnx"), None
    )
    if art is None:
        have = [a.path for a in manifest.artefacts]
        raise ValueError(f"model {manifest.name!r} v{manifest.version} has no ONNX artefact (have {have})")
    return art


def resolve_model(
    repo: str | os.PathLike[str], model: str, version: int | None, artefact: str | None = None
) -> tuple[ResolvedVersion, Artefact]:
    """Find the version (latest when None), pick the artefact and verify its sha256."""
    repository = ModelRepository(repo)
    every = VersionPolicy.all()  # an explicit version need not be among the "latest" ones
    first = repository.resolve(model, version, policy=every, artefacts=())
    chosen = choose_artefact(first.manifest, artefact)
    resolved = repository.resolve(model, first.version, policy=every, artefacts=[chosen.path])
    return resolved, resolved.manifest.artefact(chosen.path)


class RowLoader:
    """Files -> preprocessed rows, where a bad file is a message, never an exception."""

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.preprocessor = preprocessor

    @classmethod
    def for_artefact(
        cls, manifest: Manifest, artefact: Artefact, limits: ImageLimits | None = None
    ) -> RowLoader:
        """The loader an artefact needs, without loading the artefact (its input dtype from kiln.json)."""
        dtype = numpy_dtype(manifest.datatype_of(artefact, manifest.input.name))
        return cls(Preprocessor(manifest.input, limits=limits, dtype=dtype))

    def load(self, path: str, out: np.ndarray) -> str | None:
        """Read and preprocess one file into `out`; the error text when it cannot be used.

        Unreadable, too large, not a regular file, undecodable or the wrong geometry all come
        back as a message: the job must not die for one file.
        """
        try:
            self.preprocessor.preprocess(self._read(path), out)
        except KilnError as exc:
            return exc.message
        except (OSError, ValueError) as exc:
            return str(exc)
        except Exception as exc:  # any per-file failure is that row's error, never the job's
            return f"{type(exc).__name__}: {exc}"
        return None

    def _read(self, path: str) -> bytes:
        limit = self.preprocessor.limits.max_bytes
        try:
            # O_NONBLOCK: opening a FIFO must not hang the job; it is refused below instead.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise OSError(f"cannot read file: {exc.strerror or exc}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            if info.st_size > limit:
                raise ValueError(f"file is {info.st_size} bytes, the limit is {limit}")
            chunks, size = [], 0
            # Read what fstat promised plus one byte (to notice a file still growing past the limit).
            while size <= limit and (chunk := os.read(fd, max(info.st_size + 1 - size, 1 << 16))):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise OSError(f"cannot read file: {exc.strerror or exc}") from None
        finally:
            os.close(fd)


class ScoringModel:
    """A loaded artefact that scores batches of preprocessed rows (see module docstring)."""

    def __init__(
        self,
        resolved: ResolvedVersion,
        artefact: Artefact,
        *,
        top_k: int,
        options: BackendOptions | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        manifest = resolved.manifest
        self.identity = ModelIdentity(
            model=manifest.name, version=manifest.version, artefact=artefact.path, sha256=artefact.sha256
        )
        self.labels = manifest.labels
        self.top_k = min(top_k, len(manifest.labels))
        self.max_batch_size = manifest.max_batch_size
        self._output = classification_output(manifest)
        self._input_name = manifest.input.name
        self.backend: Backend = load_backend(
            manifest, artefact, version_dir=resolved.path, options=options or BackendOptions()
        )
        try:
            self.loader = RowLoader(
                Preprocessor(manifest.input, limits=limits, dtype=self.backend.inputs[0].dtype)
            )
        except ValueError:
            self.backend.close()
            raise

    @classmethod
    def open(
        cls,
        repo: str | os.PathLike[str],
        model: str,
        version: int | None,
        *,
        top_k: int,
        artefact: str | None = None,
        options: BackendOptions | None = None,
    ) -> ScoringModel:
        """Resolve, verify and load in one call."""
        resolved, art = resolve_model(repo, model, version, artefact)
        return cls(resolved, art, top_k=top_k, options=options)

    @property
    def preprocessor(self) -> Preprocessor:
        """The preprocessing this artefact needs."""
        return self.loader.preprocessor

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed row."""
        return self.loader.preprocessor.sample_shape

    @property
    def dtype(self) -> np.dtype:
        """dtype of the preprocessed rows (the backend's input dtype)."""
        return self.loader.preprocessor.dtype

    def load_row(self, path: str, out: np.ndarray) -> str | None:
        """Read and preprocess one file into `out` (see RowLoader.load)."""
        return self.loader.load(path, out)

    def score(self, rows: np.ndarray) -> Scored:
        """Run the backend on [n, *sample_shape] rows (n <= max_batch_size) and take the top-k."""
        outputs = self.backend.infer({self._input_name: rows})[self._output.name]
        outputs = outputs.reshape(len(rows), -1)
        indices, scores = top_k(class_scores(outputs, self._output.kind), self.top_k)
        return Scored(indices=indices, scores=scores, outputs=outputs.astype(np.float32, copy=False))

    def warm_up(self, rows: int) -> None:
        """One batch of zeros through the backend: first-call costs (allocations, kernel choice)
        are paid before the job's clock and progress bar start, as the server does on load."""
        self.backend.infer({self._input_name: np.zeros((rows, *self.sample_shape), self.dtype)})

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()
