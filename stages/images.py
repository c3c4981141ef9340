"""Pure image normalization shared by ``prepare`` and ``predict``: any PIL image -> 32x32 RGB uint8."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SIZE = 32  # CIFAR's side, in pixels
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)

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
    """(pixels of shape (size, size, 3), uint8; whether a resize was needed)."""
    rgb = to_rgb(image)
    resized = rgb.size != (size, size)
    if resized:
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8), resized


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully; raise ValueError if they are not a readable image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    return image
