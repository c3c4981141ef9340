"""Images: pure normalization shared by ``prepare`` and ``predict`` (any PIL image -> a square of
``prepare.image_size`` RGB uint8 pixels, 32 by default), and which column of a dataset holds them
(``prepare`` and the benchmark)."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar100_dvc.common import StageError

IMAGE_SIZE = 32  # CIFAR's side, in pixels: prepare.image_size's default
SOURCE_FILE_COLUMN = "file"  # an image folder's rows: each image's path in the folder, for errors that name it

# Largest image decoded (width x height), checked from the header before any pixel is decoded.
# Every image ends up a small square, so detail beyond a few megapixels is thrown away anyway; 5000x5000
# keeps any real photo (a 24 Mpx camera frame is 6000x4000) while bounding the memory of one
# decode at ~75 MB (RGB) to ~200 MB (16-bit modes go through float64). Pillow's own guard
# (Image.MAX_IMAGE_PIXELS, ~89 Mpx) is process-global and far larger; we leave it alone.
MAX_IMAGE_PIXELS = 5000 * 5000

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode, whatever its mode (L, LA, P, RGBA, CMYK, 1, I;16, I, F, ...).

    Alpha is dropped (CIFAR has none to composite against); a palette is expanded with its
    transparency first; 16-bit and 32-bit integer pixels are scaled from 0..65535 to 0..255
    (PIL's own ``convert`` would clip them instead).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        gray_uint8 = np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray_uint8).convert("RGB")
    if image.mode == "F":
        gray_uint8 = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray_uint8).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


def to_rgb_uint8(image: Image.Image, size: int = IMAGE_SIZE) -> tuple[np.ndarray, bool]:
    """(pixels of shape (size, size, 3), uint8; whether a resize was needed).

    An image of another size is resized so that its shorter side is ``size`` (bicubic, which
    Pillow antialiases when it shrinks), then its centre ``size`` x ``size`` is cropped: the usual
    evaluation transform, which keeps the aspect ratio and drops the edges of the longer side.
    """
    rgb = to_rgb(image)
    resized = rgb.size != (size, size)
    if resized:
        width, height = rgb.size
        scale = size / min(width, height)
        new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
        rgb = rgb.resize((new_width, new_height), Image.Resampling.BICUBIC)
        left, top = (new_width - size) // 2, (new_height - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8), resized


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully; raise ValueError if they are not a readable image or too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # lazy: reads the header, not the pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own guard fired on open (an image far above our limit): the same verdict.
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise ValueError(_too_large(f"{int(found.group(1)):,} pixels" if found else "over Pillow's limit")) from None
    except UnidentifiedImageError:
        # Pillow's message names the in-memory buffer (<_io.BytesIO object at 0x...>), useless to a user.
        raise ValueError("not a readable image (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(_too_large(f"{width * height:,} pixels ({width}x{height})"))
    try:
        image.load()  # decode now: a truncated file fails here, not later
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    return image


def _too_large(size: str) -> str:
    return f"too large to decode: {size}, more than the {MAX_IMAGE_PIXELS:,} pixels (5000x5000) accepted"


def find_image_column(features) -> str:
    """The name of the image column among a ``datasets`` dataset's ``features``; StageError if there is none."""
    from datasets import Image as ImageFeature  # not PIL's Image

    for name, feature in features.items():
        if isinstance(feature, ImageFeature):
            return name
    raise StageError(f"data/raw has no image column (columns: {list(features)}): run fetch again")
