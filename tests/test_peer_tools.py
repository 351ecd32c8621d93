"""Every tool the field uses reads a posedata dataset WITHOUT posedata: HF `datasets`
(the dataset card's configs, streaming included, joined to the base by `__key__`), Ray Data
(`read_webdataset` on a feature folder), wids (the shipped shard indexes), plain webdataset
+ numpy (fp8 members decoded with the one-liner the card documents) and DuckDB (pairs
joined to the manifest). Each runs in its own Python process in which importing posedata
fails, and compares what it decodes with what posedata's reader returns.

One dataset, built once per module with `--dtype fp8` and several features (openpose, clip,
vae:sd15) from a `folder` tree of real photos, `--root` given as a relative path:

    a/1.png a/2.png  -> split test   (group a)
    b/3.png b/4.png  -> split train  (group b; 4.png is a copy of 1.png: a leak between splits)

Runtime: the build ~10 s, each tool's process 2-15 s (Ray's the longest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from posedata.cli import main as cli_main
from posedata.reader import Dataset
from posedata.storage import BF16_DECODE, FP8_DECODE

FEATURES = "openpose,clip,vae:sd15"
PHOTOS = {"a/1.png": "pcdms_img6_750x1101.png", "a/2.png": "pcdms_img7_750x1101.png", "b/3.png": "pcdms_img8_750x1101.png", "b/4.png": "pcdms_img6_750x1101.png"}

# Runs first in every tool's process: any attempt to import posedata fails loudly.
NO_POSEDATA = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoPosedata(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "posedata" or name.startswith("posedata."):
                raise ImportError("this check must not use posedata")

    sys.meta_path.insert(0, NoPosedata())
    import json, numpy as np
    ROOT = sys.argv[1]
    EXPECTED = dict(np.load(sys.argv[2], allow_pickle=False))
    CARD = json.load(open(ROOT + "/dataset.json"))
    """
)
DONE = "\nassert not [m for m in sys.modules if m.split('.')[0] == 'posedata']\nprint('checked', CHECKED)\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory, fixtures_dir) -> Path:
    """The working directory the dataset was built from: `src/` (the photos) and `ds/`."""
    work = tmp_path_factory.mktemp("peer")
    for relative, photo in PHOTOS.items():
        (work / "src" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fixtures_dir / "deepfashion" / photo, work / "src" / relative)
    args = ["build", "folder", "--root", "src", "--out", "ds", "--res", "64x48", "--weights", "tiny", "--dtype", "fp8",
            "--features", FEATURES, "--test-fraction", "0.5", "--executor", "local"]
    cwd = os.getcwd()
    os.chdir(work)  # --root and --out as relative paths, as a user types them
    try:
        result = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert "1 image (same sha256) in more than one split" in result.output
    return work


@pytest.fixture(scope="module")
def root(work) -> Path:
    return work / "ds"


@pytest.fixture(scope="module")
def expected(root, tmp_path_factory) -> Path:
    """What posedata's reader returns, per key, for the tools' processes to compare with."""
    ds = Dataset(str(root))
    assert ds.card["splits"]["test"]["samples"] == 2 and ds.card["splits"]["train"]["samples"] == 2
    arrays = {}
    for split in ds.card["splits"]:
        for s in ds.samples(split, ["clip", "vae:sd15", "openpose"]):
            for name in ("clip.embeds", "vae.mean", "vae.std", "openpose.keypoints", "openpose.skeleton"):
                arrays[f"{name}/{s['__key__']}"] = s[name]
    path = tmp_path_factory.mktemp("expected") / "expected.npz"
    np.savez(path, **arrays)
    return path


def run_check(root: Path, expected: Path, body: str, tmp_path: Path, timeout: int = 240) -> str:
    script = tmp_path / "check.py"
    script.write_text(NO_POSEDATA + textwrap.dedent(body) + DONE)
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", WIDS_CACHE=str(tmp_path / "wids"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    # the project's checkout must not be importable by accident (cwd, PYTHONPATH)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script), str(root), str(expected)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def folder(root: Path, name: str) -> str:
    (path,) = (root / "features").glob(f"{name}@*")
    return path.name


