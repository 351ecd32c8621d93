"""Nothing destroyed: an --out that could delete or mix with what posedata did not write is
refused before anything is read or written, and --overwrite removes only a dataset's own
entries. Source files are read with plain file I/O: `::` in a name is just a character.

Runtime: the refusals are instant; two tiny local builds (openpose, 4 images), ~5 s."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from posedata.cli import main as cli_main

RES = "64x48"


def invoke(*args: str):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


def build_args(root: Path, out: Path | str, *extra: str) -> list[str]:
    return ["build", "folder", "--root", str(root), "--out", str(out), "--res", RES, "--weights", "tiny", "--features", "openpose", "--executor", "local", *extra]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(result) -> str:
    """The refusal: exit code 1 and one `Error:` line naming the problem, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


@pytest.fixture()
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "alice").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (48, 64), (40 * i, 90, 160)).save(root / "alice" / f"p{i}.jpg", quality=95)
    return root


@pytest.mark.parametrize(
    "where",
    ["root itself", "parent of root", "inside root", "inside a sub-folder of root"],
)
def test_out_overlapping_root_is_refused_and_photos_survive_overwrite(photos, where):
    out = {"root itself": photos, "parent of root": photos.parent, "inside root": photos / "dataset", "inside a sub-folder of root": photos / "alice" / "ds"}[where]
    before = digest(photos.parent)
    message = error_line(invoke(*build_args(photos, out, "--overwrite")))
    assert "--root" in message and "outside --root" in message
    assert digest(photos.parent) == before  # not one byte touched


