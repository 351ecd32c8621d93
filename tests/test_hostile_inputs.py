"""The build's promise under hostile input, end to end: nothing destroyed, nothing lost, no
traceback.

1. A folder holding what a real photo collection and an adversary hold (every extension
   case, names only a hash tells apart, a named pipe, a folder nobody may list, damaged EXIF,
   an ICC profile, NaN pixels, a too-large header, hidden files, a broken link) is built with
   `posedata build` in a subprocess, with the local executor and with Ray: both finish, every
   input is one manifest row or one reject row, the source folder is untouched, the two
   executors agree, `verify` passes.
2. A rerun on a folder that changed since the first build (a photo added, one removed or
   edited) is refused before anything is written, naming what changed; --overwrite rebuilds.
3. A split whose every image is rejected stays in the card with 0 samples; verify passes;
   show and train say "split X has no samples". A build that writes nothing exits 1.
4. Every user mistake (options, a damaged card or shard) is one `Error:` line.

Runtime: two subprocess builds (~10 s local, ~40 s Ray on 2 cores), a few in-process builds
of 4-6 tiny images (~3 s each); the rest is instant."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hostile_files import (
    EXIF_ORIENTATION_6_MISTYPED,
    display_p3_profile,
    encoded,
    gradient,
    png_header_only,
    unreadable_runner,
)
from PIL import Image

import posedata.images  # noqa: F401 - registers the HEIC plugin the folder is written with
from posedata.cli import main as cli_main
from posedata.sources.folder import group_fraction

POSEDATA = str(Path(sys.executable).with_name("posedata"))
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
RES = "64x48"
TINY = ["--res", RES, "--weights", "tiny", "--features", "openpose"]






class HostileFolder:
    """The folder and what each input must become: `samples` (relative paths) and
    `rejects` (relative path -> (stage, words in the reason))."""

    def __init__(self, root: Path, with_locked: bool):
        self.root = root
        self.samples: set[str] = set()
        self.rejects: dict[str, tuple[str, str]] = {}

        def put(rel: str, data: bytes, reject: tuple[str, str] | None = None) -> Path:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if reject:
                self.rejects[rel] = reject
            else:
                self.samples.add(rel)
            return path

        photo = gradient(size=(48, 64))
        jpeg = encoded(photo, "JPEG", quality=90)
        # Every extension, any case: decided by the bytes.
        for rel in ("alice/front.jpg", "alice/back.jfif", "alice/side.jpe", "alice/top.JPG"):
            put(rel, jpeg)
        put("bob/a.tif", encoded(photo, "TIFF"))
        put("bob/b.TIFF", encoded(photo, "TIFF", compression="tiff_lzw"))
        put("bob/c.gif", encoded(photo.quantize(64), "GIF"))
        put("bob/d.avif", encoded(photo, "AVIF"))
        put("bob/e.heic", encoded(photo, "HEIF"))
        put("bob/f.BMP", encoded(photo, "BMP"))
        put("bob/g.webp", encoded(photo, "WEBP"))
        put("bob/photo_without_extension", encoded(photo, "PNG"))
        # Names that only differ in characters a key cannot hold.
        for name in ("张三", "李四", "王五", unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "Café"), "😀", "x::y"):
            put(f"names/{name}.jpg", jpeg)
        put("names/x", encoded(gradient(seed=3), "JPEG"))
        put("colour/p3.jpg", encoded(Image.new("RGB", (48, 64), (200, 120, 60)), "JPEG", icc_profile=display_p3_profile(), quality=95))
        # Broken, or not a file at all.
        put("odd/exif.png", encoded(photo, "PNG", exif=b"Exif\x00\x00garbage"), ("decode", "corrupt EXIF block: SyntaxError"))
        put("odd/damaged_exif.webp", encoded(photo, "WEBP", exif=b"Exif\x00\x00garbage"), ("decode", "corrupt EXIF block: SyntaxError"))
        put("odd/rotated.jpg", encoded(photo, "JPEG", exif=EXIF_ORIENTATION_6_MISTYPED), ("decode", "corrupt EXIF block: struct.error"))
        put("odd/notes.txt", b"shopping list\n", ("decode", "not an image"))
        nan = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
        nan[5, 5] = np.nan
        put("odd/nan.tif", encoded(Image.fromarray(nan, "F"), "TIFF"), ("decode", "float image with NaN or infinite pixels"))
        put("odd/huge.png", png_header_only(17000, 17000), ("decode", "image too large: 17000x17000"))
        put("odd/.DS_Store", b"\0\0\0\1Bud1", ("scan", "hidden file"))
        os.mkfifo(root / "odd" / "pipe.jpg")
        self.rejects["odd/pipe.jpg"] = ("scan", "not a regular file (a named pipe)")
        (root / "odd" / "gone.jpg").symlink_to(root / "nowhere.jpg")
        self.rejects["odd/gone.jpg"] = ("scan", "broken symlink")
        if with_locked:
            put("locked/secret.jpg", jpeg, ("scan", "-"))  # inside: not an input of its own
            del self.rejects["locked/secret.jpg"]
            (root / "locked").chmod(0)
            self.rejects["locked"] = ("scan", "cannot list folder: PermissionError")

    def digest(self) -> dict[str, str]:
        """sha256 of every regular file this process may read (the source must not change)."""
        out = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK) and not path.is_fifo():
                out[str(path.relative_to(self.root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out


def relative(source_path: str, root: Path) -> str:
    return os.path.relpath(source_path, root) if os.path.isabs(source_path) else source_path


def run_cli(*args: str, prefix=(), timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, POSEDATA, *args], capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    prefix, skipped = unreadable_runner()
    root = tmp_path_factory.mktemp("hostile") / "photos"
    folder = HostileFolder(root, with_locked=skipped is None)
    yield folder, prefix
    if (root / "locked").exists():
        (root / "locked").chmod(0o755)


def build_and_check(hostile, out: Path, executor: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder, prefix = hostile
    before = folder.digest()
    proc = run_cli("build", "folder", "--root", str(folder.root), "--out", str(out), *TINY, "--executor", executor, prefix=prefix)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert folder.digest() == before  # the source folder is untouched

    manifest = pd.read_parquet(out / "manifest.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")
    got_samples = {relative(p, folder.root) for p in manifest["source_path"]}
    got_rejects = {relative(r.source_path, folder.root): (r.stage, r.reason) for r in rejects.itertuples()}
    assert len(manifest) + len(rejects) == len(folder.samples) + len(folder.rejects)  # each input once
    assert got_samples == folder.samples
    assert sorted(got_rejects) == sorted(folder.rejects)
    for rel, (stage, words) in folder.rejects.items():
        assert got_rejects[rel][0] == stage and words in got_rejects[rel][1], (rel, got_rejects[rel])
    assert manifest["key"].is_unique
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"inputs": len(manifest) + len(rejects), "written": len(manifest), "rejected": len(rejects)}
    if executor == "local":
        verify = CliRunner().invoke(cli_main, ["verify", str(out)])
        assert verify.exit_code == 0, verify.output
    return manifest, rejects


def test_hostile_folder_local_build(hostile, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-local") / "ds"
    manifest, rejects = build_and_check(hostile, out, "local")
    keys = dict(zip((relative(p, hostile[0].root) for p in manifest["source_path"]), manifest["key"]))
    assert keys["names/x::y.jpg"] != keys["names/x"] and keys["names/x::y.jpg"].startswith("names__x__y-")
    inspect = CliRunner().invoke(cli_main, ["inspect", str(out)])
    assert inspect.exit_code == 0 and f"inputs {len(manifest) + len(rejects)}" in inspect.output
    assert "not a regular file" in inspect.output and "not an image" in inspect.output


def test_hostile_folder_ray_build_matches_local(hostile, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-ray") / "ds"
    manifest, rejects = build_and_check(hostile, out, "ray")
    local = tmp_path_factory.getbasetemp() / "hostile-local0" / "ds"
    if local.exists():  # the local test ran first: the two executors agree row for row
        assert manifest.sort_values("key").reset_index(drop=True).equals(pd.read_parquet(local / "manifest.parquet").sort_values("key").reset_index(drop=True))
        assert sorted(map(tuple, rejects.values.tolist())) == sorted(map(tuple, pd.read_parquet(local / "rejects.parquet").values.tolist()))


# ---- 2. reruns on a changed folder -----------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


def error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: "), result.output
    return lines[-1]


def small_folder(root: Path, n: int = 4) -> Path:
    for i in range(n):
        path = root / f"g{i % 2}" / f"p{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        gradient(seed=i).save(path, quality=92)
    return root


def error_lines(stderr: str) -> list[str]:
    """The `Error:` lines of a command's stderr (progress bars may print around them)."""
    return [part[part.index("Error: "):] for line in stderr.splitlines() for part in line.split("\r") if "Error: " in part]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", ["added and removed", "added", "edited"])
