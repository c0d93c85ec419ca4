"""Generate the Python protobuf/gRPC code for Kiln's .proto sources, reproducibly.

    python -m protos.generate            # rewrite the committed files beside the sources
    python -m protos.generate --out DIR  # write the tree under DIR (the currency test does this)

protoc runs with the repository root as its only import root, so `protos/inference/x.proto`
becomes the module `protos.inference.x_pb2` and generated imports read
`from protos.inference import ...`: no sys.path tricks. Each `_pb2.py` is then rewritten to
register its descriptors in `protos._pool.POOL` instead of protobuf's default pool (see
protos/_pool.py for why). Output depends only on the sources and the grpcio-tools version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES: tuple[str, ...] = (
    "protos/inference/model_config.proto",
    "protos/inference/grpc_service.proto",
    "protos/kiln/classify/v1/classify.proto",
)
GENERATED_SUFFIXES: tuple[str, ...] = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_DEFAULT_POOL_CALL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_CALL = "_kiln_pool.POOL.AddSerializedFile("
_BUILDER_IMPORT = "from google.protobuf.internal import builder as _builder\n"
_POOL_IMPORT = "from protos import _pool as _kiln_pool\n"


def generated_paths() -> list[str]:
    """Repository-relative paths of every generated file, in a stable order."""
    return [proto[: -len(".proto")] + suffix for proto in PROTO_FILES for suffix in GENERATED_SUFFIXES]


def _use_private_pool(path: Path) -> None:
    """Rewrite one generated `_pb2.py` so it registers in protos._pool.POOL."""
    text = path.read_text(encoding="utf-8")
    if text.count(_DEFAULT_POOL_CALL) != 1 or text.count(_BUILDER_IMPORT) != 1:
        raise RuntimeError(f"{path}: unexpected protoc output layout; update protos/generate.py")
    text = text.replace(_DEFAULT_POOL_CALL, _PRIVATE_POOL_CALL)
    text = text.replace(_BUILDER_IMPORT, _BUILDER_IMPORT + _POOL_IMPORT)
    path.write_text(text, encoding="utf-8")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every source into `out_dir` (same relative layout); return the files written."""
    from grpc_tools import protoc  # dev-only dependency: imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(REPO_ROOT / proto) for proto in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {', '.join(PROTO_FILES)}")
    written = [out_dir / rel for rel in generated_paths()]
    for path in written:
        if path.name.endswith("_pb2.py"):
            _use_private_pool(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: generate into --out (default: the repository itself)."""
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    if args.out is not None:
        written = generate(args.out)
    else:
        # Generate into a scratch dir first so a protoc failure never leaves half-written files.
        with tempfile.TemporaryDirectory() as tmp:
            staged = generate(Path(tmp))
            written = []
            for src in staged:
                dest = REPO_ROOT / src.relative_to(tmp)
                dest.write_bytes(src.read_bytes())
                written.append(dest)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
