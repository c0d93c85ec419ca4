"""pyarrow is the `scoring` extra, not part of the serving install: the server, its CLI and the
clients never import it, and `kiln score` without it names the extra in one line and exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVING_MODULES = (
    "serving.dispatch",
    "serving.cli",
    "serving.grpc.server",
    "serving.clients.client",
    "serving.clients.classify_cli",
    "serving.clients.bench_cli",
    "serving.clients.score_cli",
)
# Makes `import pyarrow` fail as it does where it is not installed (ModuleNotFoundError, name
# "pyarrow"), whatever this environment holds.
WITHOUT_PYARROW = "import sys; sys.modules['pyarrow'] = None; "


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_serving_modules_never_import_pyarrow() -> None:
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {SERVING_MODULES!r}]; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'pyarrow'); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = _python(code)
    assert done.returncode == 0, done.stdout + done.stderr


def test_score_without_pyarrow_names_the_extra(tmp_path: Path) -> None:
    argv = ["score", "--repo", str(tmp_path), "--model", "tiny", "--input", str(tmp_path)]
    argv += ["--output", str(tmp_path / "out")]
    done = _python(WITHOUT_PYARROW + f"from serving.dispatch import main; sys.exit(main({argv!r}))")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "kiln-serve[scoring]" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()
