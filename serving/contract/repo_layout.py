"""Model repository naming rules shared by the reader (serving.contract.repository) and the writer
(serving.contract.publish): safe model names, version folder names, temp folders, errors.
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.contract.manifest import MODEL_NAME_RE
from serving.errors import KilnError, ModelNotFoundError, ModelUnavailableError

TEMP_PREFIX = ".tmp-"


class RepositoryError(KilnError, ValueError):
    """A repository-level problem (bad path, bad model name, unknown model or version).

    Kiln's own errors, so whoever loads (the server, `kiln score`) maps them like any other:
    FAILED_PRECONDITION, NOT_FOUND for an unknown model or version, UNAVAILABLE for a broken one.
    """

    code = "FAILED_PRECONDITION"


class ModelNotFound(ModelNotFoundError, RepositoryError, LookupError):
    """No such model in the repository."""


class VersionNotFound(ModelNotFoundError, RepositoryError, LookupError):
    """No such version of the model (or not selected by the policy)."""


class VersionUnavailable(ModelUnavailableError, RepositoryError):
    """The version exists but cannot be served (bad kiln.json, checksum mismatch...)."""


def check_model_name(name: str) -> str:
    """Return `name` if it is a safe model folder name, else raise RepositoryError."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, no '..')"
        )
    return name


def parse_version_dir(name: str) -> int | None:
    """The version number a folder name denotes, or None when it is not a version folder."""
    if name.isascii() and name.isdigit() and name == str(int(name)) and int(name) > 0:
        return int(name)
    return None


def list_versions(model_dir: Path) -> list[int]:
    """Sorted version numbers present under `model_dir` (folders only)."""
    found = []
    for entry in os.scandir(model_dir):
        version = parse_version_dir(entry.name)
        if version is not None and entry.is_dir():
            found.append(version)
    return sorted(found)
