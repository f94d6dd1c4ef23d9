"""The one rule for input images — which sizes are allowed, and how a file is read and decoded — shared by the
pipeline's loader (:func:`server.stages.preprocess.load_image`), the server's upload check and the CLI's check
before any model is imported. Only Pillow: importing this module costs no numpy and no torch.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from server.common.errors import BadInputError

MAX_PIXELS = 40_000_000
"""Largest accepted input, in pixels (width × height): far above any useful input (everything is thumbnailed to 512
first) while keeping the decoded RGBA buffer below ~160 MB."""
MIN_SIDE = 16
"""Smallest accepted width or height in pixels; below this there is no object to see."""
ACCEPTED = "an image file Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF, …; 8/16-bit, float, grey, palette, RGB(A))"


def allowed_sizes(max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> str:
    """The size rule in words, for messages and help texts."""
    return f"each side at least {min_side} px and at most {max_pixels:,} pixels ({max_pixels / 1e6:g} MP) in all"


def check_image_size(size: tuple[int, int], what: str, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> None:
    """Refuse an image whose ``(width, height)`` is outside the allowed range (read it from the header, before any
    pixel is decoded).

    Args:
        size: (width, height) in pixels.
        what: how the message names the image, e.g. ``"input image 'photo.png'"`` or ``"the image"``.

    Raises:
        BadInputError: "too small" or "too large", with the size and the allowed range.
    """
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise BadInputError(f"{what} is {width}×{height} = {pixels:,} pixels ({pixels / 1e6:.1f} MP), too large; "
                            f"allowed: {allowed_sizes(max_pixels, min_side)}",
                            fix=f"downscale it to at most {max_pixels / 1e6:g} MP (the model sees it at 256×256)")
    if min(width, height) < min_side:
        raise BadInputError(f"{what} is {width}×{height} px, too small; allowed: {allowed_sizes(max_pixels, min_side)}",
                            fix=f"use a larger image: the object needs at least {min_side} px a side")


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file, or BadInputError naming the path: missing, a folder, a FIFO or device (refused
    before it is opened, so that reading cannot hang), unreadable, or empty."""
    path = Path(path).expanduser()
    name = str(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None
    if mode is None or not stat.S_ISREG(mode):
        kind = "does not exist" if mode is None else "is a folder" if stat.S_ISDIR(mode) else "is not a regular file"
        raise BadInputError(f"input image {name!r} {kind}; expected {ACCEPTED}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInputError(f"input image {name!r} cannot be read: {e.strerror or e}") from None
    if not data:
        raise BadInputError(f"input image {name!r} is empty (0 bytes); expected {ACCEPTED}")
    return data


def open_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes: the size is checked from the header before a single pixel is decoded (a 60k×60k
    PNG header costs nothing to send), then every pixel is decoded, so a truncated file is found now."""
    def open_() -> Image.Image:
        image = Image.open(io.BytesIO(data))
        check_image_size(image.size, f"input image {name!r}")
        image.load()
        return image

    return decoded(open_, name)


def decoded(open_: Callable[[], Image.Image], name: str) -> Image.Image:
    """Run ``open_`` with Pillow's decompression-bomb warning turned into an error and Pillow's errors translated;
    a :class:`BadInputError` of ``open_`` (the size rule) passes through as it is."""
    try:
        # The filter is process-wide while it is active, but it only concerns this one warning category.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return open_()
    except BadInputError:  # a ValueError too: it must not be taken for Pillow's "corrupt data" below
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise BadInputError(
            f"input image {name!r} is too large to decode safely ({error}); allowed: {allowed_sizes()}"
        ) from error
    except UnidentifiedImageError as error:
        raise BadInputError(f"input {name!r} is not an image Pillow can identify; expected {ACCEPTED}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"), SyntaxError (broken
        # chunks) or ValueError, depending on the plug-in.
        hint = "" if not ImageFile.LOAD_TRUNCATED_IMAGES else " (PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set)"
        raise BadInputError(
            f"input image {name!r} is truncated or corrupt and cannot be decoded: {error}{hint}; expected a complete "
            f"file, {ACCEPTED}"
        ) from error
