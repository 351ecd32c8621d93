"""End to end, as a user runs it: `posedata build` (through Ray once, otherwise `--executor
local`) on DeepFashion / Market-1501 / folder trees laid out from real names and real
photos, then `posedata inspect`, `posedata show` and `posedata train` on the result. Every
output is read back with plain pyarrow / pandas / webdataset, not only with posedata.

Runtime: one Ray build (~40 s on 2 cores), a few small local builds, one 40 + 10 step
training run: about 90 s in all.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from posedata.cli import main as cli_main
from posedata.extractors import DEFAULT_FEATURES, dependency_order
from posedata.records import safe_key
from posedata.sources.deepfashion import item_group, unflatten_name

SHARD_SIZE = 6
RES = "256x176"
POSEDATA = str(Path(sys.executable).with_name("posedata"))


# ---- helpers ------------------------------------------------------------------------------


def run_posedata(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`posedata ARGS` in a fresh process, exactly as typed in a shell."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([POSEDATA, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def invoke(*args: str):
    """`posedata ARGS` through click's CliRunner (same command objects, in this process)."""
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


def key_of(name: str) -> str:
    return safe_key(name.rsplit(".", 1)[0])


def real_photos(fixtures_dir: Path) -> list[Image.Image]:
    paths = sorted((fixtures_dir / "deepfashion").glob("pcdms_img*_750x1101.png"))
    assert len(paths) == 3
    photos = [Image.open(p).convert("RGB") for p in paths]
    assert all(p.size == (750, 1101) for p in photos)
    return photos


