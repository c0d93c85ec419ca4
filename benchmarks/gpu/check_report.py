"""results.md of the GPU check: the engine table per model and the served table, from results.json."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _engine(rows: list[dict]) -> list[str]:
    lines = []
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)
    for model, model_rows in by_model.items():
        labels = list(dict.fromkeys(r["variant"] for r in model_rows))
        batches = sorted({r["batch"] for r in model_rows if "batch" in r})
        cell = {(r["variant"], r.get("batch")): r for r in model_rows}
        lines += [f"\n### {model}: engine images/s (p99 ms per batch), host arrays in and out\n"]
        lines += ["| batch | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for batch in batches:
            row = [_engine_cell(cell.get((label, batch))) for label in labels]
            lines.append(f"| {batch} | " + " | ".join(row) + " |")
        lines += [f"- {r['variant']}: {r['error']}" for r in model_rows if "error" in r]
    return lines


def _engine_cell(row: dict | None) -> str:
    return "-" if row is None else f"{row['images_per_s']:,.0f} ({row['p99_ms']:.2f})"


def _served(rows: list[dict]) -> list[str]:
    lines = ["\n### served (perf_analyzer, gRPC, batch 1 per request)\n"]
    lines += ["| model | mode | concurrency | infer/s | p50 ms | p99 ms | queue ms | compute ms |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('mode', '-')} | error: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['concurrency']} | {r['throughput']:,.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['queue_ms']:.2f} | {r['compute_ms']:.2f} |"
        )
    return lines


def write_markdown(data: dict, path: Path) -> None:
    """The tables of `data` (results.json's content) into `path`."""
    head = ["## GPU check", "", "```", json.dumps(data["timing"], indent=1), "```"]
    path.write_text("\n".join([*head, *_engine(data["engine"]), *_served(data["served"])]) + "\n")
