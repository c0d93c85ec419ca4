"""kiln.json's tensor specs: the model's input (with its one normalisation record, images and
signals alike) and outputs, and the KServe datatypes, layouts and channel orders they use.

Checked like every kiln.json type (serving/contract/manifest_types.py): frozen keyword-only
dataclasses that validate in __post_init__, strict from_dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.contract.schema_checks import (
    JsonMixin,
    as_bool,
    as_choice,
    as_float,
    as_int,
    as_optional,
    as_str,
    as_tuple,
    fail,
    setattrs,
)

# KServe v2 datatype names -> numpy dtype names (BYTES is object, BF16 has no numpy dtype).
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
DATATYPES = (*NUMPY_DTYPES, "BF16")
LAYOUTS = {"NCHW": 4, "NHWC": 4, "NCL": 3}
CHANNEL_ORDERS = {"L": 1, "RGB": 3, "BGR": 3}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
OUTPUT_KINDS = ("logits", "probabilities", "other")


def check_shape(value: Any, field_name: str) -> tuple[int, ...]:
    """A shape whose first dim is the batch (-1) and whose other dims are positive."""
    shape = as_tuple(value, field_name, as_int)
    if len(shape) < 2 or shape[0] != -1:
        fail(field_name, f"expected [-1, d1, ...] (dynamic batch first), got {list(shape)}")
    if any(d < 1 for d in shape[1:]):
        fail(field_name, f"non-batch dims must be >= 1, got {list(shape)}")
    return shape


@dataclass(frozen=True, kw_only=True)
class Normalisation(JsonMixin):
    """kiln.json's one normalisation record, for images and signals alike: (x·scale − mean[c]) ÷
    std[c] per channel c, in float32. The channel axis is the "C" of the InputSpec's layout.

    `in_graph`: the model does it (the client sends raw values: uint8 pixels, raw signals);
    otherwise the host does it (serving/contract/normalisation.py `normalise`) before the model.
    A signal input's `preprocessing` is this record; an image input's is `Preprocessing`, this
    record plus the image steps before it.
    """

    mean: tuple[float, ...]  # per channel, on the scaled range
    std: tuple[float, ...]
    scale: float = 1.0  # applied before mean/std
    in_graph: bool = False

    def __post_init__(self) -> None:
        mean = as_tuple(self.mean, "mean", as_float)
        std = as_tuple(self.std, "std", as_float, minimum=1e-12)
        if not mean:
            fail("mean", "expected one value per channel, got none")
        expected, why = self._expected_channels(mean)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) != expected:
                fail(name, f"expected {expected} values {why}, got {len(values)}")
        setattrs(self, mean=mean, std=std, scale=as_float(self.scale, "scale", minimum=1e-12))
        as_bool(self.in_graph, "in_graph")

    def _expected_channels(self, mean: tuple[float, ...]) -> tuple[int, str]:
        """How many mean/std values there must be, and why (for the error message)."""
        return len(mean), "(as many as mean)"

    @property
    def channels(self) -> int:
        """The number of channels normalised."""
        return len(self.mean)


@dataclass(frozen=True, kw_only=True)
class Preprocessing(Normalisation):
    """An image input's preprocessing: decode, `channel_order`, shorter side resized to `resize`,
    centre crop to `crop`, then the normalisation of the uint8 pixels (scale 1/255 by default)."""

    resize: int | None  # shorter side before the crop; None = no resize
    crop: int | None  # centre crop size (square); None = no crop
    scale: float = 1.0 / 255.0  # applied to uint8 pixels before mean/std ([0, 1] range)
    channel_order: str = "RGB"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        super().__post_init__()
        as_optional(self.resize, "resize", as_int, minimum=1)
        as_optional(self.crop, "crop", as_int, minimum=1)
        as_choice(self.interpolation, "interpolation", INTERPOLATIONS)

    def _expected_channels(self, mean: tuple[float, ...]) -> tuple[int, str]:
        order = as_choice(self.channel_order, "channel_order", CHANNEL_ORDERS)
        return CHANNEL_ORDERS[order], f"for {order}"


# The preprocessing record each input kind carries (InputSpec.preprocessing).
PREPROCESSING_TYPES: dict[str, type[Normalisation]] = {"image": Preprocessing, "signal": Normalisation}


@dataclass(frozen=True, kw_only=True)
class InputSpec(JsonMixin):
    """The model's single input tensor."""

    name: str
    datatype: str  # KServe name: "FP32", "UINT8", ...
    layout: str  # "NCHW" | "NHWC" | "NCL"
    shape: tuple[int, ...]  # batch first, -1
    kind: str = "image"  # "image" | "signal"
    # How raw input becomes this tensor: Preprocessing for an image, Normalisation for a signal
    # (None: the client sends the tensor as it is).
    preprocessing: Normalisation | None = None

    def __post_init__(self) -> None:
        as_str(self.name, "name")
        as_choice(self.datatype, "datatype", DATATYPES)
        layout = as_choice(self.layout, "layout", LAYOUTS)
        shape = check_shape(self.shape, "shape")
        if len(shape) != LAYOUTS[layout]:
            fail("shape", f"layout {layout} needs {LAYOUTS[layout]} dims, got {list(shape)}")
        setattrs(self, shape=shape)
        kind = as_choice(self.kind, "kind", PREPROCESSING_TYPES)
        if kind == "image" and layout == "NCL":
            fail("layout", "an image input needs NCHW or NHWC, got NCL")
        pre = self.preprocessing
        if pre is None:
            return
        if type(pre) is not PREPROCESSING_TYPES[kind]:
            fail(
                "preprocessing",
                f"{kind} inputs need {PREPROCESSING_TYPES[kind].__name__}, got {type(pre).__name__}",
            )
        if self.channels != pre.channels:
            if isinstance(pre, Preprocessing):
                fail(
                    "preprocessing.channel_order",
                    f"{pre.channel_order} needs {pre.channels} channel(s) but the shape has {self.channels}",
                )
            fail(
                "preprocessing.mean",
                f"mean/std have {pre.channels} value(s) but the shape has {self.channels} channel(s)",
            )

    @property
    def normalisation(self) -> Normalisation | None:
        """The normalisation record of either kind (an image's Preprocessing is one)."""
        return self.preprocessing

    @property
    def channels(self) -> int:
        """Channel count taken from the layout."""
        return self.shape[self.layout.index("C")]

    @property
    def height(self) -> int | None:
        """Image height (None for signals)."""
        return self.shape[self.layout.index("H")] if "H" in self.layout else None

    @property
    def width(self) -> int | None:
        """Image width (None for signals)."""
        return self.shape[self.layout.index("W")] if "W" in self.layout else None

    @property
    def length(self) -> int | None:
        """Signal length (None for images)."""
        return self.shape[self.layout.index("L")] if "L" in self.layout else None

    @classmethod
    def _nested_types(cls, data: dict[str, Any]) -> dict[str, type]:
        """The preprocessing record's type follows `kind` (a bad kind fails in __post_init__)."""
        return {"preprocessing": PREPROCESSING_TYPES.get(data.get("kind", "image"), Preprocessing)}


@dataclass(frozen=True, kw_only=True)
class OutputSpec(JsonMixin):
    """One output tensor; `kind` tells Classify whether a softmax is still needed."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    kind: str = "logits"  # "logits" | "probabilities" | "other"

    def __post_init__(self) -> None:
        as_str(self.name, "name")
        as_choice(self.datatype, "datatype", DATATYPES)
        setattrs(self, shape=check_shape(self.shape, "shape"))
        as_choice(self.kind, "kind", OUTPUT_KINDS)
