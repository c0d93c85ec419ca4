"""The backend holder of a scoring job: a model handle, its preprocessing and its class maths.

Everything numeric goes through the same code as the online path: the model handle
(serving.runtime.model_handle) resolves the version, chooses the artefact by the server's rule,
verifies its sha256, loads and warms it up, and its classification head turns outputs into top-k;
serving.runtime.preprocess turns bytes into rows. So `kiln score` and Classify agree on every image.
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
from serving.runtime.backends import FULL_BATCHES, Backend, BackendOptions, backend_device, numpy_dtype
from serving.runtime.model_handle import ArtefactChoice, ModelHandle, choose, resolve
from serving.runtime.preprocess import ImageLimits, Preprocessor

__all__ = ["ModelIdentity", "RowLoader", "Scored", "ScoringModel", "resolve_model"]


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


def resolve_model(
    repo: str | os.PathLike[str], model: str, version: int | None, choice: ArtefactChoice
) -> tuple[ResolvedVersion, Artefact]:
    """Find the version (latest when None), choose the artefact by the server's rule (or as named
    in `choice.artefact`) and verify its sha256: the handle's first steps, without loading."""
    # Every version: an explicit version need not be among the "latest" ones.
    resolved = resolve(ModelRepository(repo), model, version, policy=VersionPolicy.all())
    on_cpu = backend_device(choice.device) == "cpu"
    verified, artefact, _ = choose(resolved, choice, on_cpu=on_cpu)  # auto: the server's measurement
    return verified, artefact


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
    """A model handle that scores batches of preprocessed rows (see module docstring)."""

    def __init__(self, handle: ModelHandle, *, top_k: int, limits: ImageLimits | None = None) -> None:
        """Take ownership of `handle` (closed here if this fails, else by `close`)."""
        try:
            if top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}")
            self.handle, self.head = handle, handle.head
            manifest, artefact = handle.manifest, handle.artefact
            self.identity = ModelIdentity(
                model=manifest.name, version=manifest.version, artefact=artefact.path, sha256=artefact.sha256
            )
            self.labels = manifest.labels
            self.top_k = min(top_k, len(manifest.labels))
            self.max_batch_size = manifest.max_batch_size
            self._input_name = manifest.input.name
            dtype = handle.backend.inputs[0].dtype
            self.loader = RowLoader(Preprocessor(manifest.input, limits=limits, dtype=dtype))
        except BaseException:
            handle.close()
            raise

    @classmethod
    def open(
        cls,
        repo: str | os.PathLike[str],
        model: str,
        version: int | None,
        *,
        top_k: int,
        choice: ArtefactChoice | None = None,
        options: BackendOptions | None = None,
    ) -> ScoringModel:
        """Resolve, choose (by default as `kiln serve` does on a CPU), verify and load in one call."""
        resolved, artefact = resolve_model(repo, model, version, choice or ArtefactChoice())
        options = options or BackendOptions(**FULL_BATCHES)
        handle = ModelHandle.load(resolved, artefact, options=options)
        return cls(handle, top_k=top_k)

    @property
    def backend(self) -> Backend:
        """The loaded backend."""
        return self.handle.backend

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
        outputs = self.backend.infer({self._input_name: rows})[self.head.output]
        outputs = outputs.reshape(len(rows), -1)
        indices, scores = self.head.top_k(self.head.scores(outputs), self.top_k)
        return Scored(indices=indices, scores=scores, outputs=outputs.astype(np.float32, copy=False))

    def warm_up(self, rows: int) -> None:
        """One batch of zeros through the handle: first-call costs (allocations, kernel choice)
        are paid before the job's clock and progress bar start, as the server does on load."""
        self.handle.warm_up([rows])

    def close(self) -> None:
        """Release the backend."""
        self.handle.close()
