"""The Parquet output of `kiln score`: one schema for every engine, shards written atomically.

One row per input:

=========  ====================  ==========================================================
column     type                  meaning
=========  ====================  ==========================================================
id         string                the input's id (see serving.scoring.inputs)
path       string                the absolute path that was read
model      string                model name
version    int64                 model version
artefact   string                artefact file scored with (e.g. "model.onnx")
sha256     string                that artefact's verified sha256
labels     list<string>          top-k labels, best first (null on error)
indices    list<int32>           top-k class indices (null on error)
scores     list<float32>         top-k scores: softmax probabilities, or the model's own
                                 values when its output kind is "probabilities" (null on error)
logits     list<float32>         the full classification output (null unless --logits, or on
                                 error)
error      string                why the input could not be scored (null when fine)
=========  ====================  ==========================================================

Scores are float32, the type Classify returns on the wire. Engines hand batches over with an
extra ``_row`` column (the global row index), which the shard assembler checks and drops.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from serving.contract.fileio import fsync_dir
from serving.scoring.model import ModelIdentity, Scored

__all__ = ["OUTPUT_SCHEMA", "ROW_COLUMN", "results_table", "with_row_column", "write_parquet_atomic"]

ROW_COLUMN = "_row"
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("model", pa.string()),
        pa.field("version", pa.int64()),
        pa.field("artefact", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("indices", pa.list_(pa.int32())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("logits", pa.list_(pa.float32())),
        pa.field("error", pa.string()),
    ]
)


def with_row_column(schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Schema:
    """The schema engines produce: `_row` (int64) first, then the output columns."""
    return pa.schema([pa.field(ROW_COLUMN, pa.int64()), *schema])


def _lists(
    values: np.ndarray, ok: np.ndarray, value_type: pa.DataType, names: pa.Array | None = None
) -> pa.Array:
    """[n, m] values -> list<value_type> with rows where `ok` is False set to null.

    With `names`, the values are indices into it (labels): taken in Arrow, which avoids building
    a numpy object array of strings (far slower).
    """
    width = values.shape[1] if values.ndim == 2 else 0
    sizes = np.where(ok, width, 0)
    offsets = np.zeros(len(ok) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    kept = values[ok].reshape(-1)
    flat = names.take(pa.array(kept)) if names is not None else pa.array(kept, type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~ok))


def results_table(
    *,
    rows: np.ndarray,
    ids: Sequence[str],
    paths: Sequence[str],
    errors: Sequence[str | None],
    scored: Scored | None,
    identity: ModelIdentity,
    labels: Sequence[str],
    with_logits: bool,
) -> pa.Table:
    """One batch of results as a table of `with_row_column()`.

    `rows` are the global input indices of the batch; `scored` covers the rows whose error is
    None, in order (None when every row failed).
    """
    n = len(ids)
    ok = np.array([e is None for e in errors], dtype=bool)
    good = 0 if scored is None else len(scored.indices)
    if int(ok.sum()) != good or len(rows) != n:
        raise ValueError(f"{n} rows ({len(rows)} indices), {int(ok.sum())} good but {good} scored")
    indices = _expand(None if scored is None else scored.indices, ok)
    scores = _expand(None if scored is None else scored.scores, ok)
    logits = pa.nulls(n, pa.list_(pa.float32()))
    if with_logits and scored is not None and scored.outputs is not None:
        logits = _lists(_expand(scored.outputs, ok).astype(np.float32), ok, pa.float32())
    columns = {
        ROW_COLUMN: pa.array(np.asarray(rows, dtype=np.int64)),
        "id": _text(ids),
        "path": _text(paths),
        "model": pa.array([identity.model] * n, pa.string()),
        "version": pa.array(np.full(n, identity.version, np.int64)),
        "artefact": pa.array([identity.artefact] * n, pa.string()),
        "sha256": pa.array([identity.sha256] * n, pa.string()),
        "labels": _lists(indices, ok, pa.string(), names=pa.array(list(labels), pa.string())),
        "indices": _lists(indices.astype(np.int32), ok, pa.int32()),
        "scores": _lists(scores.astype(np.float32), ok, pa.float32()),
        "logits": logits,
        "error": pa.array(list(errors), pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=with_row_column())


def _text(values: Sequence[str]) -> pa.Array:
    """Strings as Arrow UTF-8; a file name that is not valid UTF-8 (Linux allows any bytes) is
    written with its bad bytes escaped (b'\\xff' -> "\\xff") rather than failing the batch."""
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:
        return pa.array(
            [v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for v in values],
            pa.string(),
        )


def _expand(values: np.ndarray | None, ok: np.ndarray) -> np.ndarray:
    """Rows of the good inputs -> one row per input (zeros where not ok; masked out later)."""
    if values is None:
        return np.zeros((len(ok), 0), np.int64)
    if ok.all():
        return values
    full = np.zeros((len(ok), *values.shape[1:]), values.dtype)
    full[ok] = values
    return full


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike[str], metadata: dict[str, str]) -> int:
    """Write `table` to `path` so that a reader or a crash sees the whole file or none of it.

    Temp file in the same folder, fsync, rename over the target, fsync the folder. `metadata`
    goes into the file's key-value metadata. Returns the file size in bytes.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    try:
        pq.write_table(table, tmp, compression="zstd")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
    return target.stat().st_size
