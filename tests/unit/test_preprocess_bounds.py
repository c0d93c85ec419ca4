"""Preprocessor bounds (issue 20, item 1): the resize keeps the aspect ratio, so every size it will
produce is computed from the header and refused, naming the limit, before Pillow allocates it.

Header-only PNGs (a size and no pixel data) prove a refusal came before decoding: decoding one
would fail as truncated, with a different error.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.cli import add_arguments
from serving.errors import InvalidInputError, PayloadTooLargeError
from serving.grpc.config import ConfigError, load_config
from serving.runtime.preprocess import ImageLimits, Preprocessor
from serving.scoring.model import RowLoader
from tests.unit.test_preprocess_images import encode, pattern, png_header_only, spec

WIDE_OPEN = ImageLimits(max_aspect_ratio=1e6)  # leaves the resized-pixel bound to act alone


@pytest.mark.parametrize("size", [(1, 2_000_000), (2_000_000, 1), (1, 3_000_000), (3, 61)])
def test_strips_are_refused_from_the_header_by_aspect_ratio(size: tuple[int, int]) -> None:
    with pytest.raises(
        InvalidInputError, match=rf"image is {size[0]}x{size[1]}: aspect ratio .* max_image_aspect_ratio 20"
    ):
        Preprocessor(spec()).preprocess(png_header_only(*size))  # fmt: skip


@pytest.mark.parametrize("shape", [(200_000, 1, 1), (1, 200_000, 3), (1, 21), (30, 601, 4)])
def test_raw_strips_are_refused_by_aspect_ratio(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match="max_image_aspect_ratio"):
        Preprocessor(spec()).preprocess(np.zeros(shape, np.uint8))


def test_the_aspect_limit_is_inclusive_and_settable() -> None:
    assert Preprocessor(spec()).preprocess(pattern(8, 160)).shape == (3, 8, 8)  # exactly 20:1
    with pytest.raises(InvalidInputError, match=r"aspect ratio 20.125:1"):
        Preprocessor(spec()).preprocess(pattern(8, 161))
    looser = Preprocessor(spec(), limits=ImageLimits(max_aspect_ratio=50))
    assert looser.preprocess(encode(Image.fromarray(pattern(3, 140)))).shape == (3, 8, 8)


def test_resized_pixels_are_bounded_before_the_resize() -> None:
    pre = Preprocessor(spec(), limits=ImageLimits(max_aspect_ratio=1e6, max_pixels=100_000))
    # 20,000 decoded pixels pass; the resize would make 8 x 160,000 = 1,280,000
    with pytest.raises(
        PayloadTooLargeError,
        match=r"image is 1x20000: resized to 8x160000 = 1280000 pixels, the limit is max_image_pixels 100000",
    ):
        pre.preprocess(png_header_only(1, 20_000))
    with pytest.raises(PayloadTooLargeError, match="resized to 160000x8"):
        pre.preprocess(np.zeros((1, 20_000), np.uint8))
    assert pre.preprocess(pattern(1, 1000)).shape == (3, 8, 8)  # 8 x 8000 = 64,000: within


def test_upscaling_a_small_image_is_bounded_too() -> None:
    """A big `resize` multiplies small images: the pixel limit covers the upscaled size."""
    big = spec(size=8, resize=4096, crop=8)
    with pytest.raises(PayloadTooLargeError, match="resized to 4096x40960"):
        Preprocessor(big, limits=ImageLimits(max_pixels=10_000_000)).preprocess(pattern(10, 100))


def test_exif_rotation_cannot_get_round_the_header_check() -> None:
    """The checks are symmetric in width and height: rotated or not, the same answer."""
    pixels = pattern(2, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the decoded image is 50 wide, 2 high
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    with pytest.raises(InvalidInputError, match="image is 2x50: aspect ratio 25:1"):
        Preprocessor(spec()).preprocess(data)
    rotated = Preprocessor(spec(), limits=ImageLimits(max_aspect_ratio=25)).preprocess(data)
    assert rotated.shape == (3, 8, 8)


def test_without_a_resize_there_is_no_aspect_limit() -> None:
    """No resize, no amplification: a crop or an exact size holds at most the decoded pixels."""
    out = Preprocessor(spec(resize=None, crop=8)).preprocess(pattern(8, 1000))
    np.testing.assert_array_equal(
        out, Preprocessor(spec(resize=None, crop=8)).preprocess(pattern(8, 1000)[496:504])
    )
    strip = spec(size=8, resize=None, crop=None)
    with pytest.raises(InvalidInputError, match="after preprocessing, the model needs 8x8"):
        Preprocessor(strip).preprocess(np.zeros((1, 100_000), np.uint8))


def test_a_geometry_the_model_cannot_use_is_refused_with_the_sizes_it_would_have() -> None:
    """Resize without crop: the resized size must be the model's (checked before resizing)."""
    no_crop = spec(size=8, resize=8, crop=None)
    with pytest.raises(InvalidInputError, match="image is 8x16 after preprocessing, the model needs 8x8"):
        Preprocessor(no_crop).preprocess(encode(Image.fromarray(pattern(100, 200))))
    with pytest.raises(InvalidInputError, match="image is 8x8, smaller than the 16px crop"):
        Preprocessor(spec(size=16, resize=8, crop=16)).preprocess(pattern(300, 300))


