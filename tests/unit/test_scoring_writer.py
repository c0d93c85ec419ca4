"""The Parquet schema of `kiln score` and the atomic shard write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from serving.scoring.model import ModelIdentity, Scored
from serving.scoring.writer import (
    OUTPUT_SCHEMA,
    ROW_COLUMN,
    results_table,
    with_row_column,
    write_parquet_atomic,
)

IDENTITY = ModelIdentity(model="m", version=3, artefact="model.onnx", sha256="ab" * 32)
LABELS = ("zero", "one", "two")


def _scored(rows: int) -> Scored:
    outputs = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    return Scored(
        indices=np.tile([2, 0], (rows, 1)),
        scores=np.tile([0.75, 0.25], (rows, 1)),
        outputs=outputs,
    )


def test_good_and_error_rows() -> None:
    table = results_table(
        rows=np.arange(10, 13), ids=["a", "b", "c"], paths=["/a", "/b", "/c"],
        errors=[None, "bad file", None], scored=_scored(2),
        identity=IDENTITY, labels=LABELS, with_logits=True,
    )  # fmt: skip
    assert table.schema == with_row_column()
    rows = table.to_pylist()
    assert [r[ROW_COLUMN] for r in rows] == [10, 11, 12]
    assert rows[0]["labels"] == ["two", "zero"] and rows[0]["indices"] == [2, 0]
    assert rows[0]["scores"] == [0.75, 0.25] and rows[0]["logits"] == [0.0, 1.0, 2.0]
    assert rows[2]["logits"] == [3.0, 4.0, 5.0]  # the second *scored* row
    assert rows[1]["error"] == "bad file"
    assert all(rows[1][c] is None for c in ("labels", "indices", "scores", "logits"))
    assert rows[0]["error"] is None
    assert {(r["model"], r["version"], r["artefact"], r["sha256"]) for r in rows} == {
        ("m", 3, "model.onnx", "ab" * 32)
    }


def test_logits_are_null_unless_asked_for() -> None:
    table = results_table(
        rows=np.arange(1), ids=["a"], paths=["/a"], errors=[None], scored=_scored(1),
        identity=IDENTITY, labels=LABELS, with_logits=False,
    )  # fmt: skip
    assert table.column("logits").null_count == 1 and table.column("scores").null_count == 0


def test_all_rows_bad() -> None:
    table = results_table(
        rows=np.arange(2), ids=["a", "b"], paths=["/a", "/b"], errors=["x", "y"], scored=None,
        identity=IDENTITY, labels=LABELS, with_logits=True,
    )  # fmt: skip
    assert table.column("labels").null_count == 2 and table.column("error").to_pylist() == ["x", "y"]


def test_scored_rows_must_match_good_rows() -> None:
    with pytest.raises(ValueError, match="2 good but 1 scored"):
        results_table(
            rows=np.arange(2), ids=["a", "b"], paths=["/a", "/b"], errors=[None, None], scored=_scored(1),
            identity=IDENTITY, labels=LABELS, with_logits=False,
        )  # fmt: skip


def test_atomic_write_leaves_only_the_target(tmp_path: Path) -> None:
    table = results_table(
        rows=np.arange(1), ids=["a"], paths=["/a"], errors=[None], scored=_scored(1),
        identity=IDENTITY, labels=LABELS, with_logits=False,
    ).drop_columns([ROW_COLUMN])  # fmt: skip
    size = write_parquet_atomic(table, tmp_path / "part.parquet", {"k": "v"})
    assert [p.name for p in tmp_path.iterdir()] == ["part.parquet"]
    assert size == (tmp_path / "part.parquet").stat().st_size
    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.metadata[b"k"] == b"v"
    assert back.replace_schema_metadata(None).schema == OUTPUT_SCHEMA
    assert back.to_pylist() == table.to_pylist()