def variant(photos: list[Image.Image], i: int, size: tuple[int, int]) -> Image.Image:
    """A distinct real photo: fixture photo i % 3, cropped a little differently, resized."""
    photo = photos[i % len(photos)]
    w, h = photo.size
    inset = 6 * (i // len(photos))
    return photo.crop((inset, inset, w - inset, h - inset)).resize(size, Image.Resampling.BICUBIC)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def tar_samples(path: Path) -> list[dict]:
    """A tar read with PLAIN webdataset: samples with __key__ and raw bytes per member."""
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    return list(dataset)


def files_digest(root: Path, skip=()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and str(p.relative_to(root)) not in skip
    }


def card_without(card: dict, *fields: str) -> dict:
    card = json.loads(json.dumps(card))
    for field in fields:
        card["build"].pop(field)
    return card


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, alone: bool = True) -> str:
    """Exit code != 0 and the error as the last line of stderr, no traceback; `alone`: the
    only line (library warnings printed while loading models may precede it otherwise)."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    if alone:
        assert len(lines) == 1, proc.stderr
    message = lines[-1]
    for needle in needles:
        assert needle in message
    return message


# ---- the DeepFashion tree -------------------------------------------------------------------


KEYPOINT_YS = [40, 62, 64, 100, 130, 60, 98, 128, 140, 190, 240, 141, 192, 241, 36, 36, -1, 38]
KEYPOINT_XS = [88, 88, 66, 60, 58, 110, 116, 120, 74, 72, 70, 102, 104, 106, 84, 92, -1, 96]


class DeepFashionTree:
    """An original-layout DeepFashion tree (img_highres/WOMEN|MEN/<cat>/id_X/NN_V_view.jpg)
    from real train.lst names, real photos, and every kind of broken input."""

    def __init__(self, root: Path, fixtures_dir: Path):
        self.root = root
        names = (fixtures_dir / "deepfashion" / "train.lst").read_text().split()
        by_item: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_item[item_group(name)].append(name)
        # Real items, in list order: A has 5 views (one of them left out of the lists),
        # B 5, C 3 (one listed but missing), E 2, and D 3 views that go to test.lst.
        wanted = [5, 5, 3, 2, 3]
        items: list[list[str]] = []
        for views in by_item.values():
            if len(views) >= 6 and len(items) < len(wanted):
                items.append(sorted(views)[: wanted[len(items)]])
        A, B, C, E, D = items
        self.items = {"A": A, "B": B, "C": C, "E": E, "D": D}
        photos = real_photos(fixtures_dir)
        img = root / "img_highres"
        count = iter(range(100))

        def path(name: str) -> Path:
            return img / unflatten_name(name)

        def photo(name: str) -> Path:
            return save(variant(photos, next(count), (750, 1101)), path(name), format="JPEG", quality=90)

        self.good = [A[0], A[1], B[0], B[1], B[2], B[3], C[0], E[0], E[1], D[0], D[1], D[2]]
        for name in (A[0], A[1], C[0], E[0], E[1], D[0], D[1], D[2]):
            photo(name)
        # Broken inputs, each under a listed name.
        for name in A + B + C:
            path(name).parent.mkdir(parents=True, exist_ok=True)
        path(A[2]).write_bytes(b"")  # zero bytes
        buf = io.BytesIO()
        variant(photos, 50, (750, 1101)).save(buf, format="JPEG", quality=90)
        path(A[3]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated JPEG
        path(B[4]).write_text("this is a text file, not a photo\n")  # text named .jpg
        save(variant(photos, 51, (16, 16)).resize((1, 1)), path(C[1]), format="JPEG")  # 1x1
        # Odd but valid: all must be accepted.
        save(variant(photos, 52, (750, 1101)).convert("CMYK"), path(B[0]), format="JPEG")
        gray16 = np.asarray(variant(photos, 53, (750, 1101)).convert("L"), dtype=np.uint16) * 257
        save(Image.fromarray(gray16), path(B[1]), format="PNG")  # 16-bit PNG under a .jpg name
        rgba = variant(photos, 54, (750, 1101)).convert("RGBA")
        rgba.putalpha(Image.new("L", rgba.size, 200))
        save(rgba, path(B[2]), format="PNG")  # PNG bytes under a .jpg name
        self.exif_upright = variant(photos, 55, (750, 1101))
        sideways = self.exif_upright.transpose(Image.Transpose.ROTATE_90)  # 1101 x 750
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display
        save(sideways, path(B[3]), format="JPEG", exif=exif.tobytes())
        self.broken = {
            A[2]: "empty",
            A[3]: "corrupt or truncated",
            B[4]: "not an image",
            C[1]: "too small",
        }
        self.odd = {"cmyk": B[0], "gray16": B[1], "rgba": B[2], "exif": B[3]}
        # In neither list: a real view of A.
        self.unlisted = A[4]
        photo(A[4])
        # Listed, but no file.
        self.missing = C[2]
        (img / "notes.txt").write_text("an input like any file: rejected by its name\n")

        self.train = [A[0], A[1], A[2], A[3], B[0], B[1], B[2], B[3], B[4], C[0], C[1], C[2], E[0], E[1]]
        self.test = [D[0], D[1], D[2]]
        (root / "train.lst").write_text("".join(f"{n}\n" for n in self.train))
        (root / "test.lst").write_text("".join(f"{n}\n" for n in self.test))

        # Official-style pair list: one pair uses the zero-byte image, one crosses items.
        self.pairs = [(A[0], A[1]), (A[1], A[0]), (B[0], B[3]), (B[3], B[0]), (B[1], B[2]), (B[2], B[1]), (E[0], E[1]), (E[1], E[0]), (A[2], A[0]), (C[0], E[0])]
        with open(root / "fasion-resize-pairs-train.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["from", "to"])
            writer.writerows(self.pairs)
        self.annotated = [A[0], B[3], E[1], A[2]]
        with open(root / "fasion-resize-annotation-train.csv", "w") as f:
            f.write("name:keypoints_y:keypoints_x\n")
            for i, name in enumerate(self.annotated):
                ys = [y if y < 0 else y + i for y in KEYPOINT_YS]
                f.write(f"{name}:{json.dumps(ys)}:{json.dumps(KEYPOINT_XS)}\n")

    def inputs(self) -> int:
        """Every file in the image tree plus every listed name without a file."""
        img = self.root / "img_highres"
        files = [p for p in img.rglob("*") if p.is_file()]
        listed = [n for lst in ("train.lst", "test.lst") for n in (self.root / lst).read_text().split()]
        missing = [n for n in listed if not (img / unflatten_name(n)).exists()]
        assert missing == [self.missing]
        return len(files) + len(missing)

    def expected_keypoints(self, name: str, scale: float) -> np.ndarray:
        i = self.annotated.index(name)
        out = np.zeros((18, 3), np.float32)
        for j, (x, y) in enumerate(zip(KEYPOINT_XS, KEYPOINT_YS)):
            if x >= 0 and y >= 0:
                out[j] = (x * scale, (y + i) * scale, 1.0)
        return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory, fixtures_dir) -> DeepFashionTree:
    return DeepFashionTree(tmp_path_factory.mktemp("deepfashion"), fixtures_dir)


def build_args(tree: DeepFashionTree, out: Path, *extra: str) -> list[str]:
    return ["build", "deepfashion", "--root", str(tree.root), "--out", str(out), "--res", RES, "--weights", "tiny", "--shard-size", str(SHARD_SIZE), *extra]


class RayBuild:
    def __init__(self, out: Path, exit_code: int, output: str, requests: list[dict], cpus: float):
        self.out, self.exit_code, self.output, self.requests, self.cpus = out, exit_code, output, requests, cpus


# CI machines have 2 cores; the Ray job must not deadlock there (actor pools that take every
# CPU leave none for the decode and write tasks). Ray is started with exactly 2 CPUs.
RAY_CPUS = 2.0


@pytest.fixture(scope="module")
def ray_build(tree, tmp_path_factory):
    """THE Ray build: `posedata build deepfashion ...` with the default executor, through the
    CLI, in this process, on a Ray with 2 CPUs. The job's extractors and the Ray workers it
    asks for are recorded for test_ray_actors_leave_room_for_decode_and_write."""
    import logging

    import ray

    import posedata.build
    import posedata.pipeline

    out = tmp_path_factory.mktemp("ray") / "df"
    requests: list[dict] = []
    original_run, original_request = posedata.pipeline.run_with_ray, posedata.pipeline.worker_request

    def run_spy(job, echo):
        requests.append({"stages": [s.name for s in job.stages]})
        return original_run(job, echo)

    def request_spy(*args, **kwargs):
        request = original_request(*args, **kwargs)
        requests.append({"workers": request.count, "num_cpus": request.num_cpus})
        return request

    patch = pytest.MonkeyPatch()
    patch.setattr(posedata.build, "run_with_ray", run_spy)
    patch.setattr(posedata.pipeline, "worker_request", request_spy)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=int(RAY_CPUS), include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    try:
        result = invoke(*build_args(tree, out))
    finally:
        patch.undo()
        ray.shutdown()
    return RayBuild(out, result.exit_code, result.output, requests, RAY_CPUS)


@pytest.fixture(scope="module")
def dataset(ray_build) -> Path:
    assert ray_build.exit_code == 0, ray_build.output[-3000:]
    return ray_build.out


def manifest_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


def rejects_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "rejects.parquet")


def shard_keys(manifest: pd.DataFrame, shard: str) -> list[str]:
    return manifest[manifest["shard"] == shard].sort_values("index")["key"].tolist()


def feature_folder(out: Path, name: str) -> Path:
    (folder,) = sorted((out / "features").glob(f"{name}@*"))
    return folder


# ---- 1. the Ray build -----------------------------------------------------------------------

# The default build: every feature the four models read, in dependency order, plus the
# source's annotated keypoints.
DEFAULT_SPECS = dependency_order(list(DEFAULT_FEATURES)) + ["keypoints_annotated"]


def test_ray_build_exits_0_and_writes_the_documented_layout(ray_build, tree):
    out = ray_build.out
    assert ray_build.exit_code == 0, ray_build.output[-3000:]
    assert "build summary" in ray_build.output, ray_build.output
    assert f"inputs     {tree.inputs():>8}" in ray_build.output
    # It really ran on Ray: one job of every default feature (parsing before clip_regions,
    # which reads it) plus the annotations, held by the Ray workers.
    assert [r["stages"] for r in ray_build.requests if "stages" in r] == [DEFAULT_SPECS]

    card = json.loads((out / "dataset.json").read_text())
    for path in ("dataset.json", "manifest.parquet", "rejects.parquet", "pairs/train.parquet", "pairs/test.parquet", "shards/train-000000.tar", "shards/test-000000.tar", "_done/build.json"):
        assert (out / path).is_file(), path
    shards = [s for split in ("test", "train") for s in card["splits"][split]["shards"]]
    assert shards == ["test-000000", "train-000000", "train-000001", "train-000002"]
    assert sorted(p.stem for p in (out / "shards").glob("*.tar")) == shards
    assert sorted(p.stem for p in (out / "_done" / "shards").glob("*.parquet")) == shards

    assert card["resolution"] == [256, 176]
    assert card["build"]["executor"] == "ray" and card["build"]["weights"] == "tiny"
    assert sorted(f["spec"] for f in card["features"].values()) == sorted(DEFAULT_SPECS)
    for folder_name, feature in card["features"].items():
        folder = out / "features" / folder_name
        fingerprint = folder.name.split("@")[1]
        assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
        assert feature["fingerprint"] == fingerprint
        assert sorted(p.stem for p in folder.glob("*.tar")) == shards
    assert (out / "meta" / "features" / feature_folder(out, "clip").name / "null.embeds.npy").is_file()
    assert not list(out.rglob(".tmp-*")), "temporary files left behind"


def test_ray_actors_leave_room_for_decode_and_write(ray_build):
    from posedata.pipeline import TASK_CPUS

    (workers,) = [r for r in ray_build.requests if "workers" in r]
    assert workers["workers"] == 1 and workers["num_cpus"] > 0
    assert workers["workers"] * workers["num_cpus"] + 2 * TASK_CPUS <= ray_build.cpus


def test_every_default_feature_reads_back_with_its_documented_shape_and_dtype(dataset):
    """Through the column reader and through plain webdataset + np.load, every output of
    every feature has the dtype the card documents and the shape it promises (H, W, M...)."""
    from posedata.reader import Dataset

    card = json.loads((dataset / "dataset.json").read_text())
    height, width = card["resolution"]
    ds = Dataset(str(dataset))
    for folder, feature in card["features"].items():
        column = ds.column(folder)
        sample = next(ds.samples("train", [folder]))
        for suffix, promise in feature["outputs"].items():
            value = sample[f"{column.alias}.{suffix.rsplit('.', 1)[0]}"]
            assert str(value.dtype) == promise["dtype"], (folder, suffix)
            expected = [{"H": height, "W": width, "H/4": -(-height // 4), "W/4": -(-width // 4)}.get(d, d) for d in promise["shape"]]
            assert len(value.shape) == len(expected), (folder, suffix, value.shape, expected)
            for got, want in zip(value.shape, expected):
                assert isinstance(want, str) or got == want, (folder, suffix, value.shape, expected)
        # Plain webdataset reads the same bytes.
        url = str(dataset / "features" / folder / "train-000000.tar")
        first = next(iter(wds.WebDataset(url, shardshuffle=False)))
        for suffix in feature["outputs"]:
            assert suffix in first, (folder, suffix)
            if suffix.endswith(".npy"):
                assert np.load(io.BytesIO(first[suffix]), allow_pickle=False).dtype.str.lstrip("<>|=") in ("f2", "f4", "i4", "u1")


def test_every_input_is_in_the_manifest_or_in_rejects_with_a_reason(dataset, tree):
    manifest, rejects = manifest_of(dataset), rejects_of(dataset)
    assert tree.inputs() == 19
    assert len(manifest) + len(rejects) == tree.inputs()
    card = json.loads((dataset / "dataset.json").read_text())
    assert card["counts"] == {"inputs": 19, "written": len(manifest), "rejected": len(rejects)}

    img = tree.root / "img_highres"
    reason_of = dict(zip(rejects["source_path"], rejects["reason"]))
    stage_of = dict(zip(rejects["source_path"], rejects["stage"]))
    for name, words in tree.broken.items():
        path = str((img / unflatten_name(name)).relative_to(tree.root))  # tables hold paths relative to --root
        assert words in reason_of[path], (name, reason_of.get(path))
        assert stage_of[path] == "decode"
    unlisted = str((img / unflatten_name(tree.unlisted)).relative_to(tree.root))
    assert "not listed" in reason_of[unlisted] and stage_of[unlisted] == "scan"
    assert "file not found" in reason_of[tree.missing] and stage_of[tree.missing] == "scan"
    notes = str((img / "notes.txt").relative_to(tree.root))
    assert "not a DeepFashion image name" in reason_of[notes] and stage_of[notes] == "scan"  # every file is an input
    assert set(rejects["key"]) == {key_of(n) for n in [*tree.broken, tree.unlisted, tree.missing]} | {"notes"}

    assert sorted(manifest["key"]) == sorted(key_of(n) for n in tree.good)
    for name in tree.odd.values():  # CMYK, 16-bit, RGBA, EXIF-rotated: all accepted
        assert key_of(name) in set(manifest["key"])
    assert (manifest["status"] == "ok").all()
    assert set(manifest[manifest["split"] == "test"]["key"]) == {key_of(n) for n in tree.test if n in tree.good}


def test_manifest_reads_with_pyarrow_and_pandas(dataset, tree):
    table = pq.read_table(dataset / "manifest.parquet")
    frame = pd.read_parquet(dataset / "manifest.parquet")
    assert table.column_names == ["key", "split", "group", "shard", "index", "source_path", "source_sha256", "original_width", "original_height", "status"]
    assert table.num_rows == len(frame) == len(tree.good)
    assert table.column("key").to_pylist() == frame["key"].tolist()
    for row in frame.itertuples():
        assert not Path(row.source_path).is_absolute()  # relative to --root: no path of the building machine
        source = tree.root / row.source_path
        assert source.is_file()
        assert row.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert row.group == source.parent.name == item_group(row.key)  # id_XXXXXXXX
    size = {row.key: (row.original_width, row.original_height) for row in frame.itertuples()}
    assert size[key_of(tree.odd["exif"])] == (750, 1101)  # upright after the EXIF rotation
    assert all(s == (750, 1101) for s in size.values())


def test_groups_never_straddle_shards(dataset):
    manifest = manifest_of(dataset)
    assert manifest.groupby("group")["shard"].nunique().max() == 1
    # Shard sizes as planned (accepted + rejected-at-decode rows of each done marker).
    markers = pd.concat([pd.read_parquet(p) for p in sorted((dataset / "_done" / "shards").glob("*.parquet"))])
    for shard, rows in markers.groupby("shard"):
        assert len(rows) <= SHARD_SIZE or rows["group"].nunique() == 1, shard
        ok = rows[rows["status"] == "ok"].sort_values("index")
        assert ok["index"].tolist() == list(range(len(ok)))
        assert ok["split"].nunique() == 1 and shard.startswith(ok["split"].iloc[0])
    assert manifest[manifest["shard"] == "train-000000"]["group"].nunique() == 2  # two items share it


def test_shards_and_sidecars_read_with_plain_webdataset(dataset, tree):
    manifest = manifest_of(dataset)
    card = json.loads((dataset / "dataset.json").read_text())
    openpose, clip, annotated = (feature_folder(dataset, n) for n in ("openpose", "clip", "keypoints_annotated"))
    embed_dim = card["features"][clip.name]["outputs"]["embeds.npy"]["shape"][0]
    assert isinstance(embed_dim, int) and embed_dim > 0
    null = np.load(dataset / "meta" / "features" / clip.name / "null.embeds.npy", allow_pickle=False)
    assert null.shape == (embed_dim,) and null.dtype == np.float16

    for shard in manifest["shard"].unique():
        expected = shard_keys(manifest, shard)
        base = tar_samples(dataset / "shards" / f"{shard}.tar")
        assert [s["__key__"] for s in base] == expected
        for sample in base:
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert image.format == "JPEG" and image.size == (176, 256) and image.mode == "RGB"
            meta = json.loads(sample["json"])
            assert meta["key"] == sample["__key__"] and meta["original_size"] == [1101, 750]

        # The other documented way to read a tar with webdataset: a DataPipeline.
        pipeline = wds.DataPipeline(wds.SimpleShardList([str(openpose / f"{shard}.tar")]), wds.tarfile_to_samples())
        pose = list(pipeline)
        assert [s["__key__"] for s in pose] == expected
        for sample in pose:
            keypoints = np.load(io.BytesIO(sample["keypoints.npy"]), allow_pickle=False)
            assert keypoints.shape == (18, 3) and keypoints.dtype == np.float32
            found = keypoints[:, 2] > 0  # stored-image pixels; a missing joint is (0, 0, 0)
            assert ((keypoints[found, 0] >= 0) & (keypoints[found, 0] < 176) & (keypoints[found, 1] >= 0) & (keypoints[found, 1] < 256)).all()
            assert not keypoints[~found].any()
            skeleton = np.asarray(Image.open(io.BytesIO(sample["skeleton.png"])))
            assert skeleton.shape == (256, 176, 3) and skeleton.dtype == np.uint8

        embeds = tar_samples(clip / f"{shard}.tar")
        assert [s["__key__"] for s in embeds] == expected
        for sample in embeds:
            array = np.load(io.BytesIO(sample["embeds.npy"]), allow_pickle=False)
            assert array.shape == (embed_dim,) and array.dtype == np.float16
            assert np.isfinite(array.astype(np.float32)).all()

        keypoints = tar_samples(annotated / f"{shard}.tar")
        assert [s["__key__"] for s in keypoints] == expected
        names = {key_of(n): n for n in tree.annotated}
        for sample in keypoints:
            array = np.load(io.BytesIO(sample["keypoints.npy"]), allow_pickle=False)
            assert array.shape == (18, 3) and array.dtype == np.float32
            if sample["__key__"] in names:  # the CSV frame is 256x176: identical here
                np.testing.assert_array_equal(array, tree.expected_keypoints(names[sample["__key__"]], 1.0))
            else:
                assert not array.any()  # no annotation: all zeros
    # Three of the annotated images made it (the fourth is the zero-byte file).
    assert sum(key_of(n) in set(manifest["key"]) for n in tree.annotated) == 3


def test_exif_rotation_and_odd_modes_are_stored_upright_rgb(dataset, tree):
    manifest = manifest_of(dataset)
    stored = {}
    for shard in manifest["shard"].unique():
        for sample in tar_samples(dataset / "shards" / f"{shard}.tar"):
            stored[sample["__key__"]] = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
    upright = np.asarray(tree.exif_upright.resize((176, 256), Image.Resampling.BICUBIC), dtype=np.float32)
    exif = stored[key_of(tree.odd["exif"])]
    assert np.abs(exif - upright).mean() < 8
    sideways = np.asarray(tree.exif_upright.rotate(90, expand=True).resize((176, 256), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(exif - sideways).mean() > 3 * np.abs(exif - upright).mean()
    gray = stored[key_of(tree.odd["gray16"])]
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 4 and gray.std() > 10  # 16-bit gray, not clipped white
    rgba = stored[key_of(tree.odd["rgba"])]
    assert rgba.std() > 10


def test_imported_pairs_exclude_the_rejected_image(dataset, tree):
    manifest = manifest_of(dataset)
    shard_of = dict(zip(manifest["key"], manifest["shard"]))
    pairs = pd.read_parquet(dataset / "pairs" / "train.parquet")
    kept = [(key_of(a), key_of(b)) for a, b in tree.pairs if key_of(a) in shard_of and key_of(b) in shard_of]
    assert len(kept) == len(tree.pairs) - 1  # the zero-byte image's pair is dropped
    assert list(zip(pairs["source_key"], pairs["target_key"])) == kept
    shards = pq.read_table(dataset / "pairs" / "train.parquet").column("shard").to_pylist()
    for a, b, shard in zip(pairs["source_key"], pairs["target_key"], shards):
        assert shard == (shard_of[a] if shard_of[a] == shard_of[b] else None)
    assert shards.count(None) == 1  # (C, E): two items in different shards
    card = json.loads((dataset / "dataset.json").read_text())
    assert card["splits"]["train"]["pairs_dropped"] == 1
    assert card["splits"]["train"]["pairs_origin"].startswith("imported")

    test_pairs = pd.read_parquet(dataset / "pairs" / "test.parquet")  # no list: generated
    test_keys = [key_of(n) for n in tree.test]
    assert sorted(zip(test_pairs["source_key"], test_pairs["target_key"])) == sorted((a, b) for a in test_keys for b in test_keys if a != b)


def test_inspect_and_show(dataset, tmp_path):
    result = invoke("inspect", str(dataset))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "inputs 19  written 12  rejected 7" in text
    assert "train" in text and "test" in text
    for name in ("openpose", "clip", "keypoints_annotated"):
        assert feature_folder(dataset, name).name in text
    for words in ("empty file", "not an image", "corrupt or truncated", "too small", "not listed", "file not found"):
        assert words in text

    sheet = tmp_path / "sheet.png"
    result = invoke("show", str(dataset), "--out", str(sheet))
    assert result.exit_code == 0, result.output
    assert sheet.stat().st_size > 0
    image = Image.open(sheet)
    assert image.format == "PNG"
    width, height = image.size
    # One row of 256 px per sample of the first split (test: 3), columns image | openpose |
    # keypoints_annotated, then a row of reject thumbnails.
    assert width >= 3 * 176 and height >= 4 * 256
    first_cell = np.asarray(image.convert("RGB"))[48 : 48 + 256, 8 : 8 + 176].astype(np.float32)
    assert first_cell.std() > 20  # a photo was drawn there, not the background


def test_512x352_build_rescales_the_annotated_keypoints(tree, tmp_path):
    out = tmp_path / "df512"
    result = invoke("build", "deepfashion", "--root", str(tree.root), "--out", str(out), "--res", "512x352", "--weights", "tiny", "--features", "clip", "--shard-size", str(SHARD_SIZE), "--executor", "local")
    assert result.exit_code == 0, result.output
    card = json.loads((out / "dataset.json").read_text())
    assert card["resolution"] == [512, 352]
    assert {f.split("@")[0] for f in card["features"]} == {"clip", "keypoints_annotated"}
    annotated = feature_folder(out, "keypoints_annotated")
    names = {key_of(n): n for n in tree.annotated}
    seen = 0
    for tar in sorted(annotated.glob("*.tar")):
        for sample in tar_samples(tar):
            array = np.load(io.BytesIO(sample["keypoints.npy"]), allow_pickle=False)
            if sample["__key__"] in names:
                expected = tree.expected_keypoints(names[sample["__key__"]], 2.0)
                np.testing.assert_allclose(array, expected)
                seen += 1
    assert seen == 3
    (base,) = list(tar_samples(out / "shards" / "test-000000.tar"))[:1]
    assert Image.open(io.BytesIO(base["jpg"])).size == (352, 512)


# ---- 2. reruns ------------------------------------------------------------------------------


def test_rerun_resumes_and_changes_nothing(dataset, tree):
    before = files_digest(dataset, skip={"dataset.json"})
    card_before = json.loads((dataset / "dataset.json").read_text())

    proc = run_posedata(*build_args(tree, dataset))  # the same command, Ray executor

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 4 of 4 shards already done" in proc.stdout
    assert files_digest(dataset, skip={"dataset.json"}) == before
    assert card_without(json.loads((dataset / "dataset.json").read_text()), "finished") == card_without(card_before, "finished")


def test_a_lost_shard_is_redone_byte_identical(dataset, tree):
    before = files_digest(dataset, skip={"dataset.json"})
    card_before = json.loads((dataset / "dataset.json").read_text())
    (dataset / "_done" / "shards" / "train-000001.parquet").unlink()
    (dataset / "shards" / "train-000001.tar").unlink()

    # The executor is not part of the build's settings: resuming locally is allowed.
    result = invoke(*build_args(tree, dataset, "--executor", "local"))

    assert result.exit_code == 0, result.output
    assert "resuming: 3 of 4 shards already done" in result.output
    assert files_digest(dataset, skip={"dataset.json"}) == before
    card = json.loads((dataset / "dataset.json").read_text())
    assert card["build"]["executor"] == "local"
    assert card_without(card, "finished", "executor") == card_without(card_before, "finished", "executor")


def test_changed_settings_refuse_to_resume(dataset, tree):
    before = files_digest(dataset)
    proc = run_posedata(*build_args(tree, dataset)[:-2], "--shard-size", "4")
    message = assert_one_line_error(proc, str(dataset), "shard_size", "--overwrite", alone=False)
    assert "different settings" in message
    assert files_digest(dataset) == before


# ---- 3. a folder of photos, and builds that cannot start ----------------------------------


def test_folder_build_of_the_real_photos_with_broken_files(fixtures_dir, tmp_path):
    root = tmp_path / "photos"
    real = sorted(p for p in (fixtures_dir / "deepfashion").iterdir() if p.suffix in (".png", ".jpg"))
    assert len(real) == 5
    for path in real:
        shutil.copy(path, (root / "look1").mkdir(parents=True, exist_ok=True) or root / "look1" / path.name)
    (root / "look2").mkdir()
    (root / "look2" / "empty.jpg").write_bytes(b"")
    (root / "look2" / "readme.jpg").write_text("not a photo")
    (root / "look2" / "half.png").write_bytes(real[2].read_bytes()[:5000])
    shutil.copy(real[0], root / "look2" / "again.jpg")  # a second group with one good image
    out = tmp_path / "out"

    result = invoke("build", "folder", "--root", str(root), "--out", str(out), "--res", RES, "--weights", "tiny", "--features", "clip", "--executor", "local")

    assert result.exit_code == 0, result.output
    manifest, rejects = manifest_of(out), rejects_of(out)
    inputs = sum(1 for p in root.rglob("*") if p.is_file())
    assert inputs == 9 and len(manifest) + len(rejects) == inputs
    assert sorted(manifest["key"]) == sorted(["look1__" + p.stem for p in real] + ["look2__again"])
    assert dict(zip(rejects["key"], rejects["stage"])) == {"look2__empty": "decode", "look2__readme": "decode", "look2__half": "decode"}
    reasons = dict(zip(rejects["key"], rejects["reason"]))
    assert "empty" in reasons["look2__empty"] and "not an image" in reasons["look2__readme"]
    assert "corrupt or truncated" in reasons["look2__half"]
    size = {row.key: (row.original_width, row.original_height) for row in manifest.itertuples()}
    assert size["look1__patn_women1_176x256"] == (176, 256)
    assert size["look1__pcdms_img6_750x1101"] == (750, 1101)
    assert set(manifest["group"]) == {"look1", "look2"}
    pairs = pd.read_parquet(out / "pairs" / "train.parquet")
    assert len(pairs) == 5 * 4  # all ordered pairs within look1; look2 has one image


def test_build_of_a_missing_root_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    proc = run_posedata("build", "deepfashion", "--root", str(missing), "--out", str(tmp_path / "out"), "--weights", "tiny", "--executor", "local")
    assert_one_line_error(proc, str(missing), "no such directory")
    assert not (tmp_path / "out").exists()


def test_deepfashion_build_of_an_empty_folder_says_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_posedata("build", "deepfashion", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--weights", "tiny", "--executor", "local")
    message = assert_one_line_error(proc, str(tmp_path / "empty"), "expected", "img_highres", "train.lst")
    assert not (tmp_path / "out").exists(), message


# ---- 4. training on the Ray-built dataset ---------------------------------------------------


def read_loss(run: Path) -> list[tuple[int, float]]:
    with open(run / "loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_train_pcdm_prior_then_resume(dataset, tmp_path):
    run = tmp_path / "run"
    common = ["train", "pcdm-prior", "--shards", str(dataset), "--out", str(run), "--weights", "tiny", "--batch-size", "4", "--warmup-steps", "0", "--lr", "1e-3", "--checkpoint-every", "20"]

    result = invoke(*common, "--max-steps", "40")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["steps"] == 40 and summary["start_step"] == 0
    loss = read_loss(run)
    assert [s for s, _ in loss] == list(range(1, 41))
    first, last = np.mean([v for _, v in loss[:5]]), np.mean([v for _, v in loss[-5:]])
    assert np.isfinite([v for _, v in loss]).all()
    assert last < 0.5 * first, (first, last)
    weights = list((run / "checkpoint-40" / "model").glob("*.safetensors"))
    assert weights and weights[0].stat().st_size > 0
    assert (run / "checkpoint-20" / "trainer_state.json").is_file()
    assert json.loads((run / "checkpoint-40" / "trainer_state.json").read_text())["step"] == 40

    result = invoke(*common, "--max-steps", "50", "--resume", "latest")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["start_step"] == 40 and summary["steps"] == 50
    resumed = read_loss(run)
    assert [s for s, _ in resumed] == list(range(1, 51))
    assert resumed[:40] == loss  # steps 1..40 kept as they were, 41..50 appended
    assert json.loads((run / "checkpoint-50" / "trainer_state.json").read_text())["step"] == 50


# ---- 5. Market-1501 -------------------------------------------------------------------------


def test_market1501_build_rejects_junk_and_pairs_within_person_ids(fixtures_dir, tmp_path):
    photos = real_photos(fixtures_dir)
    root = tmp_path / "market"
    train = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0002_c3s1_000551_01.jpg", "0007_c1s6_028546_01.jpg", "0007_c2s6_028571_02.jpg", "0011_c4s1_001501_01.jpg"]
    test = ["0001_c1s1_001051_00.jpg", "0001_c5s1_001101_02.jpg", "0003_c2s1_000776_01.jpg"]
    junk = ["-1_c1s1_000401_03.jpg", "0000_c1s1_000151_01.jpg"]
    for i, name in enumerate(train):
        save(variant(photos, i, (64, 128)), root / "bounding_box_train" / name, format="JPEG")
    for i, name in enumerate(test + junk):
        save(variant(photos, 10 + i, (64, 128)), root / "bounding_box_test" / name, format="JPEG")
    out = tmp_path / "out"

    result = invoke("build", "market1501", "--root", str(root), "--out", str(out), "--res", "128x64", "--weights", "tiny", "--features", "clip", "--shard-size", "4", "--executor", "local")

    assert result.exit_code == 0, result.output
    manifest, rejects = manifest_of(out), rejects_of(out)
    assert len(manifest) + len(rejects) == len(train) + len(test) + len(junk)
    reasons = dict(zip(rejects["key"], rejects["reason"]))
    assert reasons == {"-1_c1s1_000401_03": "Market-1501 junk id -1", "0000_c1s1_000151_01": "Market-1501 distractor id 0000"}
    assert {row.key: (row.split, row.group) for row in manifest.itertuples()} == {
        **{n[:-4]: ("train", n[:4]) for n in train},
        **{n[:-4]: ("test", n[:4]) for n in test},
    }
    assert manifest.groupby("group")["shard"].nunique().max() == 1
    for split, names in (("train", train), ("test", test)):
        pairs = pd.read_parquet(out / "pairs" / f"{split}.parquet")
        got = sorted(zip(pairs["source_key"], pairs["target_key"]))
        keys = [n[:-4] for n in names]
        assert got == sorted((a, b) for a in keys for b in keys if a != b and a[:4] == b[:4])
        assert pairs["shard"].notna().all()
    card = json.loads((out / "dataset.json").read_text())
    assert card["resolution"] == [128, 64]
    assert card["splits"]["train"]["pairs_origin"].startswith("generated")
    (sample,) = tar_samples(out / "shards" / "test-000000.tar")[:1]
    assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 128)


def test_verify_finds_nothing_wrong_in_the_ray_build(dataset):
    result = invoke("verify", str(dataset))
    assert result.exit_code == 0, result.output
    assert ": OK (" in result.output
