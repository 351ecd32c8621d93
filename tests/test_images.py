"""Decoding the odd files real datasets contain: each becomes RGB or a clear reject."""

import io

import numpy as np
import pytest
from PIL import Image

from posedata.images import ImageRejected, decode_image, resize


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(mode="RGB", size=(40, 60)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a jpeg\n", "not an image"),
    ],
)
def test_unreadable_bytes_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_rejected():
    data = encoded(photo(size=(200, 300)), "JPEG")
    with pytest.raises(ImageRejected, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_tiny_image_is_rejected():
    with pytest.raises(ImageRejected, match=r"too small \(1x1"):
        decode_image(encoded(photo(size=(1, 1)), "PNG"))


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG")])
def test_odd_modes_become_rgb(mode, fmt):
    image = decode_image(encoded(photo(mode), fmt))
    assert image.mode == "RGB" and image.size == (40, 60)


def test_sixteen_bit_png_scales_range_instead_of_clipping():
    arr = np.full((20, 20), 65535, dtype=np.uint16)
    arr[:10] = 32768
    image = decode_image(encoded(Image.fromarray(arr), "PNG"))
    rgb = np.asarray(image)
    assert rgb[15, 0, 0] == 255 and rgb[0, 0, 0] == 128


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    assert np.asarray(decode_image(encoded(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied():
    image = photo(size=(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    upright = decode_image(encoded(image, "JPEG", exif=exif.tobytes()))
    assert upright.size == (60, 40)


def test_resize_is_h_by_w():
    assert resize(photo(size=(750, 1101)), 512, 352).size == (352, 512)
