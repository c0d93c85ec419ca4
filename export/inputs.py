"""The samples export needs (held-out split for parity, train samples for INT8 calibration) and
the host preprocessing that turns them into the model's input, as run.json describes it.

Both kinds carry kiln.json's one normalisation record (`normalisation`, serving's
`Normalisation`: scale, mean, std) and describe their kiln.json input (`input_spec`), whose checks
validate them on construction. Images are uint8 [N,C,H,W]; host preprocessing is
serving/contract/normalisation.py `normalise`, the exact arithmetic the in-graph preprocessing
performs: Cast → ·scale → −mean → ÷std, all in float32. Signals are float32 [N,C,L] (layout NCL);
their normalisation (·scale when not 1, −mean, ÷std per channel) is always put in the exported
graph, so a signal model takes the raw values; `SignalPreprocess` is the same arithmetic on the
host, for the PyTorch reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from export.onnx_export import INPUT_NAME
from serving.contract.manifest import InputSpec, Normalisation, Preprocessing
from serving.contract.normalisation import normalise

__all__ = [
    "HostPreprocess",
    "ImageSet",
    "Preprocess",
    "SignalPreprocess",
    "preprocess_from_run_input",
    "sample_split",
    "split_arrays",
]


_Pre = TypeVar("_Pre", "HostPreprocess", "SignalPreprocess")


def _parsed(
    cls: type[_Pre],
    record: Mapping[str, Any],
    default_scale: float,
    shape: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> _Pre:
    """`cls` from run.json's "input" record: the normalisation every kind carries plus the fields
    `shape(record)` reads; a missing, unparsable or invalid key is a ValueError naming it."""
    try:
        return cls(
            mean=tuple(float(m) for m in record["mean"]),
            std=tuple(float(s) for s in record["std"]),
            scale=float(record.get("scale", default_scale)),
            channels=int(record["channels"]),
            **shape(record),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"run.json 'input' record is incomplete or invalid: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class HostPreprocess:
    """uint8 [N,C,H,W] pixels → float32 model input; values from run.json's "input" record."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0 / 255.0
    channels: int = 3
    height: int = 32
    width: int = 32
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        self.input_spec(
            in_graph=False
        )  # kiln.json's checks (ManifestError): export refuses what serving would

    @classmethod
    def from_run_input(cls, record: Mapping[str, Any]) -> HostPreprocess:
        """Build from run.json's "input" dict; ValueError names a missing or bad key."""

        def geometry(r: Mapping[str, Any]) -> dict[str, Any]:
            channel_order = str(r.get("channel_order", "RGB"))
            return {"height": int(r["height"]), "width": int(r["width"]), "channel_order": channel_order}

        return _parsed(cls, record, 1.0 / 255.0, geometry)

    @property
    def chw(self) -> tuple[int, int, int]:
        """The model's input shape without the batch dim."""
        return (self.channels, self.height, self.width)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape without the batch dim (as `SignalPreprocess.input_shape`)."""
        return self.chw

    @property
    def is_signal(self) -> bool:
        """False: images."""
        return False

    @property
    def normalisation(self) -> Normalisation:
        """kiln.json's normalisation record of these pixels (its validation included)."""
        return Normalisation(mean=self.mean, std=self.std, scale=self.scale)

    def input_spec(self, in_graph: bool) -> InputSpec:
        """kiln.json's input: uint8 NHWC pixels normalised in the graph, or float32 NCHW rows the
        host normalised; the same record either way."""
        c, h, w = self.chw
        pre = Preprocessing(
            resize=min(h, w),
            crop=min(h, w) if h == w else None,
            mean=self.mean,
            std=self.std,
            scale=self.scale,
            channel_order=self.channel_order,
            in_graph=in_graph,
        )
        layout, datatype, shape = (
            ("NHWC", "UINT8", (-1, h, w, c)) if in_graph else ("NCHW", "FP32", (-1, c, h, w))
        )
        return InputSpec(name=INPUT_NAME, datatype=datatype, layout=layout, shape=shape, preprocessing=pre)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Normalise uint8 [N,C,H,W] to float32 [N,C,H,W]."""
        return _normalised(self, images, np.uint8, "images [N, {}, {}, {}]".format(*self.chw))


@dataclass(frozen=True, kw_only=True)
class SignalPreprocess:
    """float32 signals [N,C,L] → model input: (x·scale − mean) ÷ std per channel, from run.json's
    "input" record of kind "signal". The exported graph does the same at its front."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    channels: int = 1
    length: int = 40

    def __post_init__(self) -> None:
        self.input_spec()  # kiln.json's checks (ManifestError): export refuses what serving would

    @classmethod
    def from_run_input(cls, record: Mapping[str, Any]) -> SignalPreprocess:
        """Build from run.json's "input" dict; ValueError names a missing or bad key."""
        if record.get("layout", "NCL") != "NCL":
            raise ValueError(f"run.json 'input': a signal needs layout NCL, got {record.get('layout')!r}")
        return _parsed(cls, record, 1.0, lambda r: {"length": int(r["length"])})

    @property
    def input_shape(self) -> tuple[int, int]:
        """The model's input shape without the batch dim: (C, L)."""
        return (self.channels, self.length)

    @property
    def is_signal(self) -> bool:
        """True: signals."""
        return True

    @property
    def normalisation(self) -> Normalisation:
        """kiln.json's normalisation record of these signals, always run in the graph."""
        return Normalisation(mean=self.mean, std=self.std, scale=self.scale, in_graph=True)

    def input_spec(self, in_graph: bool = True) -> InputSpec:
        """kiln.json's input: raw float32 [N, C, L] signals, normalised in the graph."""
        if not in_graph:
            raise ValueError("a signal model always normalises in the graph (it takes raw float32)")
        c, length = self.input_shape
        return InputSpec(
            name=INPUT_NAME,
            datatype="FP32",
            layout="NCL",
            kind="signal",
            shape=(-1, c, length),
            preprocessing=self.normalisation,
        )

    def __call__(self, signals: np.ndarray) -> np.ndarray:
        """Normalise raw float32 [N,C,L] to the float32 [N,C,L] the PyTorch model takes."""
        return _normalised(self, signals, np.float32, "signals [N, {}, {}]".format(*self.input_shape))