# ---- the layout the tools rely on ------------------------------------------------------------


def test_folders_tools_read_hold_only_shards(root):
    for directory in [root / "shards", *(root / "features").iterdir()]:
        assert sorted(p.suffix for p in directory.iterdir()) == [".tar", ".tar"], directory
    card = json.loads((root / "dataset.json").read_text())
    assert card["format_version"] == 2
    clip = card["features"][folder(root, "clip")]["outputs"]["embeds.npy"]
    # the card says what the .npy members really hold, and how to decode them
    assert clip["members"] == {
        "embeds.e4m3.npy": {"dtype": "uint8", "shape": [32], "holds": "OCP FP8 E4M3 (float8_e4m3fn) bit patterns of value / scale"},
        "embeds.scale.npy": {"dtype": "float32", "shape": [1], "holds": "the per-tensor scale: max abs value / 448"},
    }
    assert clip["decode"] == FP8_DECODE and clip["precision"] == "float8_e4m3fn"


def test_no_path_of_the_building_machine_in_the_tables(root, work):
    """Every Parquet file, the base shards' meta and the card: source paths relative to
    --root, the root itself only in the card and only as the user typed it."""
    machine = [str(work), os.path.realpath(work), os.getcwd()]
    for table in sorted(root.rglob("*.parquet")):
        for row in pq.read_table(table).to_pylist():
            for value in row.values():
                assert not any(isinstance(value, str) and m in value for m in machine), (table, value)
    manifest = pq.read_table(root / "manifest.parquet").to_pandas()
    assert sorted(manifest["source_path"]) == sorted(PHOTOS)
    card_text = (root / "dataset.json").read_text()
    assert not any(m in card_text for m in machine)
    assert json.loads(card_text)["source"]["root"] == "src"
    assert not any(m in (root / "_done" / "build.json").read_text() for m in machine)
    assert not any(m.encode() in (root / "shards" / "train-000000.tar").read_bytes() for m in machine)  # the images' meta


def test_the_leak_between_splits_is_counted_and_inspect_says_so(root):
    from posedata.inspect import describe

    card = json.loads((root / "dataset.json").read_text())
    assert card["duplicates_across_splits"] == {"images": 1, "samples": 2, "splits": {"test+train": 1}, "examples": [["a__1", "b__4"]]}
    assert "1 image (same sha256) in more than one split (test+train: 1): a leak between splits; e.g. a__1 = b__4" in describe(str(root))


def test_inspect_says_when_a_split_has_no_pairs(root, tmp_path):
    """A copy whose card counts 0 train pairs (as when every group is a single image)."""
    copy = Path(shutil.copytree(root, tmp_path / "ds"))
    card = json.loads((copy / "dataset.json").read_text())
    card["splits"]["train"]["pairs"] = 0
    (copy / "dataset.json").write_text(json.dumps(card))
    from posedata.inspect import describe

    text = describe(str(copy))
    assert "0 pairs: every group holds a single image (see --group-regex); plugins that train on pairs cannot use split 'train'" in text
    assert text.count("0 pairs:") == 1  # only train


# ---- each tool, without posedata ----------------------------------------------------------------


