"""Reading person images robustly: any mode becomes RGB, EXIF rotation is applied, and a
file that cannot be decoded raises `ImageReadError` with the reason instead of crashing later."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageReadError(Exception):
    """An image file that exists but cannot be read as a picture."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def list_images(root: str, recursive: bool = True) -> list[str]:
    """Sorted image paths under root (by extension, case-insensitive).

    Raises FileNotFoundError / NotADirectoryError / ValueError naming the path when there is
    nothing to read, so a wrong --images argument fails at once rather than after setup.
    """
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"not a folder: {root}")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        paths += [
            os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not recursive:
            break
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return sorted(paths)


def _high_bit_depth_to_8(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale as 8-bit "L".

    16-bit data keeps its full range (divided by 257), so a dark 16-bit image stays dark;
    32-bit integers up to 255 or 65535 are read as 8- or 16-bit; floats in [0, 1] as
    fractions; anything else is stretched from its own min..max."""
    array = np.asarray(image, dtype=np.float64)
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < hi <= 65535 and lo >= 0):
        array = array / 257.0
    elif image.mode == "F" and 0.0 <= lo and hi <= 1.0:
        array = array * 255.0
    elif not (lo >= 0 and hi <= 255):
        array = (array - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        # Composite transparency on white instead of letting it turn black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_error_reason(path: str, error: OSError) -> str:
    """Why a file could not be opened or read, in words: a dangling symbolic link names its
    target; other errors give their type and the system's message."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"dangling symbolic link (to {os.readlink(path)})"
    return f"{type(error).__name__}: {error.strerror or error}"


def read_rgb(path: str) -> Image.Image:
    """Decode an image file into an upright 8-bit RGB PIL image, or raise ImageReadError
    (a file that cannot be opened or read, a dangling link, an empty file, bytes that are no
    picture or a broken one)."""
    try:
        with open(path, "rb") as f:  # one read; PIL would issue many small ones
            data = f.read()
    except OSError as error:
        raise ImageReadError(path, open_error_reason(path, error)) from error
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except UnidentifiedImageError as error:
        # PIL's message names the in-memory buffer, not the file
        reason = "not an image file PIL can identify (unknown format or not a picture)"
        raise ImageReadError(path, reason) from error
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
    ) as error:
        raise ImageReadError(path, f"{type(error).__name__}: {error}") from error
    if rgb.width == 0 or rgb.height == 0:
        raise ImageReadError(path, "image has zero size")
    return rgb


def read_error(path: str) -> str | None:
    """The reason `read_rgb(path)` fails, or None when the file reads as a picture."""
    try:
        read_rgb(path)
    except ImageReadError as error:
        return error.reason
    return None
