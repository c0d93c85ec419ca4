"""Publish a model version into a repository atomically (used by `kiln export`; torch-free).

The version is assembled in ``<repo>/<model>/.tmp-<uuid>/`` (which readers ignore), checked
(every file listed in kiln.json with the right sha256, nothing unlisted, parity passed or
forced), fsynced, then renamed to ``<repo>/<model>/<version>/`` in one step. Any exception,
including one raised by the caller's populate step, removes the temp folder: a crash never
leaves a half version. The model-level config.pbtxt and labels.txt are then replaced atomically,
but only when the new version is the newest (publishing an old version number keeps the files
that describe the newest one).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.contract.fileio import atomic_write_text, fsync_dir
from serving.contract.manifest import MANIFEST_FILENAME, Manifest, verify_artefacts, write_manifest
from serving.contract.repo_layout import TEMP_PREFIX, RepositoryError, check_model_name, list_versions
from serving.contract.triton_config import CONFIG_FILENAME, LABELS_FILENAME, render_config, render_labels

STALE_TEMP_AGE_S = 24 * 3600  # an export never takes a day; older temp folders are crash leftovers

Populate = Callable[[Path, int], Manifest]


@dataclass(frozen=True, kw_only=True)
class PublishedVersion:
    """Where a version was published and what kiln.json says about it."""

    model: str
    version: int
    path: Path
    manifest: Manifest


def ensure_repo_root(repo: str | os.PathLike[str]) -> Path:
    """Create the repository folder if needed; refuse a path that is a file."""
    root = Path(repo)
    if root.exists() and not root.is_dir():
        raise RepositoryError(f"model repository {root} is a file, not a directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


def remove_stale_temp_dirs(model_dir: Path, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete `.tmp-*` folders older than `max_age_s` (left by killed exports); return them."""
    removed = []
    now = time.time()
    for entry in model_dir.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_dir() and now - entry.stat().st_mtime > max_age_s:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def publish_version(
    repo: str | os.PathLike[str],
    model: str,
    populate: Populate,
    *,
    version: int | None = None,
    config_pbtxt: str | None = None,
) -> PublishedVersion:
    """Publish one version of `model` atomically and return where it went.

    `populate(tmp_dir, version)` writes the artefact files into `tmp_dir` and returns their
    Manifest (name == model, version == the number it was given; build entries with
    ``Artefact.from_file(tmp_dir, ...)``). `version=None` takes max existing + 1. kiln.json is
    written here. `config_pbtxt` overrides the rendered Triton config (default:
    ``render_config(manifest)``).
    """
    model_dir = ensure_repo_root(repo) / check_model_name(model)
    if model_dir.exists() and not model_dir.is_dir():
        raise RepositoryError(f"{model_dir} is a file, not a model folder")
    model_dir.mkdir(exist_ok=True)
    remove_stale_temp_dirs(model_dir)
    existing = list_versions(model_dir)
    if version is None:
        version = max(existing, default=0) + 1
    elif isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepositoryError(f"version must be an integer >= 1, got {version!r}")
    elif version in existing:
        raise RepositoryError(f"{model} version {version} already exists in {model_dir}")
    tmp = model_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    final = model_dir / str(version)
    try:
        manifest = populate(tmp, version)
        _check_populated(manifest, model, version, tmp)
        config_text = config_pbtxt if config_pbtxt is not None else render_config(manifest)
        labels_text = render_labels(manifest)
        write_manifest(manifest, tmp / MANIFEST_FILENAME)
        _fsync_tree(tmp)
        _rename_version(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(model_dir)
    if version == max(list_versions(model_dir)):
        atomic_write_text(model_dir / LABELS_FILENAME, labels_text)
        atomic_write_text(model_dir / CONFIG_FILENAME, config_text)
    return PublishedVersion(model=model, version=version, path=final, manifest=manifest)


def _check_populated(manifest: Manifest, model: str, version: int, tmp: Path) -> None:
    """Refuse a version whose manifest and files disagree before anything becomes visible."""
    if not isinstance(manifest, Manifest):
        raise RepositoryError(f"populate must return a Manifest, got {type(manifest).__name__}")
    if manifest.name != model or manifest.version != version:
        raise RepositoryError(
            f"manifest says {manifest.name!r} version {manifest.version}, "
            f"but this publishes {model!r} version {version}"
        )
    listed = {a.path for a in manifest.artefacts}
    present = set()
    for path in tmp.rglob("*"):
        if path.is_symlink():
            raise RepositoryError(f"refusing to publish a symlink: {path.relative_to(tmp)}")
        if path.is_file():
            present.add(path.relative_to(tmp).as_posix())
    unlisted = sorted(present - listed - {MANIFEST_FILENAME})
    if unlisted:
        raise RepositoryError(f"files not listed in kiln.json (every file needs a sha256): {unlisted}")
    refused = [a.path for a in manifest.artefacts if not a.publishable]
    if refused:
        raise RepositoryError(f"artefacts failed their parity gate and were not forced: {refused}")
    verify_artefacts(manifest, tmp)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder so the rename publishes durable contents."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fsync_dir(path)
    fsync_dir(root)


def _rename_version(tmp: Path, final: Path) -> None:
    """Move the finished folder into place; never replace an existing version."""
    if final.exists():
        raise RepositoryError(f"{final} appeared while publishing (a concurrent export?)")
    try:
        os.rename(tmp, final)  # atomic on one filesystem; fails on a non-empty target
    except OSError as exc:
        raise RepositoryError(f"cannot publish {final}: {exc}") from exc
