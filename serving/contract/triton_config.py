"""Render (and read back) the Triton `config.pbtxt` of a model, for its ONNX artefact.

The file is what Triton itself loads for `<repo>/<model>/`: platform onnxruntime_onnx, the IO
tensors with dims WITHOUT the batch dim (Triton adds it when max_batch_size > 0), dynamic
batching, instance groups and labels for the classification extension. Kiln's own source of
truth stays kiln.json; this file makes the repository portable to Triton.

`parse_config` reads protobuf text format generically (enough for what we write and for the
server's ModelConfig RPC); the tests cross-check it with Triton's own ModelConfig proto.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from serving.contract.manifest import Artefact, Manifest
from serving.contract.version_policy import VersionPolicy

CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
# KServe datatype -> Triton model-config enum (BYTES is TYPE_STRING in Triton's config).
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}
# Fields we always hand back as lists, even when written once.
REPEATED_FIELDS = frozenset({"input", "output", "dims", "instance_group", "preferred_batch_size", "versions"})


class TritonConfigError(ValueError):
    """A config.pbtxt cannot be rendered or parsed (names the bad value)."""


def _q(text: str) -> str:
    """A protobuf text-format string literal (JSON escaping is a valid subset)."""
    return json.dumps(text)


def _tensor(name: str, datatype: str, dims: Sequence[int], label_file: bool) -> list[str]:
    lines = [
        "  {",
        f"    name: {_q(name)}",
        f"    data_type: {TRITON_TYPES[datatype]}",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
    ]
    if label_file:
        lines.append(f"    label_filename: {_q(LABELS_FILENAME)}")
    return [*lines, "  }"]


def render_config(
    manifest: Manifest,
    *,
    artefact: Artefact | None = None,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    version_policy: VersionPolicy | None = None,
) -> str:
    """The config.pbtxt text for `manifest`'s ONNX artefact (default: the FP32 one, else any ONNX)."""
    onnx = [a for a in manifest.artefacts if a.format == "onnx"]
    art = artefact or manifest.find_artefact("onnx", "fp32") or (onnx[0] if onnx else None)
    if art is None or art.format != "onnx":
        raise TritonConfigError(
            f"config.pbtxt needs an ONNX artefact; {manifest.name} has "
            f"{[(a.path, a.format, a.precision) for a in manifest.artefacts]}"
        )
    if instance_kind not in INSTANCE_KINDS:
        raise TritonConfigError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
    if instance_count < 1 or max_queue_delay_us < 0:
        raise TritonConfigError(
            f"need instance_count >= 1 and max_queue_delay_us >= 0, "
            f"got {instance_count} and {max_queue_delay_us}"
        )
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= manifest.max_batch_size]
    if bad:
        raise TritonConfigError(f"preferred batch sizes {bad} outside 1..{manifest.max_batch_size}")
    lines = [
        f"name: {_q(manifest.name)}",
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f"max_batch_size: {manifest.max_batch_size}",
        f"default_model_filename: {_q(art.path)}",
    ]
    if version_policy is not None:
        lines.append(f"version_policy: {version_policy.to_pbtxt()}")
    spec = manifest.input
    lines += [
        "input [",
        *_tensor(spec.name, manifest.datatype_of(art, spec.name), spec.shape[1:], False),
        "]",
    ]
    lines.append("output [")
    for i, out in enumerate(manifest.outputs):
        dtype = manifest.datatype_of(art, out.name)
        lines += _tensor(out.name, dtype, out.shape[1:], out.kind != "other")
        if i < len(manifest.outputs) - 1:
            lines[-1] += ","
    lines.append("]")
    lines.append("dynamic_batching {")
    if preferred_batch_sizes:
        sizes = ", ".join(str(b) for b in sorted(set(preferred_batch_sizes)))
        lines.append(f"  preferred_batch_size: [ {sizes} ]")
    lines += [f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {instance_count}", f"    kind: {instance_kind}"]
    lines += ["  }", "]"]
    return "\n".join(lines) + "\n"


def render_labels(manifest: Manifest) -> str:
    """labels.txt: one class name per line, in output index order."""
    bad = [label for label in manifest.labels if "\n" in label or "\r" in label]
    if bad:
        raise TritonConfigError(f"labels cannot contain line breaks: {bad!r}")
    return "".join(f"{label}\n" for label in manifest.labels)


_TOKEN_RE = re.compile(
    r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')"""
    r"""|(?P<num>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+))|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"""
    r"""|(?P<punct>[{}\[\]:,;<>])"""
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise TritonConfigError(f"config.pbtxt: unexpected character {text[pos]!r} at offset {pos}")
        pos = match.end()
        if match.lastgroup:
            out.append((match.lastgroup, match.group(match.lastgroup)))
    return out


class _Parser:
    """Recursive-descent reader of protobuf text format into dicts/lists/scalars."""

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (expected is not None and tok[1] != expected):
            raise TritonConfigError(f"config.pbtxt: expected {expected or 'a token'}, got {tok and tok[1]!r}")
        self.i += 1
        return tok

    def message(self, closer: str | None) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (tok := self.peek()) is not None and tok[1] != closer:
            kind, key = self.take()
            if kind != "ident":
                raise TritonConfigError(f"config.pbtxt: expected a field name, got {key!r}")
            if self.peek() == ("punct", ":"):
                self.take(":")
            values = self.list() if self.peek() == ("punct", "[") else [self.value()]
            result.setdefault(key, []).extend(values)
            if self.peek() in (("punct", ","), ("punct", ";")):
                self.take()
        if closer is not None:
            self.take(closer)
        return {k: v if k in REPEATED_FIELDS or len(v) > 1 else v[0] for k, v in result.items()}

    def list(self) -> list[Any]:
        self.take("[")
        items: list[Any] = []
        while self.peek() != ("punct", "]"):
            items.append(self.value())
            if self.peek() == ("punct", ","):
                self.take(",")
        self.take("]")
        return items

    def value(self) -> Any:
        kind, text = self.take()
        if text in ("{", "<"):
            return self.message("}" if text == "{" else ">")
        if kind == "str":
            return _unquote(text)
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "ident":
            return {"true": True, "false": False}.get(text, text)
        raise TritonConfigError(f"config.pbtxt: unexpected {text!r}")


def _unquote(literal: str) -> str:
    """Decode a quoted literal; JSON's escapes are the subset of protobuf's that we write."""
    if literal[0] == "'":
        literal = '"' + literal[1:-1].replace("\\'", "'").replace('"', '\\"') + '"'
    try:
        return json.loads(literal)
    except json.JSONDecodeError as exc:
        raise TritonConfigError(f"config.pbtxt: unsupported string literal {literal}: {exc}") from None


def parse_config(text: str) -> dict[str, Any]:
    """Parse config.pbtxt text into nested dicts (repeated fields always lists, enums as names)."""
    return _Parser(text).message(None)
