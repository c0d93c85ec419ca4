"""Exactly-once output: deterministic shards, each committed atomically and recorded in a ledger.

Layout of an output folder::

    OUT/_kiln_score.json       the job's identity (inputs fingerprint, model, artefact sha256, ...)
    OUT/_kiln_score.lock       flock'ed while a job writes here (one writer at a time)
    OUT/part-00000.parquet     shard 0 = sorted inputs [0, S), shard i = [i*S, (i+1)*S)
    OUT/_ledger/part-00000.json  the commit record of shard 0 (rows, errors, size, sha256)
    OUT/_summary.json          written when every shard is committed
    OUT/_predictions.json      then too: what the job predicted (serving/scoring/distribution.py)

A shard is committed when its record exists and its file has the recorded size. The order is:
write the shard to a temp file, fsync, rename (serving.scoring.writer), then write the record
atomically. A kill -9 anywhere leaves either no record (the shard is recomputed and replaced:
its content is a pure function of the identity, so a renamed-but-unrecorded file is simply
overwritten) or a complete record of a complete file (skipped). A rerun with different inputs,
model, artefact or settings is refused instead of mixing results. Readers (pyarrow.dataset,
pandas, Spark) skip names starting with "_" or ".", so reading OUT gives the shards only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from serving.contract.fileio import atomic_write_text, sha256_file
from serving.scoring.writer import write_parquet_atomic

__all__ = ["JOB_FILE", "JobIdentity", "JobMismatchError", "Ledger", "LedgerError", "ShardPlan", "ShardRecord"]

JOB_FILE = "_kiln_score.json"
LOCK_FILE = "_kiln_score.lock"
LEDGER_DIR = "_ledger"
SUMMARY_FILE = "_summary.json"
OUTPUT_FORMAT = 1  # bump when the Parquet schema or the sharding changes


class LedgerError(ValueError):
    """The output folder cannot be used for this job (names the folder and why)."""


class JobMismatchError(LedgerError):
    """The output folder holds results of a different job; mixing them is refused."""


@dataclass(frozen=True, kw_only=True)
class JobIdentity:
    """Everything that decides the content of the shards: equal identities, equal shards."""

    inputs_fingerprint: str
    inputs_count: int
    shard_size: int
    model: str
    version: int
    artefact: str
    sha256: str
    top_k: int
    logits: bool
    output_format: int = OUTPUT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    def differences(self, other: JobIdentity) -> list[str]:
        """Human-readable "field: old != new" for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k} {_short(mine[k])} != {_short(theirs[k])}" for k in mine if mine[k] != theirs[k]]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 20 else text[:15] + "...'"


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    """Fixed-size shards over the sorted input list."""

    rows: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if self.rows < 1:
            raise ValueError(f"a job needs at least one input, got {self.rows}")

    @property
    def count(self) -> int:
        """Number of shards."""
        return -(-self.rows // self.shard_size)

    def bounds(self, index: int) -> tuple[int, int]:
        """[start, stop) rows of shard `index`."""
        if not 0 <= index < self.count:
            raise IndexError(f"shard {index} out of range 0..{self.count - 1}")
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.rows)

    def file_name(self, index: int) -> str:
        """part-00000.parquet (zero-padded to sort in order)."""
        width = max(5, len(str(self.count - 1)))
        return f"part-{index:0{width}d}.parquet"


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """The commit record of one shard."""

    index: int
    file: str
    rows: int
    errors: int
    size_bytes: int
    sha256: str
    first_id: str
    last_id: str
    committed_at: str


