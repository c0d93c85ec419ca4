"""Input listing for `kiln score`: directories, globs, CSV/Parquet manifests, fingerprints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.scoring.inputs import InputError, list_inputs


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for name in ("b/2.png", "a/1.jpg", "c.txt", ".hidden.png", ".git/x.png", "b/.cache"):
        _touch(tmp_path / "in" / name)
    inputs = list_inputs(str(tmp_path / "in"))
    assert inputs.ids == ["a/1.jpg", "b/2.png", "c.txt"]  # a text file is kept: it becomes an error row
    assert inputs.paths == [str(tmp_path / "in" / i) for i in inputs.ids]
    assert all(os.path.isabs(p) for p in inputs.paths)


def test_glob_matches_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "x" / "deep" / "1.png")
    _touch(tmp_path / "x" / "2.png")
    (tmp_path / "x" / "dir.png").mkdir()
    monkeypatch.chdir(tmp_path)
    inputs = list_inputs("x/**/*.png")
    assert inputs.ids == ["x/2.png", "x/deep/1.png"]
    assert inputs.paths == [str(tmp_path / "x/2.png"), str(tmp_path / "x/deep/1.png")]


def test_csv_manifest_ids_relative_paths_and_missing_files(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs" / "a.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path,extra\n007,imgs/a.png,1\n002,/nowhere/b.png,2\n", encoding="utf-8")
    inputs = list_inputs(str(manifest))
    assert inputs.ids == ["002", "007"]  # strings, not numbers; sorted
    assert inputs.paths == ["/nowhere/b.png", str(tmp_path / "imgs" / "a.png")]  # missing stays listed


def test_csv_manifest_without_id_uses_path(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\nb.png\na.png\n", encoding="utf-8")
    assert list_inputs(str(manifest)).ids == ["a.png", "b.png"]


def test_parquet_manifest_with_integer_ids(tmp_path: Path) -> None:
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"id": [3, 1], "path": ["/data/c.jpg", "/data/a.jpg"]}), manifest)
    inputs = list_inputs(str(manifest))
    assert inputs.ids == ["1", "3"] and inputs.paths == ["/data/a.jpg", "/data/c.jpg"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,name\na.png,x\n", "has no 'path' column (columns: ['file', 'name'])"),
        ("", "is empty"),
        ("id,path\n1,a.png\n1,b.png\n", "ids must be unique, 1 repeated (e.g. ['1'])"),
        ("id,path\n1,a.png\n2,\n", "row 1: empty 'path'"),
    ],
)
def test_bad_csv_manifests_are_refused(tmp_path: Path, content: str, message: str) -> None:
    manifest = tmp_path / "bad.csv"
    manifest.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(message)):
        list_inputs(str(manifest))


def test_bad_parquet_manifests_are_refused(tmp_path: Path) -> None:
    no_path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"file": ["x"]}), no_path)
    with pytest.raises(InputError, match=r"no 'path' column \(columns: \['file'\]\)"):
        list_inputs(str(no_path))
    numeric = tmp_path / "b.parquet"
    pq.write_table(pa.table({"path": [1, 2]}), numeric)
    with pytest.raises(InputError, match="column 'path' must hold strings, it holds int64"):
        list_inputs(str(numeric))
    junk = _touch(tmp_path / "c.parquet", b"not parquet")
    with pytest.raises(InputError, match="cannot read manifest"):
        list_inputs(str(junk))


def test_nothing_to_score_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no inputs found"):
        list_inputs(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no inputs found"):
        list_inputs(str(tmp_path / "*.png"))
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "missing"))
    with pytest.raises(InputError, match=r"manifest .* does not exist"):
        list_inputs(str(tmp_path / "missing.csv"))


def test_fingerprint_follows_content_not_listing_order(tmp_path: Path) -> None:
    one, two = tmp_path / "1.csv", tmp_path / "2.csv"
    one.write_text("id,path\na,/x/a.png\nb,/x/b.png\n", encoding="utf-8")
    two.write_text("id,path\nb,/x/b.png\na,/x/a.png\n", encoding="utf-8")
    assert list_inputs(str(one)).fingerprint == list_inputs(str(two)).fingerprint
    two.write_text("id,path\nb,/x/b.png\na,/y/a.png\n", encoding="utf-8")
    assert list_inputs(str(one)).fingerprint != list_inputs(str(two)).fingerprint
