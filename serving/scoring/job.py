"""One scoring job end to end: inputs -> verified model -> ledger -> engine -> shards -> summary.

A complete job also writes what it predicted (`_predictions.json`, serving/scoring/distribution.py):
the server's class counts, confidence histogram and drift score of the same rows.

`prepare_job` does everything that can fail because of what the user asked for (no inputs, no
model, a bad manifest, an output folder of another job, a missing optional dependency): those
raise ValueError subclasses (or a KilnError when the artefact cannot load) before any work.
`ScoreJob.run` then computes the pending shards; a failure there (a backend crash) leaves the
committed shards in place, and rerunning resumes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from serving.contract.fileio import atomic_write_text
from serving.contract.manifest import Artefact, Manifest
from serving.runtime.backends import FULL_BATCHES, BackendOptions
from serving.runtime.distribution import DEFAULT_PREDICTION_CLASSES
from serving.runtime.model_handle import ArtefactChoice, ModelHandle
from serving.scoring.distribution import PREDICTIONS_FILE, PredictionSummary, summarise_shards
from serving.scoring.inputs import InputList, list_inputs
from serving.scoring.ledger import JobIdentity, Ledger, LedgerError, ShardPlan, ShardRecord
from serving.scoring.local_engine import LocalEngine, LocalOptions
from serving.scoring.model import ModelIdentity, ScoringModel, resolve_model
from serving.scoring.shards import ShardAssembler
from serving.scoring.summary import ProgressBar, ScoreSummary

__all__ = ["ScoreConfig", "ScoreJob", "prepare_job", "run_score"]

ENGINES = ("local", "ray")
DEFAULT_BATCH = 32


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """A scoring job as the user asked for it (validated on construction)."""

    repo: Path
    model: str
    version: int | None = None
    inputs: str
    output: Path
    top_k: int = 5
    batch_size: int | None = None  # None: min(32, the model's max_batch_size)
    workers: int = 2  # local engine: decode threads
    engine: str = "local"
    device: str = "cpu"
    artefact: str | None = None  # file name in the version folder; None: what kiln serve would load
    logits: bool = False
    shard_size: int = 10_000
    ray_address: str | None = None
    actors: int = 1  # ray engine: backend actors
    actor_cpus: float = 1.0
    progress: bool = True
    # _predictions.json names the first N classes, the rest "other" (kiln serve's prediction_classes)
    prediction_classes: int = DEFAULT_PREDICTION_CLASSES

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("top_k", "workers", "shard_size", "actors", "prediction_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.version is not None and self.version < 1:
            raise ValueError(f"model version must be >= 1, got {self.version}")
        BackendOptions(device=self.device)  # validates the device spelling


class Engine(Protocol):
    """What the job needs from an engine."""

    def run(self, plan: ShardPlan, shards: list[int], deliver: Any) -> None: ...


@dataclass
class ScoreJob:
    """A prepared job: its ledger is open (and locked) until `close`."""

    config: ScoreConfig
    inputs: InputList
    ledger: Ledger
    engine: Engine
    model: ScoringModel | None  # the local engine's backend holder (None for Ray)
    manifest: Manifest
    predictions: PredictionSummary | None = None  # set by `run` once the job is complete

    def run(self) -> ScoreSummary:
        """Compute the pending shards and return the summary (also written when complete)."""
        before = self.ledger.records()
        pending = [i for i in range(self.ledger.plan.count) if i not in before]
        done_rows = sum(r.rows for r in before.values())
        assembler = ShardAssembler(self.ledger, pending)
        start = time.perf_counter()
        with ProgressBar(len(self.inputs), done=done_rows, enabled=self.config.progress) as bar:

            def deliver(table: pa.Table) -> None:
                assembler.add(table)
                bar.advance(table.num_rows)

            if pending:
                self.engine.run(self.ledger.plan, pending, deliver)
            assembler.finish()
        seconds = time.perf_counter() - start
        return self._summary(self.ledger.records(), before, assembler.committed, seconds)

    def _summary(
        self,
        records: dict[int, ShardRecord],
        before: dict[int, ShardRecord],
        written: list[ShardRecord],
        seconds: float,
    ) -> ScoreSummary:
        summary = ScoreSummary(
            output=str(self.config.output),
            engine=self.config.engine,
            rows=sum(r.rows for r in records.values()),
            errors=sum(r.errors for r in records.values()),
            shards=self.ledger.plan.count,
            shards_written=len(written),
            shards_skipped=len(before),
            rows_scored=sum(r.rows for r in written),
            seconds=seconds,
            complete=len(records) == self.ledger.plan.count,
        )
        if summary.complete:
            self.ledger.write_summary({**summary.to_dict(), "job": self.ledger.identity.to_dict()})
            self._write_predictions(records)
        return summary

    def _write_predictions(self, records: dict[int, ShardRecord]) -> None:
        """Summarise what the whole job predicted into `_predictions.json` (see module doc)."""
        out = self.ledger.out_dir
        files = [out / records[i].file for i in sorted(records)]
        self.predictions = summarise_shards(files, self.manifest, self.config.prediction_classes)
        atomic_write_text(out / PREDICTIONS_FILE, json.dumps(self.predictions.to_dict(), indent=2) + "\n")

    def close(self) -> None:
        """Release the backend and the output folder lock."""
        if self.model is not None:
            self.model.close()
        self.ledger.close()


def prepare_job(config: ScoreConfig) -> ScoreJob:
    """List inputs, verify the model, open the output folder and build the engine (see module doc)."""
    if os.path.exists(config.output) and not os.path.isdir(config.output):
        raise LedgerError(f"output {config.output} is a file, not a directory")  # before any slow step
    inputs = list_inputs(config.inputs)
    choice = ArtefactChoice(device=config.device, artefact=config.artefact)
    resolved, artefact = resolve_model(config.repo, config.model, config.version, choice)
    manifest = resolved.manifest
    if manifest.input.kind == "signal":  # inputs are image files; signal rows are not supported yet
        raise ValueError(
            f"model {manifest.name} takes a signal of length {manifest.input.length}, not an image; "
            "kiln score reads image files only"
        )
    batch = config.batch_size or min(DEFAULT_BATCH, manifest.max_batch_size)
    if batch > manifest.max_batch_size:
        raise ValueError(f"--batch-size {batch} exceeds the model's max_batch_size {manifest.max_batch_size}")
    identity = ModelIdentity(
        model=manifest.name, version=manifest.version, artefact=artefact.path, sha256=artefact.sha256
    )
    job_id = JobIdentity(
        inputs_fingerprint=inputs.fingerprint,
        inputs_count=len(inputs),
        shard_size=config.shard_size,
        model=identity.model,
        version=identity.version,
        artefact=identity.artefact,
        sha256=identity.sha256,
        top_k=min(config.top_k, len(manifest.labels)),
        logits=config.logits,
    )
    model = None
    try:
        if config.engine == "local":
            # full batches offline: no extra sessions for small ones (runtime/backends/batch_sessions.py)
            run_as = BackendOptions(device=config.device, **FULL_BATCHES)
            handle = ModelHandle.load(resolved, artefact, options=run_as)
            model = ScoringModel(handle, top_k=config.top_k)
            model.warm_up(batch)
            options = LocalOptions(workers=config.workers, batch_size=batch)
            engine: Engine = LocalEngine(model, inputs, options, logits=config.logits)
        else:
            engine = _ray_engine(config, resolved.manifest, artefact, identity, inputs, batch)
        ledger = Ledger.open(config.output, job_id)
    except BaseException:
        if model is not None:
            model.close()
        raise
    return ScoreJob(
        config=config, inputs=inputs, ledger=ledger, engine=engine, model=model, manifest=manifest
    )


def _ray_engine(
    config: ScoreConfig,
    manifest: Manifest,
    artefact: Artefact,
    identity: ModelIdentity,
    inputs: InputList,
    batch: int,
) -> Engine:
    from serving.scoring.ray_engine import RayEngine, RayOptions  # Ray is optional: import on use

    options = RayOptions(
        address=config.ray_address, actors=config.actors, actor_cpus=config.actor_cpus, batch_size=batch
    )
    return RayEngine(
        repo=config.repo, manifest=manifest, artefact=artefact, identity=identity, inputs=inputs,
        options=options, top_k=config.top_k, device=config.device, logits=config.logits,
    )  # fmt: skip


def run_score(config: ScoreConfig) -> ScoreSummary:
    """prepare_job + run + close."""
    job = prepare_job(config)
    try:
        return job.run()
    finally:
        job.close()