def test_rerun_on_a_changed_folder_is_refused_naming_the_change(tmp_path, change):
    root = small_folder(tmp_path / "photos")
    out = tmp_path / "ds"
    args = ["build", "folder", "--root", str(root), "--out", str(out), *TINY, "--executor", "local"]
    assert invoke(*args).exit_code == 0
    dataset = snapshot(out)

    if "added" in change:
        gradient(seed=9).save(root / "g0" / "new.jpg", quality=92)
    if "removed" in change:
        (root / "g1" / "p1.jpg").unlink()
    if change == "edited":
        gradient(seed=7, size=(40, 60)).save(root / "g0" / "p0.jpg", quality=92)

    message = error_line(invoke(*args))

    assert "changed since this dataset was built" in message and "--overwrite" in message
    if "added" in change:
        assert "1 added (e.g. g0/new.jpg)" in message
    if "removed" in change:
        assert "1 removed (e.g. g1/p1.jpg)" in message
    if change == "edited":
        assert "1 changed: size or time (e.g. g0/p0.jpg)" in message
    assert snapshot(out) == dataset  # nothing written: not the card, not a marker

    assert invoke(*args, "--overwrite").exit_code == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    assert sorted(relative(p, root) for p in manifest["source_path"]) == files
    assert invoke(*args).exit_code == 0  # unchanged since: resumes (nothing to do)