def test_hf_datasets_loads_a_feature_config_streams_it_and_joins_it_to_the_base(root, expected, tmp_path):
    out = run_check(root, expected, """
        import datasets
        CHECKED = 0
        folders = {f["name"]: name for name, f in CARD["features"].items()}
        decode = CARD["features"][folders["clip"]]["outputs"]["embeds.npy"]["decode"]
        for split in ("train", "test"):
            clip = datasets.load_dataset(ROOT, "clip", split=split)
            assert clip.column_names == ["embeds.e4m3.npy", "embeds.scale.npy", "__key__", "__url__"], clip.column_names
            for row in clip:
                names = {"bits": np.asarray(row["embeds.e4m3.npy"]), "scale": np.asarray(row["embeds.scale.npy"], dtype=np.float32), "np": np}
                exec(decode, names)
                assert np.array_equal(names["x"], EXPECTED["clip.embeds/" + row["__key__"]]), row["__key__"]
                CHECKED += 1
        # the folder's own config name works too, and streaming
        stream = datasets.load_dataset(ROOT, folders["vae"], split="train", streaming=True)
        for row in stream:
            names = {"bits": np.asarray(row["mean.e4m3.npy"]), "scale": np.asarray(row["mean.scale.npy"], dtype=np.float32), "np": np}
            exec(decode, names)
            assert np.array_equal(names["x"], EXPECTED["vae.mean/" + row["__key__"]])
            CHECKED += 1
        # join a feature to the base by __key__, as the card says
        base = datasets.load_dataset(ROOT, "base", split="train")
        pose = datasets.load_dataset(ROOT, "openpose", split="train")
        assert base["__key__"] == pose["__key__"]
        both = datasets.concatenate_datasets([base, pose.remove_columns(["__key__", "__url__"])], axis=1)
        for row in both:
            assert np.asarray(row["jpg"]).shape == (64, 48, 3) and row["json"]["key"] == row["__key__"]
            assert np.array_equal(np.asarray(row["keypoints.npy"], dtype=np.float32), EXPECTED["openpose.keypoints/" + row["__key__"]])
            CHECKED += 1
        assert datasets.load_dataset(ROOT, split="test")["__key__"] == ["a__1", "a__2"]  # base is the default config
    """, tmp_path)
    assert "checked 8" in out


def test_ray_data_reads_a_feature_folder(root, expected, tmp_path):
    out = run_check(root, expected, f"""
        import ray
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        CHECKED = 0
        decode = CARD["features"]["{folder(root, 'vae')}"]["outputs"]["mean.npy"]["decode"]
        for row in ray.data.read_webdataset(ROOT + "/features/{folder(root, 'vae')}").take_all():
            for output in ("mean", "std"):
                names = {{"bits": row[output + ".e4m3.npy"], "scale": row[output + ".scale.npy"], "np": np}}
                exec(decode, names)
                assert np.array_equal(names["x"], EXPECTED["vae." + output + "/" + row["__key__"]])
            CHECKED += 1
        for row in ray.data.read_webdataset(ROOT + "/features/{folder(root, 'openpose')}").take_all():
            assert np.array_equal(row["keypoints.npy"], EXPECTED["openpose.keypoints/" + row["__key__"]])
            assert np.array_equal(np.asarray(row["skeleton.png"]), EXPECTED["openpose.skeleton/" + row["__key__"]])
            CHECKED += 1
        ray.shutdown()
    """, tmp_path)
    assert "checked 8" in out


def test_wids_reads_the_shipped_indexes_aligned_across_folders(root, expected, tmp_path):
    out = run_check(root, expected, f"""
        import wids
        CHECKED = 0
        decode = CARD["features"]["{folder(root, 'clip')}"]["outputs"]["embeds.npy"]["decode"]
        for split in ("train", "test"):
            base = wids.ShardListDataset(ROOT + "/meta/shards/" + split + ".wids.json")
            clip = wids.ShardListDataset(ROOT + "/meta/features/{folder(root, 'clip')}/" + split + ".wids.json")
            assert len(base) == len(clip) == 2
            for i in range(len(clip)):
                sample = clip[i]
                assert base[i]["__key__"] == sample["__key__"]  # index i is the same key in every folder
                names = {{"bits": np.asarray(sample[".embeds.e4m3.npy"]), "scale": np.asarray(sample[".embeds.scale.npy"]), "np": np}}
                exec(decode, names)
                assert np.array_equal(names["x"], EXPECTED["clip.embeds/" + sample["__key__"]])
                CHECKED += 1
    """, tmp_path)
    assert "checked 4" in out


