"""Decoding and resizing input photos: every odd file either becomes an RGB image at the
stored resolution or raises `ImageRejected` with a reason a person understands."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Smallest side we accept: below this there is no person to pose-estimate.
MIN_SIDE = 16
# Largest image we decode (pixels). PIL's own bomb guard trips at 2 x 89 MP; we set it
# explicitly so a 10000 x 10000 photo (100 MP) is processed, and anything larger rejected.
MAX_SIDE_AT_SQUARE = 16384
MAX_PIXELS = MAX_SIDE_AT_SQUARE * MAX_SIDE_AT_SQUARE
JPEG_QUALITY = 95
# Largest file read (bytes): an uncompressed 16384 x 16384 RGB TIFF is 805 MB.
MAX_FILE_BYTES = 1 << 30


# The formats a photo comes in; Image.open tries only these (no EPS through Ghostscript, no
# font or scientific formats). HEIC / HEIF through pillow-heif; JPEG includes MPO (phones).
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF", "HEIF", "JPEG2000", "PPM")

try:
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - a runtime dependency; HEIC files are then rejected
    PHOTO_FORMATS = tuple(f for f in PHOTO_FORMATS if f != "HEIF")
Image.init()  # register every plugin: Image.open(formats=...) looks each name up
PHOTO_FORMATS = tuple(f for f in PHOTO_FORMATS if f in Image.OPEN)


class ImageRejected(ValueError):
    """This file cannot become a sample; the message is the reject reason."""


def read_source_bytes(path: str) -> bytes:
    """A source file's bytes, with plain file I/O: sources are local, and through fsspec a
    name holding `::` would be read as a chain of URLs (another file's bytes). Opened
    non-blocking and checked to be a regular file first, so a named pipe or a device among
    the photos is refused instead of hanging the build."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"not a regular file ({file_kind(info.st_mode)})")
        if info.st_size > MAX_FILE_BYTES:  # a video or a disk image among the photos
            raise NotRegularFile(f"file too large to be a photo ({info.st_size} bytes; limit {MAX_FILE_BYTES})")
        return handle.read()


class NotRegularFile(OSError):
    """A path that is never read: a pipe, socket or device, or a file too large for a photo."""


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a file"


@dataclass
class StoredImage:
    """What the build keeps of one input photo."""

    jpg: bytes  # at the stored resolution
    original_size: tuple[int, int]  # (width, height), upright
    colour: str  # how colours were handled (an ICC profile converted to sRGB), or ""


def store_image(data: bytes, height: int, width: int) -> StoredImage:
    """Input bytes -> the stored JPEG at height x width. Any failure on the way (decoding,
    EXIF transpose, mode or colour conversion, resize, encode) raises ImageRejected naming
    the exception, so one hostile file can only ever become a reject."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns per damaged tag; the reason says it once
            image, colour = _decode(data)
            return StoredImage(encode_jpeg(resize(image, height, width)), image.size, colour)
    except ImageRejected:
        raise
    except MemoryError:
        raise ImageRejected("image too large to decode in memory") from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder throws, it is this file's fault
        raise ImageRejected(f"corrupt or truncated image: {_exception_text(e)}") from None


def decode_image(data: bytes, path: str = "") -> Image.Image:
    """Bytes -> upright RGB PIL image (sRGB), handling the modes real datasets contain."""
    return _decode(data)[0]


def _exception_text(error: BaseException) -> str:
    """`struct.error: unpack requires ...`: the exception's class and its first line."""
    cls = type(error)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{name}: {text}" if text else name


def _decode(data: bytes) -> tuple[Image.Image, str]:
    if len(data) == 0:
        raise ImageRejected("empty file (0 bytes)")
    try:
        image = _open_checked(data)
        with _pixel_limit(MAX_PIXELS):  # frames and tiles some formats size while loading
            image.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image (its bytes are none of JPEG, PNG, WebP, GIF, TIFF, BMP, AVIF, HEIC, JPEG 2000, PPM)") from None
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, struct.error, TypeError, ...
        raise ImageRejected(f"corrupt or truncated image: {_exception_text(e)}") from None
    try:
        # EXIF orientation: phone photos are stored sideways with a rotate tag.
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # noqa: BLE001
        raise ImageRejected(f"corrupt EXIF block: {_exception_text(e)}") from None
    if image.mode == "F":
        pixels = np.asarray(image)
        bad = int(np.count_nonzero(~np.isfinite(pixels)))
        if bad:
            raise ImageRejected(f"float image with NaN or infinite pixels ({bad} of {pixels.size})")
    image, colour = to_srgb(image)
    image = to_rgb(image)
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageRejected(f"image too small ({width}x{height}; need at least {MIN_SIDE} px per side)")
    return image, colour


def _open_checked(data: bytes) -> Image.Image:
    """Image.open with our own size limit, checked from the header before any pixel is
    decoded, so an image too large says its size (PIL's own guard only says "bomb")."""
    with _pixel_limit(None):  # the check below replaces PIL's
        image = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageRejected(f"image too large: {width}x{height}, limit {MAX_PIXELS} pixels ({MAX_SIDE_AT_SQUARE}x{MAX_SIDE_AT_SQUARE})")
    return image


@contextlib.contextmanager
def _pixel_limit(limit: int | None):
    """PIL's decompression-bomb limit set to `limit` (None: off), its warning silenced."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


_SRGB = None


def to_srgb(image: Image.Image) -> tuple[Image.Image, str]:
    """Apply an embedded ICC profile (Display P3, Adobe RGB, a CMYK press profile): the
    stored JPEG has no profile, so its values must be sRGB or colours shift. Returns the
    image (RGB when converted) and what was done, for the sample's meta. A profile that
    cannot be read or applied leaves the values as they are and says so."""
    global _SRGB
    icc = image.info.get("icc_profile")
    if not icc:
        return image, ""
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = (ImageCms.getProfileDescription(profile) or "").strip() or "unnamed"
        space = profile.profile.xcolor_space.strip()
    except Exception as e:  # noqa: BLE001
        return image, f"embedded ICC profile unreadable ({_exception_text(e)}): values kept as they are"
    if name.lower().startswith("srgb"):
        return image, f"sRGB (ICC profile {name!r})"
    if space == "RGB":
        image = to_rgb(image)  # palette, alpha (on white), 16-bit: to the profile's RGB first
    elif (space, image.mode) not in (("CMYK", "CMYK"), ("GRAY", "L")):
        return image, f"ICC profile {name!r} ({space}) does not fit a {image.mode} image: values kept as they are"
    if _SRGB is None:
        _SRGB = ImageCms.createProfile("sRGB")
    try:
        converted = ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB")
    except Exception as e:  # noqa: BLE001
        return image, f"ICC profile {name!r} could not be applied ({_exception_text(e)}): values kept as they are"
    return converted, f"converted to sRGB from ICC profile {name!r}"


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


# np.array, not np.asarray: asarray of a PIL image is read-only, and torch's DataLoader
# warns ("The given NumPy array is not writable") when it makes tensors of such arrays.
def decode_png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def decode_jpeg_rgb(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))
