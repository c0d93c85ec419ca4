"""The Ray engine: the same job on Ray Data, for more than one machine (optional: `ray[data]`).

    from_arrow(rows of the pending shards)
      -> map_batches(_preprocess)                      tasks: read + decode + normalise
      -> map_batches(_Scorer, ActorPoolStrategy(size)) actors holding the backend (num_gpus=1 each
                                                       on GPU); each verifies the artefact's
                                                       sha256 on its own node before loading
      -> iter_batches (in input order) -> the driver's shard assembler -> Parquet shards + ledger

Results flow back to the driver, which commits shards through the same ledger and writer as the
local engine: the output schema and the exactly-once guarantee are the same by construction, and
a job can even be resumed by the other engine. The driver only receives top-k results (tens of
bytes per image; the logits when asked for), the heavy work runs on the cluster. Paths must be
readable from every node (a shared filesystem), as must the model repository.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from serving.contract.manifest import Artefact, Manifest
from serving.runtime.backends import FULL_BATCHES, BackendOptions
from serving.runtime.model_handle import ArtefactChoice
from serving.scoring.inputs import InputList
from serving.scoring.ledger import ShardPlan
from serving.scoring.model import ModelIdentity, RowLoader, Scored, ScoringModel
from serving.scoring.writer import results_table

__all__ = ["RayEngine", "RayOptions", "RayUnavailableError"]

_BLOCK_ROWS = 512  # rows per input block: enough blocks for the tasks to spread over the cluster


class RayUnavailableError(ValueError):
    """`--engine ray` without Ray installed, or a cluster that cannot be reached."""


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where and how wide to run."""

    address: str | None = None  # None: start a local Ray with `local_cpus` CPUs
    local_cpus: int = 2
    actors: int = 1  # backend holders (one per GPU on a GPU cluster)
    actor_cpus: float = 1.0  # CPUs reserved per actor (also its ONNX Runtime threads on CPU)
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("local_cpus", "actors", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.actor_cpus <= 0:
            raise ValueError(f"actor_cpus must be > 0, got {self.actor_cpus!r}")


@dataclass(frozen=True, kw_only=True)
class _ModelSpec:
    """What an actor needs to load the same verified artefact on its node."""

    repo: str
    identity: ModelIdentity
    top_k: int
    device: str
    threads: int
    logits: bool


def _preprocess(batch: dict[str, np.ndarray], loader: RowLoader) -> dict[str, np.ndarray]:
    """Ray task: read and preprocess the files of a batch; failures become error strings."""
    paths = batch["path"]
    pixels = np.zeros((len(paths), *loader.preprocessor.sample_shape), loader.preprocessor.dtype)
    errors = [loader.load(os.fsdecode(p), pixels[i]) for i, p in enumerate(paths)]
    return {**batch, "pixels": pixels, "error": np.array([e or "" for e in errors], dtype=object)}


class _Scorer:
    """Ray actor: holds the backend; batches of preprocessed rows -> result tables."""

    def __init__(self, spec: _ModelSpec) -> None:
        ident = spec.identity
        options = BackendOptions(device=spec.device, intra_op_threads=spec.threads, **FULL_BATCHES)
        choice = ArtefactChoice(device=spec.device, artefact=ident.artefact)  # the driver's choice
        self._model = ScoringModel.open(
            spec.repo, ident.model, ident.version, top_k=spec.top_k, choice=choice, options=options
        )
        if self._model.identity != ident:
            raise RuntimeError(f"artefact on this node is {self._model.identity}, the job uses {ident}")
        self._logits = spec.logits

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) or None for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if e is None]
        scored = None
        if ok:
            pixels = np.asarray(batch["pixels"])[ok]
            step = self._model.max_batch_size
            parts = [self._model.score(pixels[i : i + step]) for i in range(0, len(pixels), step)]
            scored = parts[0] if len(parts) == 1 else _concat(parts)
        return results_table(
            rows=np.asarray(batch["_row"], dtype=np.int64),
            ids=[os.fsdecode(v) for v in batch["id"]],
            paths=[os.fsdecode(v) for v in batch["path"]],
            errors=errors,
            scored=scored,
            identity=self._model.identity,
            labels=self._model.labels,
            with_logits=self._logits,
        )


