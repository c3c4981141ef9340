"""Every image becomes 32x32 RGB uint8, whatever its mode or size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cifar100_dvc.images import MAX_IMAGE_PIXELS, decode_image, to_rgb, to_rgb_uint8


def solid(mode: str, value, size=(32, 32)) -> Image.Image:
    return Image.new(mode, size, value)


@pytest.mark.parametrize(
    ("image", "expected_rgb"),
    [
        (solid("RGB", (10, 20, 30)), (10, 20, 30)),
        (solid("L", 77), (77, 77, 77)),
        (solid("LA", (77, 128)), (77, 77, 77)),
        (solid("RGBA", (10, 20, 30, 0)), (10, 20, 30)),
        (solid("1", 1), (255, 255, 255)),
        (solid("I;16", 257 * 100), (100, 100, 100)),
        (solid("I", 65535), (255, 255, 255)),
        (solid("F", 12.4), (12, 12, 12)),
    ],
    ids=["RGB", "L", "LA", "RGBA", "1", "I;16", "I", "F"],
)
def test_modes_become_rgb(image, expected_rgb):
    pixels, resized = to_rgb_uint8(image)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8 and not resized
    assert tuple(pixels[0, 0]) == expected_rgb


def test_palette_image_keeps_its_colors():
    palette_image = solid("RGB", (200, 50, 25)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert to_rgb(palette_image).getpixel((0, 0)) == (200, 50, 25)


def test_cmyk_becomes_rgb():
    pixels, _ = to_rgb_uint8(solid("CMYK", (0, 255, 255, 0)))
    assert tuple(pixels[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("size", [(24, 24), (40, 40), (32, 64)])
def test_other_sizes_are_resized(size):
    pixels, resized = to_rgb_uint8(solid("RGB", (9, 8, 7), size))
    assert resized and pixels.shape == (32, 32, 3)
    assert tuple(pixels[16, 16]) == (9, 8, 7)


def test_decode_rejects_garbage_and_truncated_files():
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(b"definitely not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(buffer.getvalue()[:-40])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(5001, 5000), (9500, 9500), (20000, 20000)], ids=["just-over", "pillow-warns", "bomb"])
def test_oversized_image_is_refused_before_decoding(size):
    data = png_bytes(Image.new("1", size))  # a few KB of PNG: a decompression bomb
    assert len(data) < 60_000
    with pytest.raises(ValueError, match=r"too large to decode: [\d,]+ pixels.*more than the 25,000,000 pixels"):
        decode_image(data)


def test_large_image_within_the_limit_is_converted_exactly():
    image = decode_image(png_bytes(Image.new("RGB", (4000, 4000), (9, 8, 7))))
    assert image.size == (4000, 4000) and MAX_IMAGE_PIXELS >= 4000 * 4000
    pixels, resized = to_rgb_uint8(image)
    assert resized and (pixels == (9, 8, 7)).all()


def test_unreadable_bytes_do_not_name_the_in_memory_buffer():
    with pytest.raises(ValueError) as caught:
        decode_image(b"definitely not an image")
    assert str(caught.value) == "not a readable image (no known image format)"
