"""What a scoring job predicted, summarised as the server summarises live traffic.

When every shard is committed, `kiln score` writes ``OUT/_predictions.json`` beside
``_summary.json`` and prints it as a short table. Its numbers are the server's, computed by the
same code (serving/runtime/distribution.py), so an offline job and a live server can be
compared directly:

===================  =========================================================================
key                  on the server
===================  =========================================================================
classes              kiln_predictions_total{class}: rows per top-1 class, the first
                     `prediction_classes` classes by label and the rest as "other"
confidence           kiln_prediction_confidence: rows per top-1 probability bin, ``le`` the
                     bins' upper bounds (the histogram's buckets; here per bin, not cumulative)
drift                kiln_prediction_drift{distribution="class"|"confidence"}: PSI of the job's
                     rows against the reference in kiln.json; absent (not 0) when the export
                     has none, as the gauge is
===================  =========================================================================

The job's rows are read back from the committed shards (their ``indices`` and ``scores``
columns: the top-1 class and its score as written, float32), so a resumed job and a Ray job are
summarised whole. Error rows and rows whose score is not finite predict nothing (the server
does not count them either). The drift score covers every row of the job, where the gauge
covers the last `drift_window` rows the server answered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.contract.manifest import Manifest
from serving.runtime.distribution import (
    CONFIDENCE_EDGES,
    OTHER,
    class_psi,
    confidence_bins,
    confidence_psi,
    named_classes,
    reference_for,
)

__all__ = ["PREDICTIONS_FILE", "PredictionSummary", "summarise_shards"]

PREDICTIONS_FILE = "_predictions.json"


@dataclass(frozen=True, kw_only=True)
class PredictionSummary:
    """Top-1 class counts, top-1 probability histogram and drift of a job's rows."""

    model: str
    version: int
    rows: int  # rows with a prediction
    errors: int  # rows without one (unreadable inputs, non-finite scores)
    prediction_classes: int
    classes: dict[str, int]  # label -> rows, in label order, OTHER last
    confidence_edges: tuple[float, ...]
    confidence_counts: tuple[int, ...]
    drift: dict[str, float] | None  # {"class": psi, "confidence": psi}; None: no reference

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see module docstring); `drift` left out when there is none."""
        shaped = ("confidence_edges", "confidence_counts", "drift")  # written in their JSON form below
        result = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in shaped}
        result["confidence"] = {"le": list(self.confidence_edges), "count": list(self.confidence_counts)}
        if self.drift is not None:
            result["drift"] = self.drift
        return result

    def table(self) -> str:
        """A few lines for the terminal: the class counts, the histogram and the drift score."""
        total = max(self.rows, 1)
        width = max((len(name) for name in self.classes), default=5)
        lines = [f"predictions of {self.model} v{self.version}: {self.rows} rows"]
        lines += [
            f"  {name:<{width}}  {count:>9}  {count / total:6.1%}" for name, count in self.classes.items()
        ]
        bins = "  ".join(
            f"<={edge:g}:{count}"
            for edge, count in zip(self.confidence_edges, self.confidence_counts, strict=True)
        )
        lines.append(f"  top-1 confidence  {bins}")
        if self.drift is None:
            lines.append("  drift (PSI): none, kiln.json has no reference distribution")
        else:
            lines.append(
                f"  drift (PSI) vs kiln.json reference: class {self.drift['class']:.4f}, "
                f"confidence {self.drift['confidence']:.4f}"
            )
        return "\n".join(lines)


def summarise_shards(files: Iterable[Path], manifest: Manifest, most_classes: int) -> PredictionSummary:
    """Summarise the rows of the committed shard `files` of a job that scored `manifest`'s model."""
    classes = len(manifest.labels)
    class_counts = np.zeros(classes, np.int64)
    bin_counts = np.zeros(len(CONFIDENCE_EDGES), np.int64)
    rows = errors = 0
    for path in files:
        table = pq.read_table(path, columns=["indices", "scores"])
        best = pc.list_element(table.column("indices"), 0).to_numpy(zero_copy_only=False)
        top = pc.list_element(table.column("scores"), 0).to_numpy(zero_copy_only=False)
        good = np.isfinite(top.astype(np.float64))  # nulls (error rows) come back as NaN
        best, top = best[good].astype(np.int64), top[good].astype(np.float64)
        class_counts += np.bincount(best, minlength=classes)
        bin_counts += np.bincount(confidence_bins(top), minlength=len(CONFIDENCE_EDGES))
        rows, errors = rows + len(best), errors + int(table.num_rows - len(best))
    reference = reference_for(manifest, classes)
    drift = None
    if reference is not None and rows:
        drift = {
            "class": class_psi(reference, class_counts),
            "confidence": confidence_psi(reference, bin_counts),
        }
    named: dict[str, int] = {}
    for name, count in zip(named_classes(manifest.labels, most_classes), class_counts.tolist(), strict=True):
        named[name] = named.get(name, 0) + count
    if OTHER in named:
        named[OTHER] = named.pop(OTHER)  # last, even if a label is "other" itself
    return PredictionSummary(
        model=manifest.name, version=manifest.version, rows=rows, errors=errors,
        prediction_classes=most_classes, classes=named, confidence_edges=CONFIDENCE_EDGES,
        confidence_counts=tuple(bin_counts.tolist()), drift=drift,
    )  # fmt: skip