def test_plain_webdataset_and_the_documented_numpy_one_liner(root, expected, tmp_path):
    out = run_check(root, expected, f"""
        import io
        import webdataset as wds
        CHECKED = 0
        url = ROOT + "/features/{folder(root, 'vae')}/train-{{000000..000000}}.tar"
        for sample in wds.WebDataset(url, shardshuffle=False):
            bits = np.load(io.BytesIO(sample["mean.e4m3.npy"]), allow_pickle=False)
            scale = np.load(io.BytesIO(sample["mean.scale.npy"]), allow_pickle=False)
            assert bits.dtype == np.uint8 and scale.dtype == np.float32 and scale.shape == (1,)
            {FP8_DECODE}
            assert np.array_equal(x, EXPECTED["vae.mean/" + sample["__key__"]])
            CHECKED += 1
        # the one-liner for bf16 bit patterns, on a value whose bits are known
        bits = np.array([0x3F80, 0xC040], dtype=np.uint16)
        {BF16_DECODE}
        assert x.tolist() == [1.0, -3.0]
    """, tmp_path)
    assert "checked 2" in out


def test_duckdb_joins_pairs_to_the_manifest(root, expected, tmp_path):
    out = run_check(root, expected, """
        import duckdb
        rows = duckdb.sql(f'''
            SELECT p.split, p.source_key, p.target_key, s.source_path, t.source_path, s.split, t.split
            FROM read_parquet('{ROOT}/pairs/*.parquet') p
            JOIN read_parquet('{ROOT}/manifest.parquet') s ON s.key = p.source_key
            JOIN read_parquet('{ROOT}/manifest.parquet') t ON t.key = p.target_key
            ORDER BY p.split, p.source_key
        ''').fetchall()
        assert rows == [
            ("test", "a__1", "a__2", "a/1.png", "a/2.png", "test", "test"),
            ("test", "a__2", "a__1", "a/2.png", "a/1.png", "test", "test"),
            ("train", "b__3", "b__4", "b/3.png", "b/4.png", "train", "train"),
            ("train", "b__4", "b__3", "b/4.png", "b/3.png", "train", "train"),
        ], rows
        leaks = duckdb.sql(f"SELECT count(DISTINCT source_sha256) FROM read_parquet('{ROOT}/manifest.parquet') GROUP BY source_sha256 HAVING count(DISTINCT split) > 1").fetchall()
        assert leaks == [(1,)]
        CHECKED = len(rows)
    """, tmp_path)
    assert "checked 4" in out


def test_the_dataset_card_names_every_folder_and_the_terms(root):
    text = (root / "README.md").read_text()
    front = text.split("---")[1]
    for name in ("base", folder(root, "clip"), "clip", folder(root, "vae"), "vae", "vae-sd15", "openpose"):
        assert f"- config_name: {name}\n" in front, name
    assert "default: true" in front and "license: unknown" in front
    assert FP8_DECODE in text and BF16_DECODE in text and "__key__" in text


def test_the_card_is_rewritten_unless_the_user_took_it_over(root, tmp_path):
    from posedata.interop import GENERATED_MARK, render_hub_card, write_hub_card
    from posedata.layout import DatasetLocation

    copy = Path(shutil.copytree(root, tmp_path / "ds"))
    location = DatasetLocation(str(copy))
    card = json.loads((copy / "dataset.json").read_text())
    assert write_hub_card(location, card) and GENERATED_MARK in (copy / "README.md").read_text()
    (copy / "README.md").write_text("# our card\n")  # the user's own: left alone
    assert not write_hub_card(location, card)
    assert (copy / "README.md").read_text() == "# our card\n"
    # DeepFashion's terms and citation for a DeepFashion build
    text = render_hub_card({**card, "source": {**card["source"], "name": "deepfashion"}})
    assert "license: other" in text and "license_name: deepfashion-research-only" in text
    assert "non-commercial research" in text and "@inproceedings{liu2016deepfashion" in text


def test_the_readme_gives_the_same_one_liners():
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    assert FP8_DECODE in text and BF16_DECODE in text
