"""Strict field checks shared by the kiln.json dataclasses (serving.contract.manifest), and
`JsonMixin`, their one to_dict / strict from_dict (nested records parsed from a `_nested` table).

Every check names the offending field and value, so a bad manifest produces one clear line such
as ``artefacts[0].sha256: expected 64 lowercase hex characters, got 'abc'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, ClassVar, NoReturn, TypeVar

T = TypeVar("T")


class ManifestError(ValueError):
    """A kiln.json (or artefact) problem.

    `field` is the dotted path of the bad field (``artefacts[0].sha256``), `source` the file it
    came from; both optional and both part of the message.
    """

    def __init__(self, detail: str, *, field: str | None = None, source: str | None = None) -> None:
        self.detail, self.field, self.source = detail, field, source
        parts = [p for p in (source, field, detail) if p]
        super().__init__(": ".join(parts))


def fail(field: str, detail: str) -> NoReturn:
    """Raise a ManifestError for `field`."""
    raise ManifestError(detail, field=field)


@contextlib.contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Re-raise ManifestErrors from the block with `prefix` prepended to their field path."""
    try:
        yield
    except ManifestError as exc:
        if exc.field is None:
            field = prefix
        elif exc.field.startswith("["):
            field = prefix + exc.field
        else:
            field = f"{prefix}.{exc.field}"
        raise ManifestError(exc.detail, field=field) from None


def check_keys(data: Any, cls: type, *, extra: Collection[str] = ()) -> None:
    """Require `data` to be a dict with every required field of dataclass `cls` and nothing else."""
    if not isinstance(data, dict):
        raise ManifestError(f"expected an object, got {type(data).__name__} {data!r:.60}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields} | set(extra)
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ManifestError(f"unknown key(s) {unknown}; allowed: {sorted(names)}")
    missing = sorted(required - set(data))
    if missing:
        raise ManifestError(f"missing required key(s) {missing}")


def as_str(value: Any, field: str, *, empty_ok: bool = False) -> str:
    """A string (non-empty unless `empty_ok`)."""
    if not isinstance(value, str):
        fail(field, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not value and not empty_ok:
        fail(field, "must not be empty")
    return value


def as_choice(value: Any, field: str, choices: Collection[str]) -> str:
    """One of `choices`."""
    if value not in choices:
        fail(field, f"expected one of {sorted(choices)}, got {value!r:.60}")
    return value


def as_bool(value: Any, field: str) -> bool:
    """A real bool (1/0 and strings are refused)."""
    if not isinstance(value, bool):
        fail(field, f"expected true/false, got {value!r:.60}")
    return value


def as_int(value: Any, field: str, *, minimum: int | None = None) -> int:
    """An int (bools refused), optionally >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(field, f"expected an integer, got {type(value).__name__} {value!r:.60}")
    if minimum is not None and value < minimum:
        fail(field, f"must be >= {minimum}, got {value}")
    return value


def as_float(value: Any, field: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite number (ints accepted, bools refused), optionally within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(field, f"expected a number, got {type(value).__name__} {value!r:.60}")
    number = float(value)
    if not math.isfinite(number):
        fail(field, f"must be finite, got {number}")
    if minimum is not None and number < minimum:
        fail(field, f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        fail(field, f"must be <= {maximum}, got {number}")
    return number


def as_optional(value: Any, field: str, check: Callable[..., T], **kwargs: Any) -> T | None:
    """None, or whatever `check` accepts."""
    return None if value is None else check(value, field, **kwargs)


def as_tuple(value: Any, field: str, check: Callable[..., T], **kwargs: Any) -> tuple[T, ...]:
    """A list/tuple whose items each pass `check` (items named field[i])."""
    if not isinstance(value, list | tuple):
        fail(field, f"expected a list, got {type(value).__name__} {value!r:.60}")
    return tuple(check(item, f"{field}[{i}]", **kwargs) for i, item in enumerate(value))


def as_json_dict(value: Any, field: str) -> dict[str, Any]:
    """A dict with string keys whose values are JSON-serialisable (checked recursively)."""
    if not isinstance(value, Mapping):
        fail(field, f"expected an object, got {type(value).__name__} {value!r:.60}")
    result: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            fail(field, f"keys must be strings, got {key!r}")
        result[key] = _json_value(item, f"{field}.{key}")
    return result


def _json_value(value: Any, field: str) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return as_float(value, field)
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return as_json_dict(value, field)
    fail(field, f"not JSON-serialisable: {type(value).__name__}")


def setattrs(obj: object, **values: Any) -> None:
    """Store normalised values on a frozen dataclass from its __post_init__."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def parse_nested(data: dict[str, Any], key: str, cls: type, *, optional: bool = False) -> Any:
    """Build nested dataclass `cls` from data[key], prefixing errors with the key."""
    value = data.get(key)
    if value is None and optional:
        return None
    with prefixed(key):
        return cls.from_dict(value)


def parse_list(data: dict[str, Any], key: str, cls: type) -> tuple[Any, ...]:
    """Build a tuple of `cls` from the list data[key], naming errors key[i]."""
    items = data[key]
    if not isinstance(items, list):
        fail(key, f"expected a list, got {type(items).__name__}")
    result = []
    for i, item in enumerate(items):
        with prefixed(f"{key}[{i}]"):
            result.append(cls.from_dict(item))
    return tuple(result)


class JsonMixin:
    """Mixin: to_dict / strict from_dict for dataclasses whose nested records are optional fields
    named in `_nested` (field name -> dataclass; None when absent)."""

    _nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Strictly parse a dict produced by to_dict (or read from kiln.json)."""
        check_keys(data, cls)
        nested = cls._nested_types(data)
        return cls(**data | {key: parse_nested(data, key, t, optional=True) for key, t in nested.items()})

    @classmethod
    def _nested_types(cls, data: dict[str, Any]) -> dict[str, type]:
        """The nested records `from_dict` parses (a class whose types depend on data overrides)."""
        return cls._nested

    def _check_nested(self) -> None:
        """Each nested record is None or an instance of its `_nested` type."""
        for key, kind in self._nested.items():
            value = getattr(self, key)
            if value is not None and not isinstance(value, kind):
                fail(key, f"expected {kind.__name__}, got {type(value).__name__}")
