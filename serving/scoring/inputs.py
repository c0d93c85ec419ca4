"""The input list of a scoring job: a directory, a glob, or a Parquet/CSV manifest of paths.

The list is sorted by id so that shard `i` always holds the same inputs (see serving.scoring.ledger),
and fingerprinted (sha256 over every id and path) so a rerun can prove it scores the same inputs.

- Directory: every regular file below it (recursively, hidden entries skipped); the id is the
  path relative to the directory (portable across mount points). Non-images stay in the list:
  they become error rows, never silently vanish.
- Glob (``**`` allowed): the matching regular files; the id is the path as matched.
- Manifest (``.parquet`` / ``.csv``): a ``path`` column (required) and an ``id`` column
  (optional, unique; default: the path value). Relative paths are relative to the manifest's
  folder. Files missing on disk stay in the list (they become error rows).

The paths used for reading are absolute, so the job does not depend on the working directory.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["InputError", "InputList", "list_inputs"]

MANIFEST_SUFFIXES = (".parquet", ".csv")


class InputError(ValueError):
    """The input specification cannot be turned into a list of inputs (names the bad value)."""


@dataclass(frozen=True, eq=False)
class InputList:
    """Inputs sorted by id: ids[i] and paths[i] describe row i of the job."""

    ids: list[str]
    paths: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        """sha256 over the (id, path) pairs in order: equal lists, equal fingerprints."""
        digest = hashlib.sha256(f"kiln-score-inputs-v1\n{len(self.ids)}\n".encode())
        for ident, path in zip(self.ids, self.paths, strict=True):
            digest.update(f"{ident}\0{path}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def list_inputs(spec: str) -> InputList:
    """Expand `spec` (directory, glob, manifest.parquet or manifest.csv) into a sorted InputList.

    Raises InputError when nothing matches, a manifest lacks a `path` column or has duplicate
    ids, or a path is empty.
    """
    if not spec:
        raise InputError("--input is empty")
    path = Path(spec)
    if path.is_dir():
        pairs = _from_directory(path)
    elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
        pairs = _from_manifest(path)
    elif path.suffix.lower() in MANIFEST_SUFFIXES and not glob.has_magic(spec):
        raise InputError(f"manifest {spec} does not exist")
    else:
        pairs = _from_glob(spec)
    if not pairs:
        raise InputError(f"no inputs found in {spec!r}")
    pairs.sort(key=lambda pair: pair[0])
    return InputList(ids=[p[0] for p in pairs], paths=[p[1] for p in pairs], source=spec)


def _from_directory(root: Path) -> list[tuple[str, str]]:
    pairs = []
    base = os.path.abspath(root)
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            if os.path.isfile(full):
                pairs.append((Path(os.path.relpath(full, base)).as_posix(), full))
    return pairs


def _from_glob(pattern: str) -> list[tuple[str, str]]:
    if not glob.has_magic(pattern) and not os.path.exists(pattern):
        raise InputError(f"input {pattern} does not exist (expected a directory, glob or manifest)")
    matches = glob.glob(pattern, recursive=True)
    return [(m, os.path.abspath(m)) for m in matches if os.path.isfile(m)]


def _from_manifest(path: Path) -> list[tuple[str, str]]:
    columns = _read_csv(path) if path.suffix.lower() == ".csv" else _read_parquet(path)
    if "path" not in columns:
        raise InputError(f"manifest {path} has no 'path' column (columns: {sorted(columns)})")
    paths = columns["path"]
    ids = columns.get("id", paths)
    base = path.resolve().parent
    pairs = []
    for row, (ident, value) in enumerate(zip(ids, paths, strict=True)):
        if value is None or str(value).strip() == "":
            raise InputError(f"manifest {path} row {row}: empty 'path'")
        if ident is None or str(ident) == "":
            raise InputError(f"manifest {path} row {row}: empty 'id'")
        pairs.append((str(ident), os.path.normpath(base / os.path.expanduser(str(value)))))
    _check_unique_ids(path, (p[0] for p in pairs))
    return pairs


def _check_unique_ids(path: Path, ids: Iterable[str]) -> None:
    counts = Counter(ids)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise InputError(
            f"manifest {path}: ids must be unique, {len(dupes)} repeated (e.g. {dupes[:3]}); "
            "add a unique 'id' column"
        )


def _read_csv(path: Path) -> dict[str, list[str | None]]:
    """Columns of a CSV with a header row, every value a string (ids like "007" stay strings)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise InputError(f"manifest {path} is empty (expected a header with a 'path' column)")
            names = [n.strip() for n in reader.fieldnames]
            wanted = [n for n in ("path", "id") if n in names]
            columns: dict[str, list[str | None]] = {n: [] for n in names if n in wanted}
            if "path" not in columns:
                return {n: [] for n in names}
            for record in reader:
                row = {k.strip(): v for k, v in record.items() if k is not None}
                for name in wanted:
                    columns[name].append(row.get(name))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    return columns


def _read_parquet(path: Path) -> dict[str, list[str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    if "path" not in schema.names:
        return {n: [] for n in schema.names}
    wanted = [n for n in ("path", "id") if n in schema.names]
    for name in wanted:
        kind = schema.field(name).type
        ok = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if not ok and not (name == "id" and pa.types.is_integer(kind)):
            raise InputError(f"manifest {path}: column {name!r} must hold strings, it holds {kind}")
    table = pq.read_table(path, columns=wanted)
    columns: dict[str, list[str | None]] = {}
    for name in wanted:
        values = table.column(name).to_pylist()
        columns[name] = [None if v is None else str(v) for v in values]
    return columns
