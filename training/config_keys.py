"""The one key check of the training stage's JSON-able configs (`from_dict` of DataSpec,
ModelConfig, TrainConfig): a JSON object whose keys are all fields of the dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any


def checked_keys(
    cls: type, data: object, what: str, error: type[Exception], *, name_known: bool = False
) -> dict[str, Any]:
    """`data` itself when it is a dict of `cls`'s field names; else `error` naming `what` and the
    unknown keys (and, with `name_known`, the known ones)."""
    if not isinstance(data, dict):
        raise error(f"a {what} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        known_part = f"; known: {', '.join(sorted(known))}" if name_known else ""
        raise error(f"unknown {what} keys: {', '.join(unknown)}{known_part}")
    return data
