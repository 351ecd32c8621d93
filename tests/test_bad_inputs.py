"""The bad-input suite: one build of a folder holding every kind of odd or broken file a real
photo collection has, reconciled exactly: every input is one manifest row or one reject row,
each broken file rejected at the right stage with a reason a person understands, each odd but
valid file in the manifest, stored upright as RGB.

| input | expected |
|---|---|
| zero-byte file | decode: "empty file (0 bytes)" |
| truncated JPEG | decode: "corrupt or truncated image" |
| text file named .jpg | decode: "not an image" |
| 1x1 image | decode: "image too small (1x1 ...)" |
| unreadable (mode 000) | decode: "cannot read file: PermissionError ... Permission denied" |
| `x.jpg` + `x.png` (one key) | scan: "duplicate key ..." for the second |
| `a b.jpg` + `a_b.jpg` (different names, different keys: a hash where characters were replaced) | both in the manifest |
| CMYK JPEG, 16-bit PNG, RGBA PNG, palette PNG (with a transparent index), grayscale JPEG, EXIF-rotated JPEG, 10000x10000 PNG, a landscape with no person | in the manifest |

Unreadable file: tests often run as root, which reads a mode-000 file anyway (CAP_DAC_OVERRIDE).
As root the build then runs under `setpriv --bounding-set=-dac_override,-dac_read_search`: still
uid 0, but without the two capabilities that bypass file permissions, so the kernel refuses the
open with EACCES exactly as it would for an ordinary user (no FUSE, no mock). Only where
neither works (root without setpriv) is that one input left out, and the test says so.

No person: with tiny random weights the OpenPose network's answer on any photo is arbitrary, so
the card's "no person" count is checked against the keypoints actually stored (all scores 0
<=> counted), and the landscape (flat sky and ground, on which the tiny network finds no
peaks) must be among them.

Runtime: one local build of 20 inputs at 128x96 (openpose, clip) in a subprocess: 15 s on
2 cores, 40 s with the machine loaded 13x over.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds
from hostile_files import unreadable_runner
from PIL import Image, ImageDraw

POSEDATA = str(Path(sys.executable).with_name("posedata"))
RES = (128, 96)  # H, W
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def real_photo(fixtures_dir: Path, i: int) -> Image.Image:
    paths = sorted((fixtures_dir / "deepfashion").glob("pcdms_img*_750x1101.png"))
    return Image.open(paths[i % len(paths)]).convert("RGB").resize((300, 440), Image.Resampling.BICUBIC)


def landscape() -> Image.Image:
    """No person: a sky fading to the horizon over flat green ground."""
    w, h = 480, 320
    sky = np.linspace([90, 140, 220], [200, 220, 240], h * 2 // 3).astype(np.uint8)
    ground = np.tile(np.array([70, 120, 50], np.uint8), (h - len(sky), 1))
    rows = np.concatenate([sky, ground])
    return Image.fromarray(np.repeat(rows[:, None, :], w, axis=1), "RGB")


class Inputs:
    """The folder: `good/` real photos, `odd/` valid oddities, `bad/` broken files."""

    def __init__(self, root: Path, fixtures_dir: Path, with_unreadable: bool):
        self.root = root
        self.expect_ok: dict[str, str] = {}  # key -> what it is
        self.expect_rejected: dict[str, tuple[str, str, str]] = {}  # relative path -> (key, stage, words)

        def path(rel: str) -> Path:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            return p

        def ok(rel: str, what: str) -> Path:
            self.expect_ok[key(rel)] = what
            return path(rel)

        def bad(rel: str, stage: str, words: str, as_key: str | None = None) -> Path:
            self.expect_rejected[rel] = (as_key or key(rel), stage, words)
            return path(rel)

        for i in range(3):
            real_photo(fixtures_dir, i).save(ok(f"good/photo{i}.jpg", "real photo"), quality=92)

        # Odd but valid.
        real_photo(fixtures_dir, 0).convert("CMYK").save(ok("odd/cmyk.jpg", "CMYK JPEG"), quality=92)
        gray16 = (np.asarray(real_photo(fixtures_dir, 1).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(gray16).save(ok("odd/gray16.png", "16-bit PNG"))
        rgba = real_photo(fixtures_dir, 2).convert("RGBA")
        alpha = Image.new("L", rgba.size, 255)
        ImageDraw.Draw(alpha).rectangle((0, 0, 299, 60), fill=0)  # a transparent band on top
        rgba.putalpha(alpha)
        rgba.save(ok("odd/rgba.png", "RGBA PNG"))
        palette = real_photo(fixtures_dir, 0).quantize(colors=64)
        palette.info["transparency"] = 0
        palette.save(ok("odd/palette.png", "palette PNG"), transparency=0)
        real_photo(fixtures_dir, 1).convert("L").save(ok("odd/gray.jpg", "grayscale JPEG"), quality=92)
        # EXIF: stored sideways (rotated 90 degrees counter-clockwise), Orientation 6 = turn
        # 90 degrees clockwise to display upright.
        self.exif_upright = real_photo(fixtures_dir, 2)
        exif = Image.Exif()
        exif[0x0112] = 6
        self.exif_upright.transpose(Image.Transpose.ROTATE_90).save(ok("odd/exif_rotated.jpg", "EXIF-rotated JPEG"), quality=92, exif=exif.tobytes())
        # 10000 x 10000: a flat grey page with a photo pasted in the middle; PNG keeps it small.
        huge = Image.new("L", (10000, 10000), 200)
        huge.paste(real_photo(fixtures_dir, 0).convert("L").resize((1500, 2200)), (4250, 3900))
        huge.save(ok("odd/huge_10000x10000.png", "10000x10000 PNG"), compress_level=9)
        landscape().save(ok("odd/landscape.jpg", "photo with no person"), quality=92)

        # Broken.
        bad("bad/empty.jpg", "decode", "empty file (0 bytes)").write_bytes(b"")
        buf = io.BytesIO()
        real_photo(fixtures_dir, 1).save(buf, format="JPEG", quality=92)
        bad("bad/truncated.jpg", "decode", "corrupt or truncated image").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
        bad("bad/notes.jpg", "decode", "not an image").write_text("shopping list: milk, eggs\n")
        real_photo(fixtures_dir, 2).resize((1, 1)).save(bad("bad/dot.png", "decode", "image too small (1x1"))
        if with_unreadable:
            locked = bad("bad/locked.jpg", "decode", "Permission denied")
            real_photo(fixtures_dir, 0).save(locked, quality=92)
            locked.chmod(0)
        # Keys are injective: "dup/a b.jpg" (dup__a_b-<hash>) and "dup/a_b.jpg" (dup__a_b) are
        # two samples. "dup/x.jpg" and "dup/x.png" differ only by extension: one key, the
        # first in path order is kept.
        real_photo(fixtures_dir, 0).save(ok("dup/a b.jpg", "a name with a space"), quality=92)
        real_photo(fixtures_dir, 1).save(ok("dup/a_b.jpg", "the same name with an underscore"), quality=92)
        real_photo(fixtures_dir, 2).save(ok("dup/x.jpg", "first of a key collision"), quality=92)
        real_photo(fixtures_dir, 0).save(bad("dup/x.png", "scan", "duplicate key dup__x"))

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


def relative(source_path: str, root: Path) -> str:
    """A manifest / rejects source_path relative to the source folder (tables may hold it
    relative to --root already)."""
    return str(Path(source_path).relative_to(root)) if Path(source_path).is_absolute() else source_path


def key(rel: str) -> str:
    from posedata.sources.common import key_from_name

    return key_from_name(rel)


def test_every_bad_input_is_accounted_for(fixtures_dir, tmp_path):
    prefix, skipped = unreadable_runner()
    if skipped:
        warnings.warn(skipped, RuntimeWarning, stacklevel=1)  # shown in pytest's warnings summary
    inputs = Inputs(tmp_path / "photos", fixtures_dir, with_unreadable=skipped is None)
    out = tmp_path / "out"

    proc = subprocess.run(
        [*prefix, POSEDATA, "build", "folder", "--root", str(inputs.root), "--out", str(out), "--res", f"{RES[0]}x{RES[1]}", "--weights", "tiny", "--features", "openpose,clip", "--executor", "local"],
        capture_output=True, text=True, env=ENV, timeout=300, check=False,
    )

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    manifest = pd.read_parquet(out / "manifest.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")

    # Reconciliation: inputs = manifest rows + rejects rows, each input exactly once.
    files = inputs.files()
    assert len(files) == len(inputs.expect_ok) + len(inputs.expect_rejected) == (20 if skipped is None else 19)
    paths = [relative(p, inputs.root) for p in list(manifest["source_path"]) + list(rejects["source_path"])]
    assert sorted(paths) == files
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"inputs": len(files), "written": len(inputs.expect_ok), "rejected": len(inputs.expect_rejected)}
    assert f"inputs     {len(files):>8}" in proc.stdout

    # Each broken file: the right stage, the right key, a reason that says what is wrong.
    got = {relative(r.source_path, inputs.root): (r.key, r.stage, r.reason) for r in rejects.itertuples()}
    assert sorted(got) == sorted(inputs.expect_rejected)
    for rel, (want_key, stage, words) in inputs.expect_rejected.items():
        got_key, got_stage, reason = got[rel]
        assert (got_key, got_stage) == (want_key, stage), (rel, got[rel])
        assert words in reason, (rel, reason)
    assert got["dup/x.png"][2].endswith("x.jpg)")

    # Each odd but valid file: in the manifest with its original size, stored as an RGB JPEG.
    assert sorted(manifest["key"]) == sorted(inputs.expect_ok)
    size = {r.key: (r.original_width, r.original_height) for r in manifest.itertuples()}
    assert size["odd__huge_10000x10000"] == (10000, 10000)
    assert size["odd__exif_rotated"] == (300, 440)  # upright: the EXIF turn applied
    stored = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert image.mode == "RGB" and image.size == (RES[1], RES[0]), sample["__key__"]
            stored[sample["__key__"]] = np.asarray(image, dtype=np.float32)
    assert sorted(stored) == sorted(inputs.expect_ok)

    upright = np.asarray(inputs.exif_upright.resize((RES[1], RES[0]), Image.Resampling.BICUBIC), dtype=np.float32)
    sideways = np.asarray(inputs.exif_upright.transpose(Image.Transpose.ROTATE_90).resize((RES[1], RES[0]), Image.Resampling.BICUBIC), dtype=np.float32)
    exif = stored["odd__exif_rotated"]
    assert np.abs(exif - upright).mean() < 6 and np.abs(exif - sideways).mean() > 3 * np.abs(exif - upright).mean()
    gray16 = stored["odd__gray16"]
    assert np.abs(gray16[..., 0] - gray16[..., 2]).max() <= 4 and 30 < gray16.mean() < 230 and gray16.std() > 10  # scaled, not clipped
    rgba = stored["odd__rgba"]
    assert rgba[:10].min() > 245  # the transparent band became white
    assert stored["odd__palette"][:4].min() >= 0 and stored["odd__palette"].std() > 10
    cmyk = stored["odd__cmyk"]
    reference = np.asarray(real_photo(fixtures_dir, 0).resize((RES[1], RES[0]), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(cmyk - reference).mean() < 12  # colours survive CMYK (not inverted)
    huge = stored["odd__huge_10000x10000"]
    assert huge.std() > 5  # the pasted photo is there, scaled down

    # "no person": the card counts exactly the samples whose stored keypoints are all zero,
    # and the landscape is one of them.
    (openpose,) = [f for f in card["features"] if f.startswith("openpose@")]
    nobody = set()
    for tar in sorted((out / "features" / openpose).glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            keypoints = np.load(io.BytesIO(sample["keypoints.npy"]), allow_pickle=False)
            assert keypoints.shape == (18, 3)
            if not keypoints[:, 2].any():
                nobody.add(sample["__key__"])
    assert "odd__landscape" in nobody
    assert card["features"][openpose]["notes"].get("no person", 0) == len(nobody)
    inspect = subprocess.run([POSEDATA, "inspect", str(out)], capture_output=True, text=True, env=ENV, check=False)
    assert inspect.returncode == 0 and "no person" in inspect.stdout
    for words in ("empty file", "corrupt or truncated", "not an image", "too small", "duplicate key") + (("cannot read file",) if skipped is None else ()):
        assert words in inspect.stdout, words
