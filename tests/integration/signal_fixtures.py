"""A tiny real 1-D (signal) classifier for the server tests, published the way `kiln export` does.

The model is a torch Conv1d network exported with `torch.onnx.export` (dynamo, dynamic batch):
input "input" FP32 [N, 1, 40] of RAW values (the normalisation is inside the graph) -> three
Conv1d layers (MNIST-1D seed style: kernel 3, stride 2, valid padding) -> Linear -> "logits"
[N, 10]. kiln.json describes the input as a signal: layout NCL, kind "signal", and its
normalisation record (in the graph).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from serving.contract.manifest import Artefact, InputSpec, Manifest, Normalisation, OutputSpec, Provenance
from serving.contract.repository import publish_version

SIGNAL_LABELS = tuple(f"digit{i}" for i in range(10))
SIGNAL_CHANNELS, SIGNAL_LENGTH = 1, 40
SIGNAL_MEAN, SIGNAL_STD = 0.25, 1.5  # folded into the graph: the server sends raw values
SIGNAL_NORMALISATION = Normalisation(  # what the graph does first: kiln.json's record of it
    mean=(SIGNAL_MEAN,) * SIGNAL_CHANNELS, std=(SIGNAL_STD,) * SIGNAL_CHANNELS, in_graph=True
)


def read_signal_sample(path: Path) -> np.ndarray:
    """float32 [C, L] from a file training.samples.write_samples wrote (.npy or .csv): the tests' reader."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return np.asarray([[float(v) for v in row.split(",")] for row in rows], dtype=np.float32)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's internal warnings and progress logs (the tests run with warnings as errors)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def build_signal_onnx(path: Path, seed: int = 0) -> None:
    """Export the tiny Conv1d classifier (weights from `seed`) to `path`."""
    import torch
    from torch import nn

    class TinySignalNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(SIGNAL_CHANNELS, 8, 3, stride=2),  # 40 -> 19
                nn.ReLU(),
                nn.Conv1d(8, 8, 3, stride=2),  # -> 9
                nn.ReLU(),
                nn.Conv1d(8, 8, 3, stride=2),  # -> 4
                nn.ReLU(),
            )
            self.head = nn.Linear(8 * 4, len(SIGNAL_LABELS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - SIGNAL_MEAN) / SIGNAL_STD
            return self.head(self.features(x).flatten(1))

    torch.manual_seed(seed)
    model = TinySignalNet().eval()
    sample = torch.randn(2, SIGNAL_CHANNELS, SIGNAL_LENGTH)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (sample,),
            None,
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            external_data=False,
            verbose=False,
            dynamo=True,
        )
    path.write_bytes(program.model_proto.SerializeToString())


def signal_manifest(tmp: Path, name: str, version: int, *, max_batch_size: int) -> Manifest:
    """The kiln.json of the exported signal model in `tmp` (the contract `kiln export` follows)."""
    return Manifest(
        name=name,
        version=version,
        architecture={"arch": "tiny-conv1d", "dims": 1},
        labels=SIGNAL_LABELS,
        input=InputSpec(
            name="input",
            datatype="FP32",
            layout="NCL",
            shape=(-1, SIGNAL_CHANNELS, SIGNAL_LENGTH),
            kind="signal",
            preprocessing=SIGNAL_NORMALISATION,
        ),
        outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, len(SIGNAL_LABELS))),),
        artefacts=(Artefact.from_file(tmp, "model.onnx", format="onnx", precision="fp32"),),
        max_batch_size=max_batch_size,
        provenance=Provenance(
            run_id="test-signal",
            dataset_fingerprint="0" * 64,
            git_commit=None,
            created_at="2025-01-01T00:00:00Z",
            kiln_version="test",
        ),
    )


def publish_signal_model(repo: Path, name: str = "sig", *, seed: int = 0, max_batch_size: int = 8) -> Path:
    """Publish one version of the signal classifier into `repo`; returns the version folder."""

    def populate(tmp: Path, version: int) -> Manifest:
        build_signal_onnx(tmp / "model.onnx", seed)
        return signal_manifest(tmp, name, version, max_batch_size=max_batch_size)

    return publish_version(repo, name, populate).path


def signals(rows: int, seed: int = 1) -> np.ndarray:
    """Raw float32 signals [rows, C, L] (not normalised: the model does that)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, SIGNAL_CHANNELS, SIGNAL_LENGTH)) * 2 + 0.5).astype(np.float32)
