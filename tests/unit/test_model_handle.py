"""The model handle's first steps without a model file: the repository's errors are Kiln's own, and
a broken scanned version says why (the artefact rule: tests/unit/test_grpc_model_version.py; the
handle on a real model: tests/integration/test_model_handle.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.contract.repository import ModelRepository, VersionStatus
from serving.contract.version_policy import VersionPolicy
from serving.errors import FailedPreconditionError, KilnError, ModelNotFoundError, ModelUnavailableError
from serving.runtime.model_handle import from_scan


def test_repository_errors_are_kiln_errors(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    repository = ModelRepository(tmp_path)
    with pytest.raises(ModelNotFoundError, match="'nope' not found") as missing:
        repository.resolve("nope", policy=VersionPolicy.all())
    with pytest.raises(ModelNotFoundError, match="version 3 not available") as absent:
        repository.resolve("m", 3, policy=VersionPolicy.all())
    with pytest.raises(ModelUnavailableError, match=r"'m' version 1: .*kiln\.json") as broken:
        repository.resolve("m", 1, policy=VersionPolicy.all())
    assert [e.value.code for e in (missing, absent, broken)] == ["NOT_FOUND", "NOT_FOUND", "UNAVAILABLE"]
    with pytest.raises(KilnError, match="invalid model name") as bad_name:
        repository.model_dir("../m")
    assert bad_name.value.code == FailedPreconditionError.code
    assert isinstance(bad_name.value, ValueError)  # callers that caught ValueError still do


def test_a_broken_scanned_version_is_unavailable_with_its_reason(tmp_path: Path) -> None:
    found = VersionStatus(model="m", version=1, path=tmp_path, manifest=None, error="kiln.json: bad JSON")
    with pytest.raises(ModelUnavailableError, match=r"^model 'm' version 1: kiln.json: bad JSON$"):
        from_scan(found)
