"""Assemble the result batches of an engine into shards and commit each one once it is whole.

Engines deliver tables with a `_row` column (the global input index) in any order and cut at any
place; a shard is committed only when it holds exactly its rows [start, stop), each once. That
check is the last line of defence of exactly-once: a duplicated or missing row is an error, never
a written shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serving.scoring.ledger import Ledger, ShardRecord
from serving.scoring.writer import OUTPUT_SCHEMA, ROW_COLUMN

__all__ = ["ShardAssembler"]


class ShardAssembler:
    """Buffers partial shards (bounded by what the engine has in flight) and commits full ones."""

    def __init__(
        self,
        ledger: Ledger,
        pending: Iterable[int],
        on_commit: Callable[[ShardRecord], None] | None = None,
    ) -> None:
        self._ledger, self._plan, self._on_commit = ledger, ledger.plan, on_commit
        self._waiting: dict[int, list[pa.Table]] = {i: [] for i in pending}
        self._counts: dict[int, int] = dict.fromkeys(self._waiting, 0)
        self.committed: list[ShardRecord] = []

    @property
    def remaining(self) -> list[int]:
        """Shards not committed yet."""
        return sorted(self._waiting)

    def add(self, batch: pa.Table) -> None:
        """Take one batch of results (any rows of any pending shards)."""
        if batch.num_rows == 0:
            return
        rows = batch.column(ROW_COLUMN).to_numpy()
        shards = rows // self._plan.shard_size
        if np.any(shards[1:] < shards[:-1]):  # keep each shard's rows together
            order = np.argsort(rows, kind="stable")
            batch, shards = batch.take(pa.array(order)), shards[order]
        cuts = np.flatnonzero(np.diff(shards)) + 1
        for start, stop in zip([0, *cuts], [*cuts, len(shards)], strict=True):
            self._add_part(int(shards[start]), batch.slice(start, stop - start))

    def _add_part(self, shard: int, part: pa.Table) -> None:
        if shard not in self._waiting:
            raise RuntimeError(f"engine returned rows of shard {shard}, which is not pending")
        self._waiting[shard].append(part)
        self._counts[shard] += part.num_rows
        start, stop = self._plan.bounds(shard)
        if self._counts[shard] >= stop - start:
            self._commit(shard, start, stop)

    def _commit(self, shard: int, start: int, stop: int) -> None:
        table = pa.concat_tables(self._waiting.pop(shard))
        del self._counts[shard]
        table = table.take(pc.sort_indices(table, [(ROW_COLUMN, "ascending")]))
        rows = table.column(ROW_COLUMN).to_numpy()
        if len(rows) != stop - start or not np.array_equal(rows, np.arange(start, stop)):
            raise RuntimeError(
                f"shard {shard}: expected rows {start}..{stop - 1} once each, "
                f"got {len(rows)} rows ({len(np.unique(rows))} distinct)"
            )
        table = table.drop_columns([ROW_COLUMN]).cast(OUTPUT_SCHEMA)
        record = self._ledger.commit(shard, table)
        self.committed.append(record)
        if self._on_commit is not None:
            self._on_commit(record)

    def finish(self) -> None:
        """Raise if a pending shard did not receive all its rows."""
        if self._waiting:
            raise RuntimeError(f"engine finished with shards {self.remaining[:5]} incomplete")
