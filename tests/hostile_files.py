"""Hostile input files for the tests: seeded byte mutations of small valid images of every
format the build decodes, images whose metadata is damaged in the ways real files are, a
Display P3 ICC profile, and a helper that reproduces a finished build's accounting."""

from __future__ import annotations

import io
import os
import random
import shutil
import struct

import numpy as np
from PIL import Image

# A JPEG EXIF block with Orientation = 6 and tag 0x0150 given a mistyped RATIONAL value:
# PIL's exif_transpose fails on it with `struct.error: required argument is not an integer`.
EXIF_ORIENTATION_6_MISTYPED = bytes.fromhex(
    "4578696600004d4d002a000000080004010f0002000000060000003e01120003000000010006000001500005000000010000004401320002000000140000004c0000000043616e6f6e000000004800000001323032303a30313a30312030303a30303a303000"
)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    """An image saved to bytes in `fmt`."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (valid signature and IHDR checksum), with a
    few bytes of pixels: how a too-large image is met without writing one."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gradient(size=(48, 64), seed=0) -> Image.Image:
    """An RGB test picture with some structure (so every codec has real work)."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, w + h)], axis=-1)
    arr = np.clip(arr + rng.integers(-20, 20, size=arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def display_p3_profile(description: str = "Display P3 (posedata test)") -> bytes:
    """A minimal ICC v2 matrix/TRC RGB profile with Display P3 primaries (D50-adapted) and a
    2.2 gamma: what an iPhone photo or a Photoshop export in P3 carries."""

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)

    def curve(gamma):
        return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(round(gamma * 256))) + b"\0\0"

    text = description.encode("ascii") + b"\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67
    while len(desc) % 4:
        desc += b"\0"
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
        (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)),
        (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
        (b"rTRC", curve(2.2)),
        (b"gTRC", curve(2.2)),
        (b"bTRC", curve(2.2)),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp"
        + b"\0" * 24 + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def base_files() -> dict[str, bytes]:
    """One small valid file per format (extension -> bytes), with metadata to damage."""
    picture = gradient()
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    icc = display_p3_profile()
    out = {}

    def save(ext, image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        out[ext] = buf.getvalue()

    save("jpg", picture, "JPEG", quality=90, exif=exif.tobytes(), icc_profile=icc)
    save("png", picture, "PNG", exif=exif.tobytes(), icc_profile=icc)
    save("webp", picture, "WEBP", quality=80, exif=exif.tobytes(), icc_profile=icc)
    frames = [picture.quantize(32), picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT).quantize(32)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, transparency=0)
    out["gif"] = buf.getvalue()
    save("tif", picture, "TIFF", compression="tiff_lzw")
    save("bmp", picture, "BMP")
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: flipped bytes, an overwritten run, a cut, a repeated slice or a
    size field set huge; headers (the first 256 bytes) are hit half of the time."""
    data = bytearray(data)

    def position() -> int:
        limit = min(len(data), 256) if rng.random() < 0.5 else len(data)
        return rng.randrange(max(1, limit))

    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[position()] = rng.randrange(256)
    elif kind == 1:
        start = position()
        data[start : start + rng.randint(2, 32)] = bytes(rng.randrange(256) for _ in range(rng.randint(2, 32)))
    elif kind == 2:
        del data[rng.randrange(1, len(data)) :]
    elif kind == 3:
        start = position()
        piece = data[start : start + rng.randint(4, 200)]
        at = position()
        data[at:at] = piece
    else:
        at = position()
        data[at : at + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x7f\xff", b"\x80\x00"])
    return bytes(data)


def with_damaged_metadata(ext: str, rng: random.Random) -> bytes:
    """A valid image whose EXIF or ICC block is mutated and then embedded properly (the
    container's checksums right), so the damage reaches the metadata parsers."""
    exif = Image.Exif()
    exif[0x0112] = rng.choice([1, 3, 6, 8])
    exif[0x010F] = "Canon"
    exif[0x0132] = "2020:01:01 00:00:00"
    exif[0x011A] = 72.0
    block, field = (exif.tobytes(), "exif") if rng.random() < 0.75 else (display_p3_profile(), "icc_profile")
    damaged = mutate(block, rng)
    buf = io.BytesIO()
    gradient(seed=rng.randrange(4)).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], **{field: damaged})
    return buf.getvalue()


def hostile_corpus(per_format: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(extension, bytes): `per_format` seeded mutations of each base file; for the formats
    that carry EXIF and ICC blocks, half of them damage the block instead of the file."""
    rng = random.Random(seed)
    corpus = []
    for ext, data in base_files().items():
        for i in range(per_format):
            if ext in ("jpg", "png", "webp") and i % 2:
                corpus.append((ext, with_damaged_metadata(ext, rng)))
            else:
                corpus.append((ext, mutate(data, rng)))
    return corpus


def unreadable_runner() -> tuple[list[str], str | None]:
    """(command prefix that makes a mode-000 file unreadable for the build, or why not)."""
    if os.geteuid() != 0:
        return [], None
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--bounding-set=-dac_override,-dac_read_search"], None
    return [], "running as root without setpriv: a mode-000 file is readable, so the unreadable input is left out"
