"""Hostile images for Classify: valid files in every mode, truncated and bit-flipped ones,
polyglots, decompression bombs (a huge size in a valid header), strips (a few KB of valid PNG
that a shorter-side resize would blow up to gigabytes), oversized and raw-pixel images.

Each builder is a plain function of a few drawn numbers, so hypothesis shrinks well and a failing
example prints as a short call.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from protos.kiln.classify.v1 import classify_pb2 as cpb

MODES = ("L", "RGB", "RGBA", "P", "LA", "1", "I;16", "CMYK")
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # the last three are not accepted by Kiln


def encode(fmt: str, mode: str, width: int, height: int, seed: int) -> bytes:
    """A real image file; modes a format cannot store fall back to RGB."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    try:
        img = img.convert(mode)
        buffer = io.BytesIO()
        img.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, format=fmt if fmt != "TIFF" else "PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (an 8-bit grey image) but carries one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@functools.cache
def strip_png(width: int, height: int) -> bytes:
    """A real grey PNG of width x height: 1x2,000,000 is about 4 KB (cached: slow to encode)."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


# 1x2,000,000 resized on its shorter side became 32x64,000,000 (issue 20); the 900,000 ones pass a
# 1 M pixel limit (the fuzz server's) and meet the aspect-ratio limit instead
STRIPS = ((1, 2_000_000), (2_000_000, 1), (1, 3_000_000), (1, 900_000), (900_000, 1), (3, 200_000))
RAW_STRIPS = ((200_000, 1, 1), (1, 200_000, 3), (300_000, 1, 3), (2, 100_000, 4))  # height, width, channels


def jpeg_bomb(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 marker is rewritten to claim width x height."""
    data = bytearray(encode("JPEG", "L", 8, 8, 0))
    sof = data.find(b"\xff\xc0")
    if sof >= 0:
        struct.pack_into(">HH", data, sof + 5, height & 0xFFFF, width & 0xFFFF)
    return bytes(data)


POLYGLOT_TAILS = (
    b"PK\x03\x04" + b"\x00" * 26 + b"evil.sh",  # a zip appended (classic polyglot)
    b"<?php echo 1; ?>",
    b"<script>alert(1)</script>",
    b"\xff\xd8\xff\xe0" + b"\x00" * 32,  # a JPEG start after the image
)
ODD_FILES = (
    b"",
    b"\x89PNG\r\n\x1a\n",  # a signature and nothing else
    b"\xff\xd8\xff",
    b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    b"BM" + b"\x00" * 60,
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"<svg xmlns='http://www.w3.org/2000/svg' width='99999' height='99999'/>",
    b"II*\x00" + b"\x00" * 16,
)


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """Apply (position, new byte) edits; positions wrap around the data."""
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


@st.composite
def encoded_images(draw: st.DrawFn, max_bytes: int) -> bytes:
    """Encoded image bytes of one hostile kind."""
    kind = draw(
        st.sampled_from(
            ["valid", "valid", "truncated", "flipped", "polyglot", "bomb", "odd", "huge", "strip"]
        )
    )
    if kind == "strip":
        return strip_png(*draw(st.sampled_from(STRIPS)))
    if kind == "bomb":
        width, height = draw(
            st.sampled_from([(100_000, 100_000), (65_535, 65_535), (1_001, 1_000), (1, 2**31 - 1)])
        )
        return draw(st.sampled_from([png_bomb, jpeg_bomb]))(width, height)
    if kind == "odd":
        return draw(st.sampled_from(ODD_FILES))
    if kind == "huge":  # over the byte limit: refused before decoding
        return b"\x89PNG\r\n\x1a\n" + bytes(max_bytes + draw(st.integers(0, 16)))
    data = encode(
        draw(st.sampled_from(FORMATS)),
        draw(st.sampled_from(MODES)),
        draw(st.integers(1, 48)),
        draw(st.integers(1, 48)),
        draw(st.integers(0, 2**16)),
    )
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flipped":
        edits = draw(st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=8))
        return mutate(data, edits)
    if kind == "polyglot":
        return data + draw(st.sampled_from(POLYGLOT_TAILS))
    return data


@st.composite
def raw_images(draw: st.DrawFn) -> cpb.RawImage:
    """Raw pixels whose byte count is right, off by a little, or far off; odd sizes and channels;
    sometimes a valid strip (see STRIPS)."""
    if draw(st.integers(0, 7)) == 0:
        height, width, channels = draw(st.sampled_from(RAW_STRIPS))
        return cpb.RawImage(
            height=height, width=width, channels=channels, data=bytes(height * width * channels)
        )
    height = draw(st.one_of(st.integers(0, 40), st.sampled_from([1_001, 65_535, 2**32 - 1])))
    width = draw(st.one_of(st.integers(0, 40), st.sampled_from([1_000, 2**32 - 1])))
    channels = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 255]))
    expected = height * width * channels
    size = expected + draw(st.sampled_from([0, 0, 0, -1, 1, -4]))
    if not 0 <= size <= 1_100_000:
        size = draw(st.integers(0, 64))
    return cpb.RawImage(height=height, width=width, channels=channels, data=bytes(size))


@st.composite
def images(draw: st.DrawFn, max_bytes: int) -> cpb.Image:
    """One Classify image: encoded, raw, or neither."""
    which = draw(st.sampled_from(["encoded"] * 6 + ["raw", "none"]))
    if which == "encoded":
        return cpb.Image(encoded=draw(encoded_images(max_bytes)))
    if which == "raw":
        return cpb.Image(raw=draw(raw_images()))
    return cpb.Image()