def test_out_through_a_symlink_to_root_is_refused(photos, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(photos, target_is_directory=True)
    before = digest(photos)
    error_line(invoke(*build_args(photos, link, "--overwrite")))
    assert digest(photos) == before


def test_out_with_url_chaining_is_refused(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "name").mkdir()
    (tmp_path / "name" / "precious.txt").write_text("keep me")
    message = error_line(invoke(*build_args(photos, "name::v1", "--overwrite")))
    assert "'::'" in message and "'name'" in message
    assert (tmp_path / "name" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["name", "photos"]


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(photos, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert "is a file" in error_line(invoke(*build_args(photos, a_file, "--overwrite")))
    assert a_file.read_text() == "not a folder"

    foreign = tmp_path / "thesis"
    (foreign / "chapter1").mkdir(parents=True)
    (foreign / "chapter1" / "draft.tex").write_text("\\section{Intro}")
    before = digest(foreign)
    for extra in ((), ("--overwrite",)):
        message = error_line(invoke(*build_args(photos, foreign, *extra)))
        assert "not a posedata dataset" in message and "choose another --out" in message
        assert digest(foreign) == before


def test_overwrite_removes_only_the_datasets_own_entries(photos, tmp_path):
    out = tmp_path / "ds"
    assert invoke(*build_args(photos, out)).exit_code == 0
    (out / "my-notes.md").write_text("written by a person")
    (out / "shards" / "stale.tar").write_bytes(b"old")  # inside posedata's own folder: goes

    result = invoke(*build_args(photos, out, "--overwrite"))

    assert result.exit_code == 0, result.output
    assert (out / "my-notes.md").read_text() == "written by a person"
    assert not (out / "shards" / "stale.tar").exists()
    assert json.loads((out / "dataset.json").read_text())["counts"]["written"] == 3


def test_read_only_parent_is_one_error_line(photos, tmp_path):
    """Run as an ordinary user would be (as root: without the capabilities that bypass file
    permissions, see hostile_files.unreadable_runner)."""
    import os
    import subprocess
    import sys

    from hostile_files import unreadable_runner

    prefix, skipped = unreadable_runner()
    if skipped:
        pytest.skip(skipped)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        posedata = str(Path(sys.executable).with_name("posedata"))
        proc = subprocess.run([*prefix, posedata, *build_args(photos, locked / "ds")], capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: --out ") and "cannot write there (Permission denied)" in last, last
    assert not (locked / "ds").exists()


def test_double_colon_in_a_source_name_is_read_literally(tmp_path):
    """`x::y.jpg` beside a file `x`: fsspec would read `x` (chained URLs); plain I/O reads
    the file itself."""
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (48, 64), (250, 10, 10)).save(root / "x", format="JPEG", quality=95)  # red, no extension
    Image.new("RGB", (48, 64), (10, 10, 250)).save(root / "x::y.jpg", quality=95)  # blue
    out = tmp_path / "ds"

    result = invoke(*build_args(root, out))

    assert result.exit_code == 0, result.output
    import pandas as pd

    manifest = pd.read_parquet(out / "manifest.parquet")
    by_path = {Path(p).name: k for p, k in zip(manifest["source_path"], manifest["key"])}
    assert sorted(by_path) == ["x", "x::y.jpg"]  # a file without extension is an input too
    stored = {}
    for sample in wds.WebDataset(str(out / "shards" / "train-000000.tar"), shardshuffle=False, empty_check=False):
        stored[sample["__key__"]] = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").getpixel((24, 32))
    blue = stored[by_path["x::y.jpg"]]
    red = stored[by_path["x"]]
    assert blue[2] > 200 and blue[0] < 50, blue
    assert red[0] > 200 and red[2] < 50, red


@pytest.mark.parametrize("out_exists_first", [True, False], ids=["out-made-first", "out-made-by-the-build"])
def test_symlink_under_root_into_out_is_a_reject_and_reruns_resume(photos, tmp_path, out_exists_first):
    """check_output cannot see a link under --root that leads into --out: the scan refuses
    it (one reject, nothing under it read), the same way whether --out existed yet or not,
    so a rerun over the same photos still resumes."""
    import pyarrow.parquet as pq

    out = tmp_path / "dataset"
    if out_exists_first:
        out.mkdir()
    (photos / "mirror").symlink_to(out, target_is_directory=True)
    first = invoke(*build_args(photos, out))
    assert first.exit_code == 0, first.output
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    mirror = [r for r in rejects if "mirror" in r["source_path"]]
    assert len(mirror) == 1 and "own output --out" in mirror[0]["reason"], rejects
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["source_path"] for r in manifest) == ["alice/p0.jpg", "alice/p1.jpg", "alice/p2.jpg"]
    again = invoke(*build_args(photos, out))
    assert again.exit_code == 0, again.output


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "pcdm-prior", "--shards", str(dataset), "--out", str(out), "--weights", "tiny", "--max-steps", "1", "--batch-size", "2", *extra]


def test_train_out_that_holds_other_files_is_refused_even_with_overwrite(tiny_dataset, tmp_path):
    """`posedata train --overwrite` once removed the whole --out folder; now a folder that is
    not a training run is refused, with or without --overwrite, and not one file goes."""
    dataset = tiny_dataset(features="openpose,clip")
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "thesis.tex").write_text("keep me")
    before = digest(mine)
    for extra in ((), ("--overwrite",)):
        message = error_line(invoke(*train_args(dataset, mine, *extra)))
        assert str(mine) in message and "holds no posedata training run" in message
        assert digest(mine) == before


def test_train_overwrite_removes_only_the_runs_own_entries(tiny_dataset, tmp_path):
    dataset = tiny_dataset(features="openpose,clip")
    run = tmp_path / "run"
    first = invoke(*train_args(dataset, run))
    assert first.exit_code == 0, first.output
    assert (run / "checkpoint-1").is_dir()
    (run / "notes.txt").write_text("my notes on this run")
    (run / "samples").mkdir()
    (run / "samples" / "keep.png").write_bytes(b"png")
    again = invoke(*train_args(dataset, run, "--overwrite", "--max-steps", "2", "--checkpoint-every", "2"))
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's checkpoint went
    assert (run / "notes.txt").read_text() == "my notes on this run"
    assert (run / "samples" / "keep.png").read_bytes() == b"png"
