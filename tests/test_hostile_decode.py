"""One hostile file can only ever become a reject: everything from the file's bytes to the
stored JPEG (decode, EXIF transpose, mode and colour conversion, resize, encode) turns any
exception into `ImageRejected` naming it. A seeded fuzz corpus (300 mutations of each of
JPEG, PNG, WebP, GIF, TIFF and BMP; for the formats with EXIF / ICC blocks half of them
damage the block and embed it properly) goes through `store_image`; one small build of a
slice of it accounts for every file.

Runtime: the fuzz ~3 s, the build ~5 s."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from click.testing import CliRunner
from hostile_files import (
    EXIF_ORIENTATION_6_MISTYPED,
    display_p3_profile,
    encoded,
    gradient,
    hostile_corpus,
    png_header_only,
)
from PIL import Image, ImageCms

from posedata import images
from posedata.cli import main as cli_main
from posedata.images import ImageRejected, StoredImage, store_image

H, W = 64, 48




def test_fuzzed_files_are_samples_or_rejects_never_exceptions():
    outcomes: dict[str, dict[str, int]] = {}
    for ext, data in hostile_corpus(per_format=300, seed=0):
        try:
            result = store_image(data, H, W)
        except ImageRejected as e:
            reason = str(e)
            assert reason and "\n" not in reason
            kind = "rejected"
        else:  # anything else escaping fails the test
            assert isinstance(result, StoredImage) and Image.open(io.BytesIO(result.jpg)).size == (W, H)
            kind = "stored"
        outcomes.setdefault(ext, {"stored": 0, "rejected": 0})[kind] += 1
    assert sorted(outcomes) == ["bmp", "gif", "jpg", "png", "tif", "webp"]
    for ext, counts in outcomes.items():
        assert counts["stored"] + counts["rejected"] == 300
        assert counts["rejected"] > 0, ext  # the mutations do break things
    assert sum(c["stored"] for c in outcomes.values()) > 300  # and many files survive them


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_damaged_exif_block_is_a_reject_naming_the_error(fmt):
    data = encoded(gradient(), fmt, exif=b"Exif\x00\x00garbage-not-tiff")
    with pytest.raises(ImageRejected, match=r"corrupt EXIF block: SyntaxError: not a TIFF file"):
        store_image(data, H, W)


def test_orientation_6_with_a_mistyped_tag_is_a_reject_naming_the_error():
    data = encoded(gradient(), "JPEG", exif=EXIF_ORIENTATION_6_MISTYPED)
    with pytest.raises(ImageRejected, match=r"corrupt EXIF block: struct\.error: "):
        store_image(data, H, W)


@pytest.mark.parametrize("step", ["resize", "encode_jpeg", "to_rgb"])
def test_any_exception_in_any_step_becomes_a_reject(monkeypatch, step):
    def broken(*args, **kwargs):
        raise NotImplementedError(f"{step} cannot do this mode")

    monkeypatch.setattr(images, step, broken)
    with pytest.raises(ImageRejected, match=rf"NotImplementedError: {step} cannot do this mode"):
        store_image(encoded(gradient(), "PNG"), H, W)




def test_too_large_says_what_it_is():
    with pytest.raises(ImageRejected) as info:
        store_image(png_header_only(17000, 17000), H, W)
    assert str(info.value).startswith("image too large: 17000x17000, limit ")
    assert "bomb" not in str(info.value)


def test_float_image_with_nan_pixels_is_rejected_not_stored_black():
    pixels = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    pixels[10:20, 10:20] = np.nan
    with pytest.raises(ImageRejected, match=r"float image with NaN or infinite pixels \(100 of 3072\)"):
        store_image(encoded(Image.fromarray(pixels, "F"), "TIFF"), H, W)
    finite = store_image(encoded(Image.fromarray(np.nan_to_num(pixels), "F"), "TIFF"), H, W)
    assert np.asarray(Image.open(io.BytesIO(finite.jpg))).std() > 20


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_icc_profile_is_converted_to_srgb_and_recorded(fmt):
    profile = display_p3_profile()
    raw = Image.new("RGB", (W, H), (200, 120, 60))
    stored = store_image(encoded(raw, fmt, icc_profile=profile, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {})), H, W)

    assert stored.colour == "converted to sRGB from ICC profile 'Display P3 (posedata test)'"
    got = np.asarray(Image.open(io.BytesIO(stored.jpg)).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    expected = np.asarray(ImageCms.profileToProfile(raw, ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"), outputMode="RGB"), dtype=np.float32).mean(axis=(0, 1))
    assert np.abs(got - expected).max() < 2.5, (got, expected)
    assert np.abs(got - np.array([200, 120, 60])).max() > 8  # P3 red is redder than sRGB red
    plain = store_image(encoded(raw, fmt), H, W)
    assert plain.colour == ""


def test_a_broken_icc_profile_keeps_the_values_and_says_so():
    stored = store_image(encoded(gradient(), "PNG", icc_profile=b"not a profile at all" * 8), H, W)
    assert "ICC profile unreadable" in stored.colour and "values kept" in stored.colour


def test_a_build_of_fuzzed_files_accounts_for_every_one(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    corpus = hostile_corpus(per_format=6, seed=1)
    for i, (ext, data) in enumerate(corpus):
        (root / f"f{i:03d}.{ext}").write_bytes(data)
    (root / "p3.jpg").write_bytes(encoded(Image.new("RGB", (W, H), (200, 120, 60)), "JPEG", icc_profile=display_p3_profile(), quality=95))
    out = tmp_path / "ds"

    result = CliRunner().invoke(cli_main, ["build", "folder", "--root", str(root), "--out", str(out), "--res", f"{H}x{W}", "--weights", "tiny", "--features", "openpose", "--executor", "local"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(out / "manifest.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")
    inputs = sorted(p.name for p in root.iterdir())
    assert sorted(Path(p).name for p in [*manifest["source_path"], *rejects["source_path"]]) == inputs
    assert len(manifest) > 0 and len(rejects) > 0
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"inputs": len(inputs), "written": len(manifest), "rejected": len(rejects)}
    metas = {}
    for sample in wds.WebDataset(str(out / "shards" / "train-000000.tar"), shardshuffle=False, empty_check=False):
        metas[sample["__key__"]] = json.loads(sample["json"])
    assert metas["p3"]["colour"] == "converted to sRGB from ICC profile 'Display P3 (posedata test)'"


def test_pipes_and_files_too_large_for_a_photo_are_never_read(tmp_path, monkeypatch):
    import os

    from posedata.images import NotRegularFile, read_source_bytes

    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    with pytest.raises(NotRegularFile, match=r"not a regular file \(a named pipe\)"):
        read_source_bytes(str(pipe))  # returns at once: nothing hangs waiting for a writer
    video = tmp_path / "clip.mov"
    video.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1024)
    with pytest.raises(NotRegularFile, match=r"file too large to be a photo \(4096 bytes; limit 1024\)"):
        read_source_bytes(str(video))