def test_a_build_that_fails_its_reconciliation_writes_no_card(tmp_path):
    import pyarrow.parquet as pq

    root = small_folder(tmp_path / "photos")
    out = tmp_path / "ds"
    args = ["build", "folder", "--root", str(root), "--out", str(out), *TINY, "--executor", "local"]
    assert invoke(*args).exit_code == 0
    (out / "dataset.json").unlink()
    (marker,) = sorted((out / "_done" / "shards").glob("*.parquet"))
    pq.write_table(pq.read_table(marker).slice(1), marker)  # one input's row lost

    message = error_line(invoke(*args))

    assert "reconciliation failed: 1 planned inputs not in any shard's rows" in message and "card was not written" in message
    assert not (out / "dataset.json").exists()


# ---- 3. empty splits, nothing written --------------------------------------------------------


def groups_by_split(fraction: float) -> tuple[list[str], list[str]]:
    names = [f"person{i}" for i in range(40)]
    return [g for g in names if group_fraction(g) >= fraction], [g for g in names if group_fraction(g) < fraction]


def test_a_split_with_every_image_rejected_is_consistent_everywhere(tmp_path):
    train_groups, test_groups = groups_by_split(0.3)
    root = tmp_path / "photos"
    for i, group in enumerate(train_groups[:2]):
        for j in range(2):
            (root / group).mkdir(parents=True, exist_ok=True)
            gradient(seed=2 * i + j).save(root / group / f"{j}.jpg")
    (root / test_groups[0]).mkdir()
    for j in range(2):
        (root / test_groups[0] / f"{j}.jpg").write_text("not a photo")
    out = tmp_path / "ds"

    result = invoke("build", "folder", "--root", str(root), "--out", str(out), "--test-fraction", "0.3", "--res", RES, "--weights", "tiny", "--features", "openpose,clip", "--executor", "local")

    assert result.exit_code == 0, result.output
    assert "test=0" in result.output
    card = json.loads((out / "dataset.json").read_text())
    assert card["splits"]["test"]["samples"] == 0 and card["splits"]["train"]["samples"] == 4
    verify = invoke("verify", str(out))
    assert verify.exit_code == 0, verify.output
    assert "no samples: every input of split 'test' was rejected" in invoke("inspect", str(out)).output
    assert "split 'test' has no samples" in error_line(invoke("show", str(out), "--out", str(tmp_path / "sheet.png"), "--split", "test"))
    assert invoke("show", str(out), "--out", str(tmp_path / "sheet.png")).exit_code == 0  # picks train
    train = CliRunner().invoke(cli_main, ["train", "pcdm-prior", "--shards", str(out), "--out", str(tmp_path / "run"), "--weights", "tiny", "--split", "test", "--max-steps", "1"])
    assert train.exit_code == 1 and isinstance(train.exception, SystemExit), train.output
    (error,) = error_lines(train.output)
    assert "split 'test' has no samples" in error


