"""The single error -> gRPC status mapping, and the server modules' import hygiene."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from serving import errors
from serving.grpc.status_map import status_of

EXPECTED = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PayloadTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.RequestCancelledError: grpc.StatusCode.CANCELLED,
    errors.BackendError: grpc.StatusCode.INTERNAL,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.UnimplementedError: grpc.StatusCode.UNIMPLEMENTED,
}


@pytest.mark.parametrize("cls", sorted(EXPECTED, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_each_domain_error_has_its_status_and_message(cls: type[errors.KilnError]) -> None:
    assert status_of(cls("input 'x': bad")) == (EXPECTED[cls], "input 'x': bad")


def test_unavailable_and_every_exported_error_maps_to_a_real_status() -> None:
    assert (
        status_of(errors.ModelUnavailableError("loading", reason="loading"))[0] == grpc.StatusCode.UNAVAILABLE
    )
    for name in errors.__all__:
        assert status_of(getattr(errors, name)("x"))[0] in grpc.StatusCode


def test_unexpected_errors_become_internal_without_leaking_details() -> None:
    code, message = status_of(KeyError("/secret/path/weights.onnx"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message


def test_only_the_error_map_sets_statuses() -> None:
    """No side doors: handlers raise domain errors; only status_map calls abort/set_code, and
    no servicer method of the gRPC layer is patched in with setattr (`setattr(self, ...)` sets an
    instance's data, e.g. KilnMetrics' metrics from their table, and is allowed)."""
    root = Path(__file__).resolve().parents[2] / "serving"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            on_self = bool(node.args) and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
            patched = name == "setattr" and path.parent.name == "grpc" and not on_self
            side_door = name in {"abort", "set_code"} or patched
            if side_door and path.name != "status_map.py":
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert found == []


def test_server_modules_never_import_torch() -> None:
    code = (
        "import sys; import serving.grpc.server, serving.cli, serving.clients.client; "
        "import serving.clients.classify_cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'training', 'export'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
