"""Where a run came from: git commit, library versions, timestamps."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path

_SOURCE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str:
    """One git command's stdout in the source tree, stripped (raises when git cannot answer)."""
    return subprocess.run(
        ["git", *args], cwd=_SOURCE_DIR, capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()


def git_commit() -> str:
    """The commit of the source tree this code runs from ("unknown" outside git; "+dirty" marks edits)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(*packages: str) -> dict[str, str | None]:
    """Python and the named packages' versions, for run/manifest provenance."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("kiln-serve", *packages):
        found[name] = package_version(name)
    return found


def utc_now() -> str:
    """An ISO-8601 UTC timestamp with seconds precision."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
