"""Properties of the code itself: nothing that loads checkpoints, manifests or configs can run
code hidden in a file (no pickle, torch.load only with weights_only=True, no unsafe YAML), and
secrets are compared in constant time. The scanners are tested on snippets too, so they can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("training", "export", "serving", "protos", "benchmarks", "deploy")
# The CIFAR-10 dataset ships as pickles: its reader admits numpy-array globals only, and reads
# data files, never weights. The single allowed exception.
ALLOWED_PICKLE = {Path("training/data/cifar.py")}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def unsafe_loads(source: str) -> list[str]:
    """Lines of `source` that could unpickle or construct arbitrary objects from a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: imports {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
            found.append(f"{node.lineno}: {name} without weights_only=True")
        elif name.split(".")[-1] in ("load", "loadtxt") and _keyword(node, "allow_pickle") is True:
            found.append(f"{node.lineno}: {name}(allow_pickle=True)")
        elif name.split(".")[-1] in ("read_pickle", "unsafe_load", "full_load"):
            found.append(f"{node.lineno}: {name}")
        elif name == "yaml.load" and "Safe" not in str(_dotted(node.args[1]) if len(node.args) > 1 else ""):
            found.append(f"{node.lineno}: yaml.load without a SafeLoader")
    return found


def _sources() -> list[Path]:
    files = [p for d in SCANNED for p in (ROOT / d).rglob("*.py")]
    return [p for p in files if "_pb2" not in p.name]


def test_nothing_unpickles_or_constructs_objects_from_files() -> None:
    sources = _sources()
    assert len(sources) > 50  # the scan really covers the project
    findings = {
        str(path.relative_to(ROOT)): hits
        for path in sources
        if path.relative_to(ROOT) not in ALLOWED_PICKLE and (hits := unsafe_loads(path.read_text("utf-8")))
    }
    assert findings == {}


def test_the_one_pickle_reader_is_restricted() -> None:
    """training/data/cifar.py unpickles through an Unpickler whose find_class admits few globals."""
    tree = ast.parse((ROOT / "training/data/cifar.py").read_text("utf-8"))
    unpicklers = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and any("Unpickler" in _dotted(b) for b in n.bases)
    ]
    assert len(unpicklers) == 1
    assert any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in unpicklers[0].body)
    plain = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and _dotted(n.func) in ("pickle.load", "pickle.loads")
    ]
    assert plain == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.load(open('w.pkl', 'rb'))",
        "from joblib import load",
        "import torch\ntorch.load('ckpt.pt')",
        "import torch\ntorch.load('ckpt.pt', weights_only=False)",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('x')",
        "import yaml\nyaml.load(open('c.yaml'), yaml.Loader)",
        "import yaml\nyaml.unsafe_load('a: 1')",
    ],
)
def test_the_scanner_flags_each_unsafe_load(snippet: str) -> None:
    assert unsafe_loads(snippet)


def test_the_scanner_passes_safe_loads() -> None:
    safe = "import torch, yaml, numpy as np\ntorch.load('c.pt', weights_only=True)\nnp.load('a.npy')\n"
    assert unsafe_loads(safe + "yaml.safe_load('a: 1')\nyaml.load('a: 1', yaml.SafeLoader)\n") == []


SECRET_MODULES = ("serving/grpc/security.py", "serving/grpc/admin.py")


@pytest.mark.parametrize("module", SECRET_MODULES)
def test_secrets_are_compared_in_constant_time(module: str) -> None:
    """hmac.compare_digest on digests, and no `==` / `!=` anywhere near a token."""
    tree = ast.parse((ROOT / module).read_text("utf-8"))
    calls = {_dotted(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls and {"hashlib.sha256", "digest"} & calls
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            text = ast.unparse(node).lower()
            assert not any(word in text for word in ("token", "expected", "presented", "secret")), text
