"""Publishing versions: auto-increment, atomicity on failure, model-level files, refusals."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from google.protobuf import text_format

from protos.inference import model_config_pb2 as mc
from serving.contract.manifest import Manifest, ManifestError, read_manifest, sha256_file
from serving.contract.publish import remove_stale_temp_dirs
from serving.contract.repository import ModelRepository, RepositoryError, publish_version
from tests.unit.test_manifest_schema import make_manifest, make_parity


def _populate(tmp: Path, version: int) -> Manifest:
    (tmp / "model.onnx").write_bytes(f"onnx v{version}".encode())
    return make_manifest(tmp, version=version)


def _entries(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir())


def test_auto_increment_and_layout(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = publish_version(repo, "digits", _populate)
    second = publish_version(repo, "digits", _populate)
    assert (first.version, second.version) == (1, 2)
    model_dir = repo / "digits"
    assert _entries(model_dir) == ["1", "2", "config.pbtxt", "labels.txt"]
    assert _entries(model_dir / "2") == ["kiln.json", "model.onnx"]
    on_disk = read_manifest(model_dir / "2" / "kiln.json")
    assert on_disk == second.manifest and on_disk.version == 2
    assert on_disk.artefacts[0].sha256 == sha256_file(model_dir / "2" / "model.onnx")
    assert (model_dir / "labels.txt").read_text().splitlines() == list(on_disk.labels)
    written = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert written.name == "digits" and written.default_model_filename == "model.onnx"
    assert ModelRepository(repo).resolve("digits").version == 2
    assert (model_dir / "2" / "kiln.json").stat().st_mode & 0o044 == 0o044  # readable by the server user


def test_explicit_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert publish_version(repo, "digits", _populate, version=5).version == 5
    assert publish_version(repo, "digits", _populate).version == 6
    with pytest.raises(RepositoryError, match="version 5 already exists"):
        publish_version(repo, "digits", _populate, version=5)
    with pytest.raises(RepositoryError, match="integer >= 1"):
        publish_version(repo, "digits", _populate, version=0)


def test_older_version_keeps_newest_model_files(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, "digits", _populate, version=3, config_pbtxt='name: "digits"\n# newest\n')
    publish_version(repo, "digits", _populate, version=1, config_pbtxt='name: "digits"\n# old\n')
    assert "# newest" in (repo / "digits" / "config.pbtxt").read_text()


def test_failure_inside_populate_leaves_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, "digits", _populate)
    before = {p: p.read_bytes() for p in (repo / "digits").glob("*.*")}

    def crash(tmp: Path, version: int) -> Manifest:
        (tmp / "model.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt  # even a BaseException cleans up

    with pytest.raises(KeyboardInterrupt):
        publish_version(repo, "digits", crash)
    assert _entries(repo / "digits") == ["1", "config.pbtxt", "labels.txt"]
    assert {p: p.read_bytes() for p in (repo / "digits").glob("*.*")} == before
    assert publish_version(repo, "digits", _populate).version == 2


@pytest.mark.parametrize(
    ("populate", "match"),
    [
        (lambda tmp, v: make_manifest(tmp, version=v + 1), "this publishes 'digits' version 1"),
        (lambda tmp, v: make_manifest(tmp, name="other", version=v), "'other'"),
        (lambda tmp, v: (make_manifest(tmp, version=v), (tmp / "extra.bin").write_bytes(b"x"))[0],
         r"not listed in kiln.json.*extra.bin"),
        (lambda tmp, v: "not a manifest", "must return a Manifest"),
    ],
)  # fmt: skip
def test_bad_populate_results_refused(tmp_path: Path, populate, match: str) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    with pytest.raises(RepositoryError, match=match):
        publish_version(repo, "digits", populate)
    assert _entries(repo / "digits") == []


def test_checksum_mismatch_refused(tmp_path: Path) -> None:
    def stale(tmp: Path, version: int) -> Manifest:
        manifest = _populate(tmp, version)
        (tmp / "model.onnx").write_bytes(b"changed after hashing")
        return manifest

    with pytest.raises(ManifestError, match=r"model\.onnx: size mismatch"):
        publish_version(tmp_path / "repo", "digits", stale)
    assert _entries(tmp_path / "repo" / "digits") == []


def test_failed_parity_refused_unless_forced(tmp_path: Path) -> None:
    def gated(forced: bool):  # type: ignore[no-untyped-def]
        def populate(tmp: Path, version: int) -> Manifest:
            manifest = _populate(tmp, version)
            art = manifest.artefacts[0]
            parity = make_parity(top1_agreement=0.5, passed=False, forced=forced)
            return Manifest(
                **{**manifest.__dict__, "artefacts": (type(art)(**{**art.__dict__, "parity": parity}),)}
            )

        return populate

    repo = tmp_path / "repo"
    with pytest.raises(RepositoryError, match="failed their parity gate"):
        publish_version(repo, "digits", gated(forced=False))
    published = publish_version(repo, "digits", gated(forced=True))
    assert published.version == 1 and published.manifest.artefacts[0].parity.forced  # type: ignore[union-attr]


def test_repo_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "repo"
    target.write_text("oops")
    with pytest.raises(RepositoryError, match="is a file"):
        publish_version(target, "digits", _populate)
    with pytest.raises(RepositoryError, match="invalid model name"):
        publish_version(tmp_path / "ok", "../escape", _populate)
    assert not (tmp_path / "escape").exists()


def test_stale_temp_dirs_removed(tmp_path: Path) -> None:
    model_dir = tmp_path / "digits"
    old, fresh = model_dir / ".tmp-old", model_dir / ".tmp-fresh"
    old.mkdir(parents=True)
    fresh.mkdir()
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (day_ago, day_ago))
    assert remove_stale_temp_dirs(model_dir) == [old]
    assert _entries(model_dir) == [".tmp-fresh"]
