"""Exactly-once bookkeeping: shard plan, ledger (identity, lock, commits) and shard assembly."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.scoring.ledger import JOB_FILE, JobIdentity, JobMismatchError, Ledger, LedgerError, ShardPlan
from serving.scoring.model import ModelIdentity, Scored
from serving.scoring.shards import ShardAssembler
from serving.scoring.writer import ROW_COLUMN, results_table

IDENTITY = JobIdentity(
    inputs_fingerprint="f" * 64, inputs_count=7, shard_size=3, model="m", version=1,
    artefact="model.onnx", sha256="0" * 64, top_k=1, logits=False,
)  # fmt: skip
MODEL = ModelIdentity(model="m", version=1, artefact="model.onnx", sha256="0" * 64)


def _batch(first: int, count: int, bad: tuple[int, ...] = ()) -> pa.Table:
    errors = [("bad" if first + i in bad else None) for i in range(count)]
    good = sum(e is None for e in errors)
    scored = Scored(indices=np.zeros((good, 1), np.int64), scores=np.ones((good, 1)), outputs=None)
    return results_table(
        rows=np.arange(first, first + count), ids=[f"id{first + i}" for i in range(count)],
        paths=[f"/p{first + i}" for i in range(count)], errors=errors, scored=scored if good else None,
        identity=MODEL, labels=("only",), with_logits=False,
    )  # fmt: skip


def test_shard_plan() -> None:
    plan = ShardPlan(rows=7, shard_size=3)
    assert plan.count == 3
    assert [plan.bounds(i) for i in range(3)] == [(0, 3), (3, 6), (6, 7)]
    assert plan.file_name(2) == "part-00002.parquet"
    assert ShardPlan(rows=10**6, shard_size=1).file_name(7) == "part-000007.parquet"
    with pytest.raises(IndexError):
        plan.bounds(3)
    with pytest.raises(ValueError, match="shard size must be >= 1"):
        ShardPlan(rows=1, shard_size=0)


def test_commit_and_reopen(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Ledger.open(out, IDENTITY) as ledger:
        assert ledger.pending() == [0, 1, 2]
        record = ledger.commit(1, _batch(3, 3, bad=(4,)).drop_columns([ROW_COLUMN]))
        assert (record.rows, record.errors, record.first_id, record.last_id) == (3, 1, "id3", "id5")
    assert json.loads((out / JOB_FILE).read_text())["inputs_fingerprint"] == "f" * 64
    with Ledger.open(out, IDENTITY) as ledger:
        assert ledger.pending() == [0, 2]
        assert pq.read_table(out / "part-00001.parquet").column("id").to_pylist() == ["id3", "id4", "id5"]


def test_a_shard_whose_file_does_not_match_its_record_is_redone(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, IDENTITY) as ledger:
        ledger.commit(0, _batch(0, 3).drop_columns([ROW_COLUMN]))
        ledger.commit(1, _batch(3, 3).drop_columns([ROW_COLUMN]))
    with open(tmp_path / "part-00000.parquet", "ab") as handle:
        handle.write(b"junk")  # size no longer matches the record
    (tmp_path / "part-00001.parquet").unlink()
    (tmp_path / "_ledger" / "part-00002.json").write_text("{not json")
    with Ledger.open(tmp_path, IDENTITY) as ledger:
        assert ledger.pending() == [0, 1, 2]


def test_a_different_job_is_refused(tmp_path: Path) -> None:
    Ledger.open(tmp_path, IDENTITY).close()
    other = dataclasses.replace(IDENTITY, version=2, top_k=3)
    with pytest.raises(JobMismatchError, match=r"different job \(version 1 != 2; top_k 1 != 3\)"):
        Ledger.open(tmp_path, other)


def test_unusable_output_folders(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LedgerError, match="is a file, not a directory"):
        Ledger.open(tmp_path / "file", IDENTITY)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "results.csv").write_text("x")
    with pytest.raises(
        LedgerError, match=r"not empty and holds no _kiln_score.json \(found \['results.csv'\]\)"
    ):
        Ledger.open(tmp_path / "busy", IDENTITY)


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, IDENTITY), pytest.raises(LedgerError, match="another kiln score job"):
        Ledger.open(tmp_path, IDENTITY)
    Ledger.open(tmp_path, IDENTITY).close()  # released


def test_temp_files_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    Ledger.open(tmp_path, IDENTITY).close()
    (tmp_path / ".part-00000.parquet.1234abcd.tmp").write_bytes(b"half")
    (tmp_path / "_ledger" / ".part-00000.json.x.tmp").write_bytes(b"{")
    Ledger.open(tmp_path, IDENTITY).close()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_assembler_commits_whole_shards_from_batches_in_any_order(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, IDENTITY) as ledger:
        assembler = ShardAssembler(ledger, [0, 1, 2])
        assembler.add(_batch(6, 1))  # the last shard, complete on its own
        assembler.add(pa.concat_tables([_batch(4, 2), _batch(0, 2)]))  # spans shards 0 and 1
        assert [r.index for r in assembler.committed] == [2]
        assembler.add(_batch(2, 2))  # completes 0 and 1
        assembler.finish()
        assert sorted(r.index for r in assembler.committed) == [0, 1, 2]
    ids = [pq.read_table(tmp_path / f"part-0000{i}.parquet").column("id").to_pylist() for i in range(3)]
    assert ids == [["id0", "id1", "id2"], ["id3", "id4", "id5"], ["id6"]]


def test_assembler_refuses_duplicates_and_strays(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, IDENTITY) as ledger:
        assembler = ShardAssembler(ledger, [0, 2])
        with pytest.raises(RuntimeError, match=r"rows 0\.\.2 once each, got 3 rows \(2 distinct\)"):
            assembler.add(pa.concat_tables([_batch(0, 2), _batch(1, 1)]))
        with pytest.raises(RuntimeError, match="shard 1, which is not pending"):
            assembler.add(_batch(3, 1))
        assert not os.path.exists(tmp_path / "part-00000.parquet")
    with Ledger.open(tmp_path, IDENTITY) as ledger:
        assembler = ShardAssembler(ledger, [2])
        with pytest.raises(RuntimeError, match=r"shards \[2\] incomplete"):
            assembler.finish()
