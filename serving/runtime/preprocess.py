"""Image preprocessing for Classify and offline scoring: bytes / raw pixels -> one model input row.

Steps follow the manifest's `Preprocessing` (an image's normalisation record plus its geometry),
and mirror training's image-folder reader: decode (Pillow, only the allowed formats), EXIF
orientation, convert to L/RGB, shorter side resized to `resize` (same rounding, same filter),
centre crop to `crop`, then either normalise (contract/normalisation.py: (x * scale - mean) /
std, float32, model layout) or, for a model that preprocesses in-graph, hand over the uint8
pixels in its layout.

Limits are checked before the expensive part: encoded size first, then, from the header (Pillow
reads sizes lazily in `Image.open`), the pixel count and the size the resize will produce, then
decode. The resize keeps the aspect ratio, so it can multiply a thin strip by (resize / shorter
side)^2: a 4 KB 1x2,000,000 PNG would become 32x64,000,000. Hence the aspect-ratio limit (for
models that resize) and the pixel limit applied to the resized size too, both computed before
Pillow allocates anything; every other step (EXIF transpose, palette expansion, convert, crop)
holds at most the decoded pixels at 4 bytes each. Both checks are symmetric in width and height,
so an EXIF rotation after the header check cannot get round them. Pillow's own decompression-bomb
error is caught too; the global `Image.MAX_IMAGE_PIXELS` is left alone (other code shares it).

All of this is CPU work: run it in a thread pool (`preprocess_async`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.contract.io_spec import InputSpec, Preprocessing
from serving.contract.normalisation import normalise
from serving.errors import InvalidInputError, KilnError, PayloadTooLargeError
from serving.runtime.backends.base import numpy_dtype

__all__ = ["ImageLimits", "Preprocessor"]

log = logging.getLogger(__name__)

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)

ImageInput = bytes | bytearray | memoryview | np.ndarray


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """What one image may cost: encoded bytes, pixels (decoded and resized), how elongated it may
    be, and which decoders may run."""

    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000  # ~ 7300 x 5500, decoded and resized; Pillow's bomb limit is ~89 M
    # longer side / shorter side, for models that resize: wider than panoramas and banners (<~ 11:1)
    max_aspect_ratio: float = 20.0
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or not self.max_aspect_ratio >= 1:
            raise ValueError(
                f"limits must be >= 1, got max_bytes={self.max_bytes}, max_pixels={self.max_pixels}, "
                f"max_aspect_ratio={self.max_aspect_ratio}"
            )
        if not self.formats:
            raise ValueError("at least one image format must be allowed")


class Preprocessor:
    """Turns images into rows of the model input described by an InputSpec (see module docstring)."""

    def __init__(
        self, spec: InputSpec, *, limits: ImageLimits | None = None, dtype: np.dtype | None = None
    ) -> None:
        """`dtype` overrides the spec's datatype (e.g. FP16 for an artefact with fp16 io)."""
        pre = spec.preprocessing
        if spec.kind == "signal":
            raise ValueError(
                f"input {spec.name!r} is not an image input: it takes a signal of length "
                f"{spec.length} ({spec.channels} channel(s)), so images cannot be preprocessed for it"
            )
        if not isinstance(pre, Preprocessing) or spec.height is None or spec.width is None:
            raise ValueError(
                f"input {spec.name!r} is not an image input with preprocessing; cannot preprocess images"
            )
        self.spec, self.limits = spec, limits or ImageLimits()
        self.mode = "L" if pre.channel_order == "L" else "RGB"
        self.bgr = pre.channel_order == "BGR"
        self.size = (spec.width, spec.height)  # Pillow order
        self.resize, self.crop, self.in_graph = pre.resize, pre.crop, pre.in_graph
        self.filter = _FILTERS[pre.interpolation]
        self.channels_first = spec.layout == "NCHW"
        self.dtype = np.dtype(dtype) if dtype is not None else numpy_dtype(spec.datatype)
        self.sample_shape = tuple(spec.shape[1:])
        self.row_bytes = math.prod(self.sample_shape) * self.dtype.itemsize  # one preprocessed image
        self._normalisation = pre

    def preprocess(self, image: ImageInput, out: np.ndarray | None = None) -> np.ndarray:
        """One image (encoded bytes or uint8 HWC / HW array) -> one row of shape `sample_shape`."""
        pixels = self._from_array(image) if isinstance(image, np.ndarray) else self._from_bytes(bytes(image))
        if self.bgr:
            pixels = pixels[..., ::-1]
        if self.channels_first:
            pixels = pixels.transpose(2, 0, 1)
        if out is None:
            out = np.empty(self.sample_shape, self.dtype)
        if self.in_graph:
            np.copyto(out, pixels, casting="unsafe")
        else:
            # The contract's one normalisation, in float32 as export's parity reference ran it.
            target = out if out.dtype == np.float32 else None
            normalised = normalise(
                pixels, self._normalisation, channel_axis=0 if self.channels_first else -1, out=target
            )
            if target is None:
                np.copyto(out, normalised, casting="unsafe")
        return out

    def preprocess_batch(
        self, images: Sequence[ImageInput], *, executor: Executor | None = None
    ) -> np.ndarray:
        """Images -> [N, *sample_shape], in `executor` when given (blocking; not for the event loop)."""
        out = np.empty((len(images), *self.sample_shape), self.dtype)
        if executor is None or len(images) < 2:
            for i, image in enumerate(images):
                self._into(image, out[i], i)
        else:
            list(executor.map(self._into, images, out, range(len(images))))
        return out

    async def preprocess_async(
        self, images: Sequence[ImageInput], executor: Executor | None = None
    ) -> np.ndarray:
        """`preprocess_batch` for the event loop: each image runs in `executor` (default: the loop's)."""
        loop = asyncio.get_running_loop()
        out = np.empty((len(images), *self.sample_shape), self.dtype)
        await asyncio.gather(
            *(loop.run_in_executor(executor, self._into, im, out[i], i) for i, im in enumerate(images))
        )
        return out

    def _into(self, image: ImageInput, row: np.ndarray, index: int) -> None:
        try:
            self.preprocess(image, row)
        except KilnError as exc:  # name the image in a multi-image request, keep the status
            raise type(exc)(f"image {index}: {exc.message}") from exc

    def _from_bytes(self, data: bytes) -> np.ndarray:
        if len(data) > self.limits.max_bytes:
            raise PayloadTooLargeError(
                f"encoded image is {len(data)} bytes, the limit is {self.limits.max_bytes}"
            )
        if not data:
            raise InvalidInputError("empty image: 0 bytes")
        allowed = "/".join(self.limits.formats)
        try:
            img = Image.open(io.BytesIO(data), formats=self.limits.formats)
        except Image.DecompressionBombError as exc:
            raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
        except _DECODE_ERRORS as exc:
            raise InvalidInputError(
                f"cannot decode image: not a valid {allowed} image ({len(data)} bytes)"
            ) from exc
        with img:
            self._check_pixels(*img.size)  # from the header, before any pixel is decoded
            self._resized_size(*img.size)
            try:
                img.load()
                img = _exif_upright(img)
                img = self._convert(img)
            except Image.DecompressionBombError as exc:
                raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
            except _DECODE_ERRORS as exc:
                raise InvalidInputError(f"corrupt or truncated {img.format or allowed} image: {exc}") from exc
            return self._geometry(img)

    def _from_array(self, array: np.ndarray) -> np.ndarray:
        if array.dtype != np.uint8:
            raise InvalidInputError(f"raw image must be uint8, got {array.dtype}")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
            raise InvalidInputError(
                f"raw image must be HxW or HxWxC with C in 1/3/4, got shape {list(array.shape)}"
            )
        self._check_pixels(array.shape[1], array.shape[0])
        self._resized_size(array.shape[1], array.shape[0])
        wanted = 1 if self.mode == "L" else 3
        if array.shape[2] == wanted and self._geometry_is_identity(array.shape[1], array.shape[0]):
            return array  # already what the model needs: skip Pillow
        img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        return self._geometry(self._convert(img))

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.limits.max_pixels:
            raise PayloadTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, the limit is {self.limits.max_pixels}"
            )

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The size after the shorter-side resize, refused (by the limit it breaks) if too large.

        Symmetric in width and height, so the header size bounds the EXIF-rotated image too.
        """
        if self.resize is None:
            return width, height
        long, short = max(width, height), min(width, height)
        if long > short * self.limits.max_aspect_ratio:
            raise InvalidInputError(
                f"image is {width}x{height}: aspect ratio {_plain(long / short)}:1, the limit is "
                f"max_image_aspect_ratio {_plain(self.limits.max_aspect_ratio)} (longer side / shorter side; "
                f"its shorter side would be resized to {self.resize})"
            )
        if short == self.resize:
            return width, height
        size = (
            max(self.resize, round(width * self.resize / short)),
            max(self.resize, round(height * self.resize / short)),
        )
        if size[0] * size[1] > self.limits.max_pixels:
            raise PayloadTooLargeError(
                f"image is {width}x{height}: resized to {size[0]}x{size[1]} = {size[0] * size[1]} "
                f"pixels, the limit is max_image_pixels {self.limits.max_pixels}"
            )
        return size

    def _convert(self, img: Image.Image) -> Image.Image:
        if img.mode == "P":  # palette (maybe with transparency): expand first, as Pillow advises
            img = img.convert("RGBA")
        return img if img.mode == self.mode else img.convert(self.mode)

    def _geometry_is_identity(self, width: int, height: int) -> bool:
        short_ok = self.resize is None or min(width, height) == self.resize
        crop_ok = self.crop is None or (width, height) == (self.crop, self.crop)
        return short_ok and crop_ok and (width, height) == self.size

    def _geometry(self, img: Image.Image) -> np.ndarray:
        """Shorter side -> resize, centre crop -> crop (as training's image-folder reader does).

        Every size is known before Pillow allocates it; an image the model cannot use is refused
        before the resize, not after.
        """
        width, height = self._resized_size(*img.size)
        cropped = (width, height) if self.crop is None else (self.crop, self.crop)
        if self.crop is not None and min(width, height) < self.crop:
            raise InvalidInputError(f"image is {width}x{height}, smaller than the {self.crop}px crop")
        if cropped != self.size:
            raise InvalidInputError(
                f"image is {cropped[0]}x{cropped[1]} after preprocessing, "
                f"the model needs {self.size[0]}x{self.size[1]}"
            )
        if (width, height) != img.size:
            img = img.resize((width, height), self.filter)
        if self.crop is not None and img.size != (self.crop, self.crop):
            left, top = (img.width - self.crop) // 2, (img.height - self.crop) // 2
            img = img.crop((left, top, left + self.crop, top + self.crop))
        array = np.asarray(img, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array


def _plain(number: float) -> str:
    """2000000.0 -> "2000000", 20.125 -> "20.125" (never "2e+06" in a message)."""
    return str(int(number)) if float(number).is_integer() else f"{number:.6g}"


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception as exc:  # exif parsing can raise many types; orientation is best effort
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return img