class Ledger:
    """The output folder of one job, opened for writing (see module docstring)."""

    def __init__(self, out_dir: Path, identity: JobIdentity, lock_fd: int) -> None:
        self.out_dir, self.identity, self._lock_fd = out_dir, identity, lock_fd
        self.plan = ShardPlan(rows=identity.inputs_count, shard_size=identity.shard_size)
        self._ledger_dir = out_dir / LEDGER_DIR

    @classmethod
    def open(cls, out_dir: str | os.PathLike[str], identity: JobIdentity) -> Ledger:
        """Create or reopen `out_dir` for `identity` (LedgerError / JobMismatchError if it cannot)."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise LedgerError(f"output {out} is a file, not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
        lock_fd = _lock(out)
        try:
            _check_identity(out, identity)
            (out / LEDGER_DIR).mkdir(exist_ok=True)
            ledger = cls(out, identity, lock_fd)
            ledger._remove_temp_files()
        except BaseException:
            os.close(lock_fd)
            raise
        return ledger

    def close(self) -> None:
        """Release the folder lock."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def records(self) -> dict[int, ShardRecord]:
        """Committed shards: a valid record whose file exists with the recorded size."""
        found: dict[int, ShardRecord] = {}
        for entry in sorted(self._ledger_dir.glob("part-*.json")):
            record = self._read_record(entry)
            if record is None:
                continue
            target = self.out_dir / record.file
            with contextlib.suppress(OSError):
                if target.stat().st_size == record.size_bytes:
                    found[record.index] = record
        return found

    def pending(self) -> list[int]:
        """Shards still to compute, in order."""
        done = self.records()
        return [i for i in range(self.plan.count) if i not in done]

    def commit(self, index: int, table: pa.Table) -> ShardRecord:
        """Write shard `index` (exactly its rows, in order) and record it."""
        start, stop = self.plan.bounds(index)
        if table.num_rows != stop - start:
            raise ValueError(f"shard {index} needs {stop - start} rows, got {table.num_rows}")
        name = self.plan.file_name(index)
        meta = {"kiln.score.job": json.dumps(self.identity.to_dict()), "kiln.score.shard": str(index)}
        size = write_parquet_atomic(table, self.out_dir / name, meta)
        ids = table.column("id")
        record = ShardRecord(
            index=index,
            file=name,
            rows=table.num_rows,
            errors=table.num_rows - table.column("error").null_count,
            size_bytes=size,
            sha256=sha256_file(self.out_dir / name),
            first_id=str(ids[0]),
            last_id=str(ids[-1]),
            committed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        atomic_write_text(
            self._ledger_dir / f"{Path(name).stem}.json", json.dumps(dataclasses.asdict(record))
        )
        return record

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write `_summary.json` (done once every shard is committed)."""
        atomic_write_text(self.out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    def _read_record(self, path: Path) -> ShardRecord | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            record = ShardRecord(**data)
        except (OSError, ValueError, TypeError):
            return None  # unreadable record: the shard is simply recomputed
        if not 0 <= record.index < self.plan.count or record.file != self.plan.file_name(record.index):
            return None
        start, stop = self.plan.bounds(record.index)
        return record if record.rows == stop - start else None

    def _remove_temp_files(self) -> None:
        """Temp files of a killed run (hidden *.tmp); safe: we hold the folder lock."""
        for folder in (self.out_dir, self._ledger_dir):
            for entry in _temp_files(folder):
                with contextlib.suppress(OSError):
                    entry.unlink()


def _temp_files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def _lock(out: Path) -> int:
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerError(f"another kiln score job is writing to {out}") from None
    return fd


def _check_identity(out: Path, identity: JobIdentity) -> None:
    job_file = out / JOB_FILE
    if not job_file.exists():
        leftovers = {LOCK_FILE, LEDGER_DIR, *(p.name for p in _temp_files(out))}
        foreign = [p.name for p in out.iterdir() if p.name not in leftovers]
        if foreign:
            raise LedgerError(
                f"output directory {out} is not empty and holds no {JOB_FILE} "
                f"(found {sorted(foreign)[:3]}); use an empty or new directory"
            )
        atomic_write_text(job_file, json.dumps(identity.to_dict(), indent=2) + "\n")
        return
    try:
        previous = JobIdentity(**json.loads(job_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise LedgerError(f"{job_file} is unreadable ({exc}); use a new output directory") from None
    problems = previous.differences(identity)
    if problems:
        raise JobMismatchError(
            f"{out} holds results of a different job ({'; '.join(problems)}); "
            "refusing to mix them: use a new --output directory"
        )