def test_a_build_that_writes_nothing_exits_nonzero_with_the_reasons(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_text("not a photo")
    (root / "a" / "y.png").write_bytes(b"")
    out = tmp_path / "ds"

    result = invoke("build", "folder", "--root", str(root), "--out", str(out), *TINY, "--executor", "local")

    message = error_line(result)
    assert "nothing written: all 2 inputs were rejected" in message
    assert "decode: not an image" in result.output and "decode: empty file" in result.output
    assert not (out / "dataset.json").exists()
    assert len(pd.read_parquet(out / "rejects.parquet")) == 2

    only_hidden = tmp_path / "hidden"
    only_hidden.mkdir()
    (only_hidden / ".DS_Store").write_bytes(b"x")
    message = error_line(invoke("build", "folder", "--root", str(only_hidden), "--out", str(tmp_path / "ds2"), *TINY, "--executor", "local"))
    assert "nothing to build: all 1 inputs were rejected while scanning" in message
    assert not (tmp_path / "ds2").exists()


# ---- 4. user mistakes: one Error: line --------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--shard-size", "0"], "--shard-size"),
        (["--workers", "-1"], "--workers"),
        (["--res", "100000x100000"], "at most 8192 pixels per side"),
        (["--batch-size", "openpose=-1"], "at least 1"),
        (["--batch-size", "openpose=0"], "at least 1"),
        (["--batch-size", "openpose=abc"], "whole number"),
        (["--batch-size", "nosuchfeature=4"], "'nosuchfeature' is not a feature of this run"),
        (["--model", "clip=/models/x"], "'clip' is not a feature of this run"),
        (["--features", "openpose,bogus"], "unknown feature 'bogus'"),
        (["--features", "vae:sd99"], "no preset 'sd99'"),
    ],
)
def test_bad_options_are_one_error_line(tmp_path, extra, words):
    root = small_folder(tmp_path / "photos", n=2)
    args = ["build", "folder", "--root", str(root), "--out", str(tmp_path / "ds"), *TINY, "--executor", "local"]
    result = CliRunner().invoke(cli_main, args + extra)
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert words in result.output, result.output
    assert not (tmp_path / "ds").exists()  # refused before anything was written


def test_bad_extend_options_are_one_error_line(small_dataset):
    for extra, words in ((["--batch-size", "nosuchfeature=4"], "'nosuchfeature' is not a feature of this run"), (["--features", "bogus"], "unknown feature 'bogus'"), (["--batch-size", "vae=0"], "at least 1")):
        result = CliRunner().invoke(cli_main, ["extend", str(small_dataset), "--features", "vae:sd15", "--weights", "tiny", "--executor", "local", *extra])
        assert result.exit_code != 0 and "Traceback" not in result.output and words in result.output, result.output


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = small_folder(tmp_path_factory.mktemp("small") / "photos")
    out = root.parent / "ds"
    assert invoke("build", "folder", "--root", str(root), "--out", str(out), "--res", RES, "--weights", "tiny", "--features", "openpose,clip", "--executor", "local").exit_code == 0
    return out


def damaged_copy(dataset: Path, tmp_path: Path, relative_path: str) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    target = copy / relative_path if "*" not in relative_path else sorted(copy.glob(relative_path))[0]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    return copy


@pytest.mark.parametrize("command", ["inspect", "show", "verify"])
def test_a_truncated_card_is_one_error_line(small_dataset, tmp_path, command):
    copy = damaged_copy(small_dataset, tmp_path, "dataset.json")
    args = [command, str(copy)] + (["--out", str(tmp_path / "sheet.png")] if command == "show" else [])
    result = invoke(*args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "dataset.json" in result.output


def test_a_truncated_shard_in_show_is_one_error_line(small_dataset, tmp_path):
    copy = damaged_copy(small_dataset, tmp_path, "shards/*.tar")
    message = error_line(invoke("show", str(copy), "--out", str(tmp_path / "sheet.png")))
    assert "shards/train-000000.tar" in message and "truncated" in message


def test_a_corrupt_sidecar_in_train_is_one_error_line(small_dataset, tmp_path):
    copy = damaged_copy(small_dataset, tmp_path, "features/clip@*/*.tar")
    train = CliRunner().invoke(cli_main, ["train", "pcdm-prior", "--shards", str(copy), "--out", str(tmp_path / "run"), "--weights", "tiny", "--max-steps", "2", "--batch-size", "2"])
    assert train.exit_code == 1 and isinstance(train.exception, SystemExit), train.output
    (error,) = error_lines(train.output)
    assert "clip@" in error and "train-000000.tar" in error, error


def test_out_is_an_existing_file_or_under_a_file(small_dataset, tmp_path):
    root = small_folder(tmp_path / "photos", n=2)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file" in error_line(invoke("build", "folder", "--root", str(root), "--out", str(a_file), *TINY, "--executor", "local"))
    message = error_line(invoke("build", "folder", "--root", str(root), "--out", str(a_file / "ds"), *TINY, "--executor", "local"))
    assert "file.txt" in message


def test_a_bug_keeps_its_traceback_and_names_the_command(monkeypatch, tmp_path):
    """Only posedata's own errors become one line; anything else is a bug and says so."""
    import posedata.build

    def broken(config):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(posedata.build, "check_options", broken)
    result = CliRunner().invoke(cli_main, ["build", "folder", "--root", str(tmp_path), "--out", str(tmp_path / "ds")])
    assert isinstance(result.exception, ZeroDivisionError)
    assert any("posedata bug while running: posedata" in note for note in result.exception.__notes__)
