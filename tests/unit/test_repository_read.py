"""Reading a model repository: listing, version policies, broken versions beside good ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.contract.manifest import Manifest, write_manifest
from serving.contract.repository import (
    ModelNotFound,
    ModelRepository,
    RepositoryError,
    VersionNotFound,
    VersionPolicy,
    VersionUnavailable,
    check_model_name,
)
from serving.contract.version_policy import VersionPolicyError
from tests.unit.test_manifest_schema import make_manifest


def _version(repo: Path, model: str, version: int) -> Manifest:
    folder = repo / model / str(version)
    folder.mkdir(parents=True)
    manifest = make_manifest(folder, name=model, version=version)
    write_manifest(manifest, folder / "kiln.json")
    return manifest


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for v in (1, 2, 3, 10):
        _version(root, "digits", v)
    _version(root, "other", 1)
    (root / "digits" / ".tmp-deadbeef").mkdir()  # unfinished export
    (root / "digits" / "notes").mkdir()
    (root / "digits" / "04").mkdir()  # not canonical: ignored, never confused with 4
    (root / "digits" / "7").write_text("a file, not a version")
    (root / ".hidden").mkdir()
    (root / "README.txt").write_text("not a model")
    return root


def test_lists_models_and_numeric_versions(repo: Path) -> None:
    reader = ModelRepository(repo)
    assert reader.model_names() == ["digits", "other"]
    assert reader.versions("digits") == [1, 2, 3, 10]  # numeric order, not "10" < "2"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (VersionPolicy.latest(), (10,)),
        (VersionPolicy.latest(2), (3, 10)),
        (VersionPolicy.latest(9), (1, 2, 3, 10)),
        (VersionPolicy.all(), (1, 2, 3, 10)),
        (VersionPolicy.specific(2, 1), (1, 2)),
    ],
)
def test_version_policies(repo: Path, policy: VersionPolicy, expected: tuple[int, ...]) -> None:
    status = ModelRepository(repo).scan_model("digits", policy)
    assert tuple(v.version for v in status.versions) == expected
    assert all(v.ok for v in status.versions) and status.error is None


def test_policy_parse_round_trip() -> None:
    for text in ("latest:1", "latest:3", "all", "specific:1,4"):
        assert str(VersionPolicy.parse(text)) == text
    assert VersionPolicy.parse("latest") == VersionPolicy.latest(1)
    for bad in ("newest", "latest:0", "latest:x", "specific:", "specific:0", "all:2"):
        with pytest.raises(VersionPolicyError, match=r"version policy|>= 1|integers"):
            VersionPolicy.parse(bad)


def test_specific_missing_version_is_reported(repo: Path) -> None:
    status = ModelRepository(repo).scan_model("digits", VersionPolicy.specific(2, 5))
    by_version = {v.version: v for v in status.versions}
    assert by_version[2].ok and by_version[5].error == "not found"


def test_broken_version_next_to_good_ones(repo: Path) -> None:
    (repo / "digits" / "2" / "kiln.json").write_text("{ truncated")
    manifest_3 = (repo / "digits" / "3" / "kiln.json").read_text()
    (repo / "digits" / "3" / "kiln.json").write_text(manifest_3.replace('"version": 3', '"version": 4'))
    (repo / "bad name").mkdir()
    (repo / "empty").mkdir()
    reader = ModelRepository(repo)
    statuses = {name: reader.scan_model(name, VersionPolicy.all()) for name in reader.model_names()}
    digits = {v.version: v for v in statuses["digits"].versions}
    assert digits[1].ok and digits[10].ok
    assert "unreadable manifest" in (digits[2].error or "")
    assert "says version 4 but the folder is 3" in (digits[3].error or "")
    assert [v.version for v in statuses["digits"].ready] == [1, 10]
    assert statuses["other"].ready and statuses["other"].error is None
    assert "invalid model name" in (statuses["bad name"].error or "")
    assert "no version folders" in (statuses["empty"].error or "")


def test_resolve_verifies_sha256_before_returning(repo: Path) -> None:
    reader = ModelRepository(repo)
    resolved = reader.resolve("digits")
    assert resolved.version == 10 and resolved.verified == ("model.onnx",)
    assert reader.resolve("digits", 2, policy=VersionPolicy.all()).version == 2
    (repo / "digits" / "10" / "model.onnx").write_bytes(b"tampered bytes of equal-ish size")
    with pytest.raises(
        VersionUnavailable, match=r"'digits' version 10: artefact model.onnx: (size|sha256) mismatch"
    ):
        reader.resolve("digits")


def test_resolve_errors(repo: Path) -> None:
    reader = ModelRepository(repo)
    with pytest.raises(ModelNotFound, match="'nope' not found"):
        reader.resolve("nope")
    with pytest.raises(VersionNotFound, match="version 2 not available"):
        reader.resolve("digits", 2)  # present, but latest:1 does not select it
    with pytest.raises(RepositoryError, match="invalid model name"):
        reader.resolve("../digits")


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", "a..b", "", "-x", "é"])
def test_model_name_validation(name: str) -> None:
    with pytest.raises(RepositoryError, match="invalid model name"):
        check_model_name(name)


def test_repository_path_checks(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        ModelRepository(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RepositoryError, match="is not a directory"):
        ModelRepository(tmp_path / "file")
