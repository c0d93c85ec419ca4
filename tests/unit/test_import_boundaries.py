"""The dependency arrows of docs/design.md, checked on every module's imports (lazy ones too).

training <- export <- serving; inside serving: contract <- runtime <- grpc, clients never import
the server, and the wire codec (protocol) belongs to neither side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (folder, module prefixes it must not import, module prefixes it may import despite that)
RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("serving/contract", ("serving",), ("serving.contract", "serving.errors")),
    ("serving/protocol", ("serving",), ("serving.protocol", "serving.errors")),
    ("serving/runtime", ("serving.grpc", "serving.clients", "serving.scoring"), ()),
    ("serving/clients", ("serving.grpc",), ()),
    ("training", ("export", "serving"), ()),
    ("export", ("serving.grpc", "serving.clients"), ()),
)


def imported_modules(source: str) -> set[str]:
    """Absolute module names a source file imports, at any depth (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(source: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return sorted(
        name for name in imported_modules(source) if under(name, forbidden) and not under(name, allowed)
    )


@pytest.mark.parametrize(("folder", "forbidden", "allowed"), RULES, ids=[r[0] for r in RULES])
def test_folder_respects_its_import_boundary(
    folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]
) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder} has no modules: the map in docs/design.md is out of date"
    found = {
        str(path.relative_to(ROOT)): bad
        for path in files
        if (bad := violations(path.read_text(encoding="utf-8"), forbidden, allowed))
    }
    assert found == {}, f"imports across the {folder} boundary: {found}"


@pytest.mark.parametrize(
    "line",
    [
        "from serving.grpc.server import Server",
        "import serving.grpc.config",
        "def f():\n    from serving.grpc import metrics",
    ],
)
def test_the_checker_sees_a_forbidden_import(line: str) -> None:
    assert violations(line, ("serving.grpc",), ()) != []


def test_the_checker_lets_allowed_imports_through() -> None:
    source = "from serving.contract.manifest import Manifest\nfrom serving.errors import KilnError\n"
    assert violations(source, ("serving",), ("serving.contract", "serving.errors")) == []
