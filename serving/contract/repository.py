"""Read a Triton-style model repository (torch-free).

Layout::

    <repo>/<model>/config.pbtxt          Triton config for the ONNX FP32 artefact
    <repo>/<model>/labels.txt
    <repo>/<model>/<version>/kiln.json   + the artefacts it lists (model.onnx, model.plan, ...)

Only positive integer folder names written canonically ("3", not "03") are versions; anything
else (``.tmp-*`` folders of an unfinished export, notes) is ignored. Problems are collected per
model and per version, so one broken version never hides the others. Writing lives in
serving.contract.publish (re-exported here as ``publish_version``).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from serving.contract.manifest import (
    MANIFEST_FILENAME,
    Manifest,
    ManifestError,
    read_manifest,
    verify_artefacts,
)
from serving.contract.publish import PublishedVersion, publish_version
from serving.contract.repo_layout import (
    TEMP_PREFIX,
    ModelNotFound,
    RepositoryError,
    VersionNotFound,
    VersionUnavailable,
    check_model_name,
    list_versions,
    parse_version_dir,
)
from serving.contract.version_policy import VersionPolicy

DEFAULT_POLICY = VersionPolicy.latest(1)  # Triton's default version_policy


@dataclass(frozen=True, kw_only=True)
class VersionStatus:
    """One version as found on disk: its manifest, or why it cannot be served."""

    model: str
    version: int
    path: Path
    manifest: Manifest | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when kiln.json was read and matches its folder (checksums are checked at resolve)."""
        return self.error is None


@dataclass(frozen=True, kw_only=True)
class ModelStatus:
    """One model folder: the versions its policy selects, with per-version status."""

    name: str
    path: Path
    available: tuple[int, ...]  # every version folder present
    versions: tuple[VersionStatus, ...]  # those the policy selects (plus missing specific ones)
    error: str | None = None  # model-level problem (no versions, nothing selected)

    @property
    def ready(self) -> tuple[VersionStatus, ...]:
        """Selected versions whose manifest is fine."""
        return tuple(v for v in self.versions if v.ok)


@dataclass(frozen=True, kw_only=True)
class ResolvedVersion:
    """A version ready to load: manifest read and the requested artefacts' sha256 verified."""

    model: str
    version: int
    path: Path
    manifest: Manifest
    verified: tuple[str, ...]  # artefact paths whose size and sha256 were checked


class ModelRepository:
    """Read-only view of a model repository folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise RepositoryError(f"model repository {self.root} does not exist")
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a directory (it is a file)")

    def model_names(self) -> list[str]:
        """Sorted model folder names (hidden entries and plain files skipped)."""
        return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))

    def model_dir(self, model: str) -> Path:
        """The folder of `model` (ModelNotFound if absent)."""
        path = self.root / check_model_name(model)
        if not path.is_dir():
            raise ModelNotFound(f"model {model!r} not found in {self.root}; have {self.model_names()}")
        return path

    def versions(self, model: str) -> list[int]:
        """All version numbers of `model` present on disk."""
        return list_versions(self.model_dir(model))

    def read_version(self, model: str, version: int) -> VersionStatus:
        """Read and check one version's kiln.json; problems go into the status, not exceptions."""
        path = self.model_dir(model) / str(version)
        if not path.is_dir():
            return VersionStatus(model=model, version=version, path=path, manifest=None, error="not found")
        try:
            manifest = read_manifest(path / MANIFEST_FILENAME)
        except ManifestError as exc:
            return VersionStatus(model=model, version=version, path=path, manifest=None, error=str(exc))
        error = None
        if manifest.name != model:
            error = f"kiln.json names model {manifest.name!r} but the folder is {model!r}"
        elif manifest.version != version:
            error = f"kiln.json says version {manifest.version} but the folder is {version}"
        return VersionStatus(model=model, version=version, path=path, manifest=manifest, error=error)

    def scan_model(self, model: str, policy: VersionPolicy = DEFAULT_POLICY) -> ModelStatus:
        """Status of one model under `policy` (a bad model name or empty folder is a status)."""
        path = self.root / model
        try:
            available = tuple(self.versions(model))
        except (RepositoryError, OSError) as exc:
            return ModelStatus(name=model, path=path, available=(), versions=(), error=str(exc))
        wanted = set(policy.select(available))
        if policy.kind == "specific":
            wanted |= set(policy.versions)  # missing ones are reported, not silently dropped
        statuses = tuple(self.read_version(model, v) for v in sorted(wanted))
        error = None
        if not available:
            error = f"no version folders in {path}"
        elif not statuses:
            error = f"version policy {policy} selects none of {list(available)}"
        return ModelStatus(name=model, path=path, available=available, versions=statuses, error=error)

    def resolve(
        self,
        model: str,
        version: int | None = None,
        *,
        policy: VersionPolicy = DEFAULT_POLICY,
        artefacts: Collection[str] | None = None,
    ) -> ResolvedVersion:
        """Pick a version for loading and verify its artefacts' sha256 (all, or `artefacts`).

        `version=None` takes the highest version the policy selects. Raises ModelNotFound,
        VersionNotFound, or VersionUnavailable with the reason (bad kiln.json, checksum mismatch).
        """
        available = self.versions(model)
        selected = policy.select(available)
        if version is None:
            if not selected:
                raise VersionNotFound(f"model {model!r}: policy {policy} selects none of {available}")
            version = selected[-1]
        elif version not in selected:
            raise VersionNotFound(
                f"model {model!r} version {version} not available (present {available}, policy {policy})"
            )
        status = self.read_version(model, version)
        if not status.ok or status.manifest is None:
            raise VersionUnavailable(f"model {model!r} version {version}: {status.error}")
        try:
            verify_artefacts(status.manifest, status.path, only=artefacts)
        except ManifestError as exc:
            raise VersionUnavailable(f"model {model!r} version {version}: {exc}") from exc
        paths = tuple(a.path for a in status.manifest.artefacts) if artefacts is None else tuple(artefacts)
        return ResolvedVersion(
            model=model, version=version, path=status.path, manifest=status.manifest, verified=paths
        )


__all__ = [
    "TEMP_PREFIX",
    "ModelNotFound",
    "ModelRepository",
    "ModelStatus",
    "PublishedVersion",
    "RepositoryError",
    "ResolvedVersion",
    "VersionNotFound",
    "VersionPolicy",
    "VersionStatus",
    "VersionUnavailable",
    "check_model_name",
    "list_versions",
    "parse_version_dir",
    "publish_version",
]
