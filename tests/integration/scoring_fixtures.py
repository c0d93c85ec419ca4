"""Helpers for the scoring tests: a tiny real ONNX classifier published into a real repository,
and a folder of generated images with some bad ones among them.

The model: input "input" FP32 [N, 3, 8, 8] -> Flatten -> Gemm -> "logits" [N, 5]. Every pixel
matters (no pooling), so a preprocessing difference between two paths shows up in the scores.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Preprocessing, Provenance
from serving.contract.manifest_types import ParityReport
from serving.contract.repository import publish_version

LABELS = ("ant", "bee", "cat", "dog", "eel")
SIZE = 8
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
BAD_NAMES = ("corrupt.png", "truncated.jpg", "notes.txt", "fake.jpg", "empty.png")


def build_onnx(path: Path, seed: int) -> None:
    """Write the tiny classifier (opset 17, dynamic batch) with weights drawn from `seed`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.1, size=(3 * SIZE * SIZE, len(LABELS))).astype(np.float32)
    b = rng.normal(size=len(LABELS)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "tiny-linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def publish_model(
    repo: Path,
    name: str = "tiny",
    *,
    seed: int = 0,
    max_batch_size: int = 16,
    parity: ParityReport | None = None,
) -> Path:
    """Publish one version of the tiny classifier (real sha256s), its artefact carrying `parity`
    if given; returns the version folder."""

    def populate(tmp: Path, version: int) -> Manifest:
        build_onnx(tmp / "model.onnx", seed)
        return Manifest(
            name=name,
            version=version,
            architecture={"arch": "tiny-linear", "seed": seed},
            labels=LABELS,
            input=InputSpec(
                name="input",
                datatype="FP32",
                layout="NCHW",
                shape=(-1, 3, SIZE, SIZE),
                preprocessing=Preprocessing(resize=SIZE, crop=SIZE, mean=MEAN, std=STD),
            ),
            outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, len(LABELS))),),
            artefacts=(
                Artefact.from_file(tmp, "model.onnx", format="onnx", precision="fp32", parity=parity),
            ),
            max_batch_size=max_batch_size,
            provenance=Provenance(
                run_id=f"scoring-test-{seed}",
                dataset_fingerprint="0" * 64,
                git_commit=None,
                created_at="2025-01-01T00:00:00Z",
                kiln_version="test",
            ),
        )

    return publish_version(repo, name, populate).path


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """uint8 HWC -> encoded bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def make_images(
    folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (12, 10), smooth: bool = False
) -> list[Path]:
    """`count` good images (PNG and JPEG alternating, in two sub-folders) plus BAD_NAMES.

    `smooth` draws noise at 1/8 of `size` and scales it up (photo-like files: small, and slower
    to decode than to encode). Returns every file written. Bad ones: a PNG with a corrupted body,
    a JPEG cut in half, a text file, a text file named .jpg and a zero-byte .png.
    """
    rng = np.random.default_rng(seed)
    written = []
    for i in range(count):
        fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        sub = folder / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        if smooth:
            base = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(base).resize(size, Image.Resampling.BILINEAR))
        else:
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = sub / f"img{i:05d}.{ext}"
        path.write_bytes(encode(pixels, fmt))
        written.append(path)
    good_png = encode(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8), "PNG")
    good_jpg = encode(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), "JPEG")
    bad = {
        "corrupt.png": good_png[:40] + bytes(b ^ 0xFF for b in good_png[40:]),
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "notes.txt": b"not an image at all\n",
        "fake.jpg": b"GIF? no, just text pretending to be a jpeg\n",
        "empty.png": b"",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        written.append(folder / name)
    return written
