"""What a scoring job tells its user: a progress bar while it runs, a summary when it ends."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["ProgressBar", "ScoreSummary"]


@dataclass(frozen=True, kw_only=True)
class ScoreSummary:
    """Totals of the whole output folder plus what this run did."""

    output: str
    engine: str
    rows: int  # rows in the committed shards (the whole job once complete)
    errors: int  # of those, rows with an error
    shards: int  # shards of the job
    shards_written: int  # committed by this run
    shards_skipped: int  # found committed from an earlier run
    rows_scored: int  # rows computed by this run
    seconds: float  # wall time of this run's scoring
    complete: bool

    @property
    def images_per_s(self) -> float:
        """Rows computed by this run per second of its wall time."""
        return self.rows_scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with images_per_s)."""
        return {**dataclasses.asdict(self), "images_per_s": round(self.images_per_s, 2)}

    def line(self) -> str:
        """One line for the terminal."""
        state = "complete" if self.complete else "INCOMPLETE"
        skipped = f", {self.shards_skipped} already committed" if self.shards_skipped else ""
        return (
            f"{state}: {self.rows} rows ({self.errors} errors) in {self.shards} shards at {self.output}; "
            f"this run scored {self.rows_scored} rows in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s, engine {self.engine}{skipped})"
        )


class _RateColumn(ProgressColumn):
    """Images per second (rich's smoothed estimate)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:,.1f} img/s", style="progress.data.speed")


class ProgressBar:
    """A rich progress bar on stderr (rows done / total, rate, ETA); silent when disabled."""

    def __init__(self, total: int, *, done: int = 0, enabled: bool = True, console: Console | None = None):
        self._progress = Progress(
            TextColumn("[bold]scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("score", total=total, completed=done)

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def advance(self, rows: int) -> None:
        """Count `rows` more rows as done."""
        self._progress.advance(self._task, rows)
