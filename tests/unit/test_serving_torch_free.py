"""`serving` is the torch-free serving image: every module must import with torch unavailable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ("torch", "torchvision", "training", "export", "tensorrt")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name} (serving must not need it)")
        return None

sys.meta_path.insert(0, Block())
import serving
failed = []
for info in pkgutil.walk_packages(serving.__path__, "serving."):
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        failed.append(f"{info.name}: {exc}")
print("\n".join(failed) or "ok")
sys.exit(1 if failed else 0)
"""


def test_every_serving_module_imports_without_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
