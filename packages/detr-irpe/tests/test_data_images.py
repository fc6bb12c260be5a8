"""load_rgb: every mode PIL decodes becomes the right 8-bit RGB; bad files give one line."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from detr_irpe.data.images import ImageLoadError, load_rgb, to_rgb


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def rgb_of(source, name: str | None = None) -> np.ndarray:
    image = load_rgb(source, name)
    assert image.mode == "RGB"
    return np.asarray(image)


def gray(values) -> np.ndarray:
    """Expected RGB pixels of gray values: each repeated in three channels."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


UINT16 = np.array([[0, 257, 1000], [32768, 65278, 65535]], dtype=np.uint16)
UINT16_AS_8BIT = np.rint(UINT16 / 65535 * 255).astype(np.uint8)  # 0, 1, 4, 128, 254, 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_file_keeps_its_values(fmt):
    data = encode(Image.fromarray(UINT16), fmt)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode.startswith("I"), "the file is decoded as 16-bit"
    decoded = rgb_of(data)
    assert np.array_equal(decoded, gray(UINT16_AS_8BIT)), "scaled by 65535, not clamped"
    assert UINT16_AS_8BIT.tolist() == [[0, 1, 4], [128, 254, 255]]


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_16_bit_modes_in_memory(mode):
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (3, 2), UINT16.astype(dtype).tobytes())
    assert np.array_equal(np.asarray(image).astype(np.uint16), UINT16)
    assert np.array_equal(np.asarray(to_rgb(image)), gray(UINT16_AS_8BIT))


def test_32_bit_integer_image_holding_16_bit_data():
    image = Image.fromarray(UINT16.astype(np.int32), "I")
    assert np.array_equal(np.asarray(to_rgb(image)), gray(UINT16_AS_8BIT))


def test_32_bit_integer_image_beyond_16_bits_is_stretched():
    values = np.array([[-100, 0], [100, 1_000_000 - 100]], dtype=np.int32)
    image = Image.fromarray(values, "I")
    expected = np.rint((values + 100) / 1_000_000 * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(image)), gray(expected))


def test_float_image_in_unit_range():
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    decoded = rgb_of(encode(Image.fromarray(values, "F"), "TIFF"))
    assert np.array_equal(decoded, gray([[0, 64], [128, 255]]))


def test_float_image_outside_unit_range_is_stretched_and_nan_safe():
    values = np.array([[-2.0, 0.0], [np.nan, 6.0]], dtype=np.float32)
    decoded = np.asarray(to_rgb(Image.fromarray(values, "F")))
    assert np.array_equal(decoded, gray([[0, 64], [0, 255]]))


def test_one_bit_and_grayscale():
    bits = np.array([[True, False], [False, True]])
    assert np.array_equal(rgb_of(encode(Image.fromarray(bits))), gray([[255, 0], [0, 255]]))
    levels = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    assert np.array_equal(rgb_of(encode(Image.fromarray(levels, "L"))), gray(levels))


def test_palette_without_and_with_transparency():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255])
    palette_image.putdata([0, 1])
    assert rgb_of(encode(palette_image)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    # Index 1 fully transparent: composited on black.
    data = encode(palette_image, transparency=1)
    assert rgb_of(data).tolist() == [[[255, 0, 0], [0, 0, 0]]]


RGBA = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], dtype=np.uint8)
ON_BLACK = [[[200, 100, 50], [100, 50, 25], [0, 0, 0]]]


def test_alpha_is_composited_on_black():
    decoded = rgb_of(encode(Image.fromarray(RGBA, "RGBA")))
    assert np.abs(decoded.astype(int) - np.array(ON_BLACK)).max() <= 1


def test_gray_alpha_and_palette_alpha():
    la = Image.fromarray(RGBA[..., [0, 3]], "LA")
    assert np.abs(rgb_of(encode(la)).astype(int) - gray([[200, 100, 0]])).max() <= 1
    pa = Image.fromarray(RGBA, "RGBA").convert("PA")
    decoded = np.asarray(to_rgb(pa)).astype(int)
    assert decoded[0, 2].tolist() == [0, 0, 0] and decoded[0, 0].tolist() == [200, 100, 50]


def test_premultiplied_modes():
    premultiplied = Image.fromarray(RGBA, "RGBA").convert("RGBa")
    assert np.abs(np.asarray(to_rgb(premultiplied)).astype(int) - ON_BLACK).max() <= 1
    la = Image.frombytes("La", (2, 1), bytes([100, 128, 0, 0]))
    assert np.asarray(to_rgb(la)).tolist() == [[[100] * 3, [0] * 3]]


def test_cmyk_jpeg_and_tiff():
    cmyk = Image.fromarray(np.array([[[0, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8), "CMYK")
    assert rgb_of(encode(cmyk, "TIFF")).tolist() == [[[255, 0, 0], [0, 0, 0]]]
    big = cmyk.resize((16, 16), Image.NEAREST)
    decoded = rgb_of(encode(big, "JPEG", quality=100)).astype(int)
    assert np.abs(decoded[0, 0] - [255, 0, 0]).max() <= 8


# 8-bit LAB loses more on a round trip (saturated blue comes back as (22, 7, 252)).
@pytest.mark.parametrize(("mode", "tolerance"), [("YCbCr", 2), ("LAB", 24), ("HSV", 2)])
def test_other_colour_spaces_convert(mode, tolerance):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
    image = Image.fromarray(rgb, "RGB").convert(mode)
    assert image.mode == mode
    assert np.abs(np.asarray(to_rgb(image)).astype(int) - rgb).max() <= tolerance


def test_rgb_jpeg_is_unchanged_and_detached(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    image = load_rgb(path)
    path.unlink()  # decoded fully: nothing left to read
    assert np.array_equal(np.asarray(image), rgb) and image.size == (7, 5)
    assert np.array_equal(rgb_of(encode(image)), rgb)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    data = io.BytesIO()
    frames[0].save(data, "GIF", save_all=True, append_images=frames[1:])
    assert rgb_of(data.getvalue())[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_mode_of_this_pil_decodes(mode):
    decoded = to_rgb(Image.new(mode, (3, 2)))
    assert decoded.mode == "RGB" and decoded.size == (3, 2)


def test_unsupported_mode_is_refused_naming_the_file():
    # A mode of older PIL versions, which this one cannot even create.
    image = SimpleNamespace(mode="BGR;24", info={})
    with pytest.raises(ImageLoadError, match=r"cannot decode 'x\.raw': unsupported image mode"):
        to_rgb(image, "'x.raw'")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused_naming_the_file(tmp_path: Path, fmt):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    message = str(info.value)
    assert message.startswith(f"cannot decode '{path}'") and "\n" not in message


def test_missing_garbage_and_folder_are_refused(tmp_path: Path):
    with pytest.raises(ImageLoadError, match=r"image file not found: '.*nope\.png'"):
        load_rgb(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match=r"cannot decode 'blob in zip'"):
        load_rgb(b"not an image" * 10, "'blob in zip'")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_rgb(tmp_path)
