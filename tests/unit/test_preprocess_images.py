"""Preprocessor: real PNG/JPEG/WebP bytes written by Pillow, raw arrays, limits, layouts."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.contract.manifest import InputSpec, Preprocessing
from serving.errors import InvalidInputError, PayloadTooLargeError
from serving.runtime.preprocess import ImageLimits, Preprocessor

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def spec(
    *, size: int = 8, order: str = "RGB", layout: str = "NCHW", resize: int | None = 8, crop: int | None = 8,
    in_graph: bool = False,
) -> InputSpec:  # fmt: skip
    channels = 1 if order == "L" else 3
    shape = (-1, channels, size, size) if layout == "NCHW" else (-1, size, size, channels)
    return InputSpec(
        name="input",
        datatype="UINT8" if in_graph else "FP32",
        layout=layout,
        shape=shape,
        preprocessing=Preprocessing(
            resize=resize,
            crop=crop,
            mean=MEAN[:channels],
            std=STD[:channels],
            channel_order=order,
            in_graph=in_graph,
        ),
    )


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pattern(width: int, height: int) -> np.ndarray:
    """A deterministic uint8 HxWx3 image with structure in both axes."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(
        np.uint8
    )


def test_png_at_size_is_normalised_exactly_in_nchw() -> None:
    pixels = pattern(8, 8)
    out = Preprocessor(spec()).preprocess(encode(Image.fromarray(pixels)))
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    want = (pixels.transpose(2, 0, 1) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_resize_and_crop_match_the_training_image_folder_reader(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from training.data.datasets import decode_image

    pixels = pattern(37, 23)  # non-square, odd sizes: exercises rounding and crop offsets
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    reference = decode_image(path, 16, 3)  # uint8 [C, 16, 16]
    ours = Preprocessor(spec(size=16, resize=16, crop=16, in_graph=True)).preprocess(path.read_bytes())
    assert isinstance(reference, torch.Tensor)
    np.testing.assert_array_equal(ours, reference.numpy())


def test_centre_crop_keeps_the_middle() -> None:
    pixels = np.zeros((8, 24, 3), np.uint8)
    pixels[:, 8:16] = 200  # only the middle third is bright
    out = Preprocessor(spec(in_graph=True)).preprocess(encode(Image.fromarray(pixels)))
    assert (out == 200).all()


def test_jpeg_and_webp_decode() -> None:
    flat = np.full((8, 8, 3), (200, 100, 50), np.uint8)
    pre = Preprocessor(spec(in_graph=True))
    for fmt, kwargs in (("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})):
        out = pre.preprocess(encode(Image.fromarray(flat), fmt, **kwargs))
        np.testing.assert_allclose(out[:, 4, 4], [200, 100, 50], atol=4)


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((4, 8, 3), np.uint8)  # 8 wide, 4 high: left half red, right half blue
    pixels[:, :4] = (255, 0, 0)
    pixels[:, 4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left (red) half ends up on top
    data = encode(Image.fromarray(pixels), "JPEG", quality=100, exif=exif.tobytes())
    shape_spec = InputSpec(
        name="input", datatype="UINT8", layout="NHWC", shape=(-1, 8, 4, 3),
        preprocessing=Preprocessing(resize=None, crop=None, mean=MEAN, std=STD, in_graph=True),
    )  # fmt: skip
    out = Preprocessor(shape_spec).preprocess(data)  # fails on size unless rotated to 4 wide x 8 high
    assert out.shape == (8, 4, 3)
    assert out[1, 2, 0] > 200 and out[1, 2, 2] < 50  # top: red
    assert out[6, 2, 2] > 200 and out[6, 2, 0] < 50  # bottom: blue


def test_rgb_to_grayscale_and_grayscale_to_rgb() -> None:
    rgb = Image.fromarray(pattern(8, 8))
    gray = Preprocessor(spec(order="L", in_graph=True)).preprocess(encode(rgb))
    np.testing.assert_array_equal(gray[0], np.asarray(rgb.convert("L")))  # Pillow's luma, as training
    lum = Image.fromarray(pattern(8, 8)[:, :, 0])
    rgb_out = Preprocessor(spec(in_graph=True)).preprocess(encode(lum))
    assert (rgb_out[0] == rgb_out[1]).all() and (rgb_out[1] == rgb_out[2]).all()
    rgba = Image.fromarray(np.dstack([pattern(8, 8), np.full((8, 8), 128, np.uint8)]))
    assert Preprocessor(spec(in_graph=True)).preprocess(encode(rgba)).shape == (3, 8, 8)


def test_bgr_channel_order_reverses_channels() -> None:
    pixels = pattern(8, 8)
    out = Preprocessor(spec(order="BGR", in_graph=True)).preprocess(encode(Image.fromarray(pixels)))
    np.testing.assert_array_equal(out, pixels[:, :, ::-1].transpose(2, 0, 1))


def test_in_graph_nhwc_hands_over_uint8() -> None:
    pixels = pattern(8, 8)
    out = Preprocessor(spec(layout="NHWC", in_graph=True)).preprocess(encode(Image.fromarray(pixels)))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, pixels)


def test_raw_arrays_match_encoded_images() -> None:
    pre = Preprocessor(spec())
    pixels = pattern(8, 8)
    np.testing.assert_array_equal(pre.preprocess(pixels), pre.preprocess(encode(Image.fromarray(pixels))))
    big = pattern(20, 12)
    np.testing.assert_array_equal(pre.preprocess(big), pre.preprocess(encode(Image.fromarray(big))))
    gray_pre = Preprocessor(spec(order="L"))
    assert gray_pre.preprocess(pixels[:, :, 0]).shape == (1, 8, 8)
    assert gray_pre.preprocess(pixels).shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "raw image must be uint8, got float32"),
        (np.zeros((8, 8, 2), np.uint8), r"HxWxC with C in 1/3/4, got shape \[8, 8, 2\]"),
        (np.zeros((8,), np.uint8), r"got shape \[8\]"),
    ],
)
def test_bad_raw_arrays_are_refused(array: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Preprocessor(spec()).preprocess(array)


def test_wrong_size_without_resize_is_refused() -> None:
    pre = Preprocessor(spec(resize=None, crop=None))
    with pytest.raises(InvalidInputError, match="image is 10x10 after preprocessing, the model needs 8x8"):
        pre.preprocess(encode(Image.fromarray(pattern(10, 10))))
    with pytest.raises(InvalidInputError, match="image is 6x9, smaller than the 8px crop"):
        Preprocessor(spec(resize=None)).preprocess(pattern(6, 9))
    tiny = Preprocessor(spec()).preprocess(pattern(2, 2))  # with a resize step, small images scale up
    assert tiny.shape == (3, 8, 8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixel data (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    pre = Preprocessor(spec(), limits=ImageLimits(max_pixels=1_000_000))
    # Decoding this would fail as truncated (InvalidInputError); the size check must come first.
    with pytest.raises(
        PayloadTooLargeError, match="image is 5000x5000 = 25000000 pixels, the limit is 1000000"
    ):
        pre.preprocess(png_header_only(5000, 5000))


def test_pillow_decompression_bomb_is_refused() -> None:
    pre = Preprocessor(spec(), limits=ImageLimits(max_pixels=10**12))  # leave it to Pillow's own guard
    with pytest.raises(PayloadTooLargeError, match="decompression bomb"):
        pre.preprocess(png_header_only(20000, 20000))
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the global was not touched


def test_byte_limit_and_garbage() -> None:
    pre = Preprocessor(spec(), limits=ImageLimits(max_bytes=100))
    with pytest.raises(PayloadTooLargeError, match="encoded image is 101 bytes, the limit is 100"):
        pre.preprocess(b"x" * 101)
    with pytest.raises(InvalidInputError, match="cannot decode image: not a valid JPEG/PNG/WEBP image"):
        pre.preprocess(b"definitely not an image")
    with pytest.raises(InvalidInputError, match="empty image"):
        pre.preprocess(b"")


def test_truncated_and_disallowed_formats_are_refused() -> None:
    data = encode(Image.fromarray(pattern(64, 64)), "PNG")
    pre = Preprocessor(spec())
    with pytest.raises(InvalidInputError, match="corrupt or truncated PNG"):
        pre.preprocess(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="not a valid JPEG/PNG/WEBP"):
        pre.preprocess(encode(Image.fromarray(pattern(8, 8)), "GIF"))


def test_batch_in_a_thread_pool_and_async_helper() -> None:
    pre = Preprocessor(spec())
    images: list[Any] = [encode(Image.fromarray(pattern(8 + i, 8))) for i in range(4)] + [pattern(8, 8)]
    serial = pre.preprocess_batch(images)
    assert serial.shape == (5, 3, 8, 8)
    with ThreadPoolExecutor(2) as pool:
        np.testing.assert_array_equal(pre.preprocess_batch(images, executor=pool), serial)
        np.testing.assert_array_equal(asyncio.run(pre.preprocess_async(images, pool)), serial)
        with pytest.raises(InvalidInputError, match="image 1: cannot decode"):
            asyncio.run(pre.preprocess_async([images[0], b"junk"], pool))
        with pytest.raises(PayloadTooLargeError, match="image 2: "):
            limited = Preprocessor(spec(), limits=ImageLimits(max_pixels=100))
            limited.preprocess_batch([pattern(8, 8), pattern(8, 8), pattern(20, 20)], executor=pool)


def test_non_image_spec_is_refused() -> None:
    signal = InputSpec(name="x", datatype="FP32", layout="NCL", shape=(-1, 1, 16), kind="signal")
    with pytest.raises(ValueError, match="not an image input"):
        Preprocessor(signal)
