"""Decoding image files to 8-bit RGB, the one way every part of the package reads images.

PIL's own ``convert("RGB")`` is wrong for some modes it decodes: 16-bit grayscale
(``I;16``, a 16-bit PNG or TIFF) is clamped to 255, so nearly every pixel turns white, and
float images (``F``) are clamped the same way. :func:`load_rgb` maps each mode as follows:

* ``RGB``, ``RGBX``, ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's
  conversion (``1`` gives 0/255, ``L`` is repeated in the three channels).
* ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: divided by 65535 (the range of the type) and
  scaled to 0..255, so 16-bit data keeps its contrast.
* ``I`` (32-bit signed): 16-bit data decoded to ``I`` (values within 0..65535) is scaled as
  above; other data is stretched from its own minimum to its maximum, as 32-bit integers
  have no display range of their own.
* ``F`` (32-bit float): values within 0..1 are scaled by 255; others are stretched from
  their minimum to their maximum. NaN becomes the minimum, infinities are clipped.
* Alpha (``RGBA``, ``LA``, ``PA``, a ``P``/``L``/``RGB`` image with a ``transparency``
  colour, and the premultiplied ``RGBa``/``La``): **composited on black**, i.e. each colour
  is multiplied by its opacity. Dropping the alpha channel instead would expose whatever
  colour the encoder left under transparent pixels, which is arbitrary.
* Multi-frame files (GIF, TIFF): the first frame.

Anything else is refused with :class:`ImageLoadError`, as are missing, truncated and corrupt
files; the one-line message names the file. (Truncated files are only refused while
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is off, its default.)
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "load_rgb", "to_rgb"]

# File name extensions (lower case) taken for images when a folder is listed.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Modes PIL converts to RGB correctly by itself.
_PLAIN_MODES = frozenset({"RGB", "RGBX", "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_PREMULTIPLIED_MODES = frozenset({"RGBa", "La"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_UINT16_MAX = 65535

# Errors PIL raises for files it cannot decode (truncated data raises OSError, some plugins
# SyntaxError, EOFError or struct errors surfacing as ValueError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageLoadError(OSError):
    """An image is missing or cannot be decoded; the message names the file (and, from a
    dataset, the image id)."""


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


def load_rgb(
    source: str | os.PathLike[str] | bytes | BinaryIO, name: str | None = None
) -> Image.Image:
    """Decode an image file to an 8-bit RGB ``PIL.Image`` (see the module docstring).

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: how messages name the file, e.g. ``"'val2017/1.jpg' in archive 'val2017.zip'"``;
            default: the quoted path (``'<bytes>'`` for bytes and file objects).

    Returns:
        A fully decoded ``RGB`` image of the file's size (``W x H``), detached from the file.

    Raises:
        ImageLoadError: the file is missing, truncated, corrupt, or of an unsupported mode.
    """
    if name is None:
        name = f"'{source}'" if isinstance(source, (str, os.PathLike)) else "'<bytes>'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            # Decode now: PIL opens lazily, and a truncated file only fails on load().
            image.load()
            return to_rgb(image, name)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {name}") from None
    except (IsADirectoryError, PermissionError) as err:
        raise ImageLoadError(f"cannot read {name}: {err.strerror}") from None
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as err:
        raise ImageLoadError(f"cannot decode {name}: {_one_line(err)}") from err


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """An 8-bit RGB copy of a decoded ``image`` of any supported mode.

    Raises:
        ImageLoadError: ``image.mode`` is not supported (the message names ``name``).
    """
    mode = image.mode
    if "transparency" in image.info and mode in {"P", "L", "RGB"}:
        return _composite_on_black(image.convert("RGBA"))
    if mode in _PLAIN_MODES:
        return image.convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite_on_black(image.convert("RGBA"))
    if mode in _PREMULTIPLIED_MODES:
        # The colour channels are already multiplied by the opacity: composited on black.
        colour = np.asarray(image)[..., :-1]
        gray_or_rgb = colour if colour.shape[-1] == 3 else np.repeat(colour, 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(gray_or_rgb), "RGB")
    if mode in _UINT16_MODES:
        return _gray_to_rgb(np.asarray(image).astype(np.float64) / _UINT16_MAX)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= _UINT16_MAX:
            return _gray_to_rgb(values / _UINT16_MAX)
        return _gray_to_rgb(_stretch(values))
    if mode == "F":
        return _gray_to_rgb(_float_to_unit(np.asarray(image).astype(np.float64)))
    raise ImageLoadError(f"cannot decode {name}: unsupported image mode {mode!r}")


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _gray_to_rgb(unit: np.ndarray) -> Image.Image:
    """``(H, W)`` values in ``[0, 1]`` as an RGB image with three equal channels."""
    gray = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    """``values`` mapped linearly from ``[min, max]`` to ``[0, 1]`` (a constant image -> 0)."""
    if values.size == 0:
        return values
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _float_to_unit(values: np.ndarray) -> np.ndarray:
    """Float pixels in ``[0, 1]``: kept when already there, else stretched (NaN -> minimum)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = float(finite.min()), float(finite.max())
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if low >= 0.0 and high <= 1.0:
        return values
    return _stretch(values)