def test_normal_images_are_resized_and_cropped_as_before() -> None:
    """Shorter side -> resize (same rounding and filter), then the centre crop."""
    pixels = pattern(150, 11)  # 13.6:1, within the limit
    out = Preprocessor(spec(size=8, resize=8, crop=8, in_graph=True)).preprocess(
        encode(Image.fromarray(pixels))
    )
    resized = Image.fromarray(pixels).resize((round(150 * 8 / 11), 8), Image.Resampling.BILINEAR)
    left = (resized.width - 8) // 2
    want = np.asarray(resized.crop((left, 0, left + 8, 8))).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, want)


def test_scoring_rows_get_the_same_bounds(tmp_path: Path) -> None:
    """`kiln score` reads files with the same Preprocessor: a strip is that row's error message."""
    path = tmp_path / "strip.png"
    buffer = io.BytesIO()
    Image.new("L", (1, 2_000_000)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    loader = RowLoader(Preprocessor(spec()))
    message = loader.load(str(path), np.zeros((3, 8, 8), np.float32))
    assert message is not None and "max_image_aspect_ratio" in message


@pytest.mark.parametrize("ratio", [0.5, 0.0, -1.0, float("nan")])
def test_image_limits_validate_the_aspect_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        ImageLimits(max_aspect_ratio=ratio)


def test_the_setting_comes_from_file_env_and_flag(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    assert load_config(env={"KILN_REPO": str(repo)}).max_image_aspect_ratio == 20.0
    (tmp_path / "kiln.yaml").write_text("max_image_aspect_ratio: 40\n")
    env = {"KILN_REPO": str(repo)}
    assert load_config(config_file=tmp_path / "kiln.yaml", env=env).max_image_aspect_ratio == 40.0
    env["KILN_MAX_IMAGE_ASPECT_RATIO"] = "64"
    assert load_config(env=env).max_image_aspect_ratio == 64.0
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flag = parser.parse_args(["--max-image-aspect-ratio", "80"]).max_image_aspect_ratio
    assert load_config(env=env, overrides={"max_image_aspect_ratio": flag}).max_image_aspect_ratio == 80.0
    with pytest.raises(ConfigError, match=r"max_image_aspect_ratio: must be in \[1.0, 1000000.0\], got 0.5"):
        load_config(env={**env, "KILN_MAX_IMAGE_ASPECT_RATIO": "0.5"})


def test_preprocessed_bytes_setting_and_row_size(tmp_path: Path) -> None:
    """Classify refuses N x row_bytes over max_preprocessed_bytes before allocating the rows."""
    assert Preprocessor(spec()).row_bytes == 3 * 8 * 8 * 4
    assert Preprocessor(spec(in_graph=True)).row_bytes == 3 * 8 * 8
    env = {"KILN_REPO": str(tmp_path)}
    assert load_config(env=env).max_preprocessed_bytes == 256 * 1024 * 1024
    assert load_config(env={**env, "KILN_MAX_PREPROCESSED_BYTES": "4096"}).max_preprocessed_bytes == 4096
    with pytest.raises(ConfigError, match="max_preprocessed_bytes: must be >= 1024, got 10"):
        load_config(env={**env, "KILN_MAX_PREPROCESSED_BYTES": "10"})
