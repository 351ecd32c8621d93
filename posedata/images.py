"""Decoding and resizing input photos: every odd file either becomes an RGB image at the
stored resolution or raises `ImageRejected` with a reason a person understands."""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Smallest side we accept: below this there is no person to pose-estimate.
MIN_SIDE = 16
# Largest image we decode (pixels). PIL's own bomb guard trips at 2 x 89 MP; we set it
# explicitly so a 10000 x 10000 photo (100 MP) is processed, and anything larger rejected.
MAX_PIXELS = 16384 * 16384
JPEG_QUALITY = 95


class ImageRejected(ValueError):
    """This file cannot become a sample; the message is the reject reason."""


def read_source_bytes(path: str) -> bytes:
    """A source file's bytes, with plain file I/O: sources are local, and through fsspec a
    name holding `::` would be read as a chain of URLs (another file's bytes). Opened
    non-blocking and checked to be a regular file first, so a named pipe or a device among
    the photos is refused instead of hanging the build."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"not a regular file ({file_kind(os.fstat(fd).st_mode)})")
        return handle.read()


class NotRegularFile(OSError):
    """A path that names a pipe, socket or device: never read."""


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a file"


def decode_image(data: bytes, path: str = "") -> Image.Image:
    """Bytes -> upright RGB PIL image, handling the modes real datasets contain."""
    if len(data) == 0:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageRejected(f"image too large ({width}x{height} > {MAX_PIXELS} pixels)")
            image.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (no known image format in the file's bytes)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"corrupt or truncated image: {e}") from None

    # EXIF orientation: phone photos are stored sideways with a rotate tag.
    image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageRejected(f"image too small ({width}x{height}; need at least {MIN_SIDE} px per side)")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the actual range to 8 bits instead of clipping at 255.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, the background of the fashion datasets.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK, YCbCr, LAB, L, 1, P without transparency: PIL's own conversions are right.
    return image.convert("RGB")


def resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Straight to H x W, bicubic with antialiasing (PIL's BICUBIC filters when shrinking),
    as CFLD resizes DeepFashion's high-res images."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def decode_jpeg_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