Preprocess = HostPreprocess | SignalPreprocess


def _normalised(pre: Preprocess, values: np.ndarray, dtype: type, expected: str) -> np.ndarray:
    """Check the samples' dtype and shape, then apply the contract's one host normalisation."""
    if values.dtype != dtype or values.shape[1:] != pre.input_shape:
        raise ValueError(f"expected {np.dtype(dtype)} {expected}, got {values.dtype} {values.shape}")
    return normalise(values, pre.normalisation)


def preprocess_from_run_input(record: Mapping[str, Any]) -> Preprocess:
    """The host preprocessing for run.json's "input" record: images or signals by its "kind"."""
    kind = record.get("kind", "image") if isinstance(record, Mapping) else None
    if kind == "signal":
        return SignalPreprocess.from_run_input(record)
    if kind == "image":
        return HostPreprocess.from_run_input(record)
    raise ValueError(f"run.json 'input': unknown kind {kind!r}; expected 'image' or 'signal'")


@dataclass(frozen=True, kw_only=True)
class ImageSet:
    """Model inputs before preprocessing and int64 labels [N]: uint8 images [N,C,H,W] or
    (despite the name, kept for its callers) float32 signals [N,C,L]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def nhwc(self) -> np.ndarray:
        """The images as uint8 [N,H,W,C] (the in-graph preprocessing input), contiguous."""
        if self.images.ndim != 4:
            raise ValueError(f"nhwc() needs images [N,C,H,W], got shape {self.images.shape}")
        return np.ascontiguousarray(self.images.transpose(0, 2, 3, 1))


def split_arrays(dataset: Any, indices: Sequence[int] | None = None) -> ImageSet:
    """Inputs/labels of a dataset split: the fast tensor path when it has one (image and signal
    tensor sets both expose `.images`), else item by item (lazily decoded uint8 images)."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        images, labels = dataset.images.numpy(), dataset.labels.numpy()
        if indices is not None:
            images, labels = (
                images[np.asarray(indices, dtype=np.int64)],
                labels[np.asarray(indices, dtype=np.int64)],
            )
        return ImageSet(images=np.ascontiguousarray(images), labels=labels.astype(np.int64))
    picked = range(len(dataset)) if indices is None else indices
    items = [dataset[int(i)] for i in picked]
    if not items:
        raise ValueError("the split is empty")
    images = np.stack([np.asarray(img.numpy()) for img, _ in items])
    return ImageSet(images=images, labels=np.asarray([label for _, label in items], dtype=np.int64))


def sample_split(dataset: Any, limit: int | None, *, seed: int = 0) -> ImageSet:
    """Up to `limit` samples of a split (all when None), a seeded random subset when fewer."""
    count = len(dataset)
    if count == 0:
        raise ValueError("the split is empty")
    if limit is None or limit >= count:
        return split_arrays(dataset)
    indices = np.sort(np.random.default_rng(seed).permutation(count)[:limit])
    return split_arrays(dataset, indices.tolist())