def _concat(parts: Sequence[Scored]) -> Scored:
    outputs = None if parts[0].outputs is None else np.concatenate([p.outputs for p in parts])
    return Scored(
        indices=np.concatenate([p.indices for p in parts]),
        scores=np.concatenate([p.scores for p in parts]),
        outputs=outputs,
    )


class RayEngine:
    """Runs the pending shards of a job on Ray Data (see module docstring)."""

    def __init__(
        self,
        *,
        repo: str | os.PathLike[str],
        manifest: Manifest,
        artefact: Artefact,
        identity: ModelIdentity,
        inputs: InputList,
        options: RayOptions,
        top_k: int,
        device: str,
        logits: bool,
    ) -> None:
        if options.batch_size > manifest.max_batch_size:
            limit = manifest.max_batch_size
            raise ValueError(f"batch size {options.batch_size} exceeds the model's max_batch_size {limit}")
        _import_ray()  # fail before any work when the optional dependency is missing
        self._loader = RowLoader.for_artefact(manifest, artefact)
        threads = max(1, int(options.actor_cpus)) if device == "cpu" else 0
        self._spec = _ModelSpec(
            repo=str(Path(repo).resolve()), identity=identity, top_k=top_k, device=device,
            threads=threads, logits=logits,
        )  # fmt: skip
        self._inputs, self._options, self._gpu = inputs, options, device != "cpu"

    def run(self, plan: ShardPlan, shards: Sequence[int], deliver: Callable[[pa.Table], None]) -> None:
        """Score the rows of `shards`; `deliver(table)` gets the results in input order."""
        ray, data = _import_ray()
        with _connected(ray, self._options):
            _configure_data(data)
            ds = data.from_arrow(list(self._blocks(plan, shards)))
            ds = ds.map_batches(
                _preprocess,
                fn_kwargs={"loader": self._loader},
                batch_size=self._options.batch_size,
                batch_format="numpy",
            )
            ds = ds.map_batches(
                _Scorer,
                fn_constructor_kwargs={"spec": self._spec},
                compute=data.ActorPoolStrategy(size=self._options.actors),
                batch_size=self._options.batch_size,
                batch_format="numpy",
                num_cpus=self._options.actor_cpus,
                num_gpus=1 if self._gpu else 0,
            )
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                deliver(table)

    def _blocks(self, plan: ShardPlan, shards: Sequence[int]) -> Iterator[pa.Table]:
        ids, paths = self._inputs.ids, self._inputs.paths
        for shard in shards:
            start, stop = plan.bounds(shard)
            for first in range(start, stop, _BLOCK_ROWS):
                last = min(first + _BLOCK_ROWS, stop)
                yield pa.table(
                    {
                        "_row": pa.array(np.arange(first, last, dtype=np.int64)),
                        # bytes: a file name need not be UTF-8 (os.fsdecode restores it exactly)
                        "id": pa.array([os.fsencode(i) for i in ids[first:last]], pa.binary()),
                        "path": pa.array([os.fsencode(p) for p in paths[first:last]], pa.binary()),
                    }
                )


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(
            f"--engine ray needs Ray Data ({exc.name or exc} is not installed): "
            "pip install 'kiln-serve[ray]' (or 'ray[data]')"
        ) from None
    return ray, ray.data


@contextlib.contextmanager
def _connected(ray: Any, options: RayOptions) -> Iterator[None]:
    """Connect to `options.address`, or start a local Ray (shut down again afterwards)."""
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if options.address is None:
        # Workers must import this package even when it is run from a source checkout.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        kwargs |= {"num_cpus": options.local_cpus, "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
    try:
        ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(
            f"cannot connect to Ray at {options.address or 'a new local cluster'}: {exc}"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _configure_data(data: Any) -> None:
    # Ray's own DataContext() construction emits a DeprecationWarning of Ray's (not ours).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards then complete one after another
    ctx.enable_progress_bars = False  # kiln draws its own
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
