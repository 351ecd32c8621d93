"""`posedata.verify` and the reader's skip-corrupt-shards option, on one small dataset built
once per module from the DeepFashion fixture photos (tiny models, 64x48, openpose + clip +
vae:sd21, shard size 2, groups by file-name prefix), so it has two shards:

    train-000000  patn_women1, patn_women2                (2 pairs)
    train-000001  pcdms_img6, pcdms_img7, pcdms_img8      (6 pairs)

Each test damages a private copy in one way and checks that the report names the file, the
shard and, where there is one, the sample key.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from posedata.layout import DatasetLocation
from posedata.reader import Dataset, PairStream, ShardError
from posedata.shards import decode_array, encode_array, tar_bytes
from posedata.verify import Problem, format_report, verify

SHARDS = {"train-000000": ["patn_women1_176x256", "patn_women2_176x256"], "train-000001": ["pcdms_img6_750x1101", "pcdms_img7_750x1101", "pcdms_img8_750x1101"]}


@pytest.fixture(scope="module")
def built(tiny_dataset) -> Path:
    return tiny_dataset(features="openpose,clip,vae:sd21", shard_size=2, group_regex=r"^([a-z]+)_")


@pytest.fixture
def ds(built, tmp_path) -> Path:
    """A private copy of the dataset, for tests that damage it."""
    return Path(shutil.copytree(built, tmp_path / "ds"))


def folder_of(root: Path, name: str) -> Path:
    (folder,) = (root / "features").glob(f"{name}@*")
    return folder


def url(path: Path) -> str:
    return DatasetLocation(str(path)).url_of(str(path))


def read_samples(path: Path) -> list[dict]:
    """A tar's samples as webdataset dicts (`__key__` + suffix -> bytes), in order."""
    samples: list[dict] = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][suffix] = tar.extractfile(member).read()
    return samples


def rewrite(path: Path, edit) -> None:
    samples = read_samples(path)
    edit(samples)
    path.write_bytes(tar_bytes(samples))


def problems_in(report, path: Path) -> list[Problem]:
    return [p for p in report.problems if p.url == url(path)]


def test_a_clean_dataset_verifies(built):
    report = verify(str(built), progress=False)
    assert report.ok, format_report(report)
    assert report.checked["base shards"] == 2
    assert report.checked["sidecars"] == 6
    assert report.checked["images"] == 5
    assert report.checked["arrays"] == 5 * (2 + 1 + 2)  # openpose keypoints + skeleton, clip, vae mean + std
    assert report.checked["done markers"] == 2
    assert report.checked["null embeddings"] == 3
    text = format_report(report)
    assert text.startswith(f"posedata verify {built}: OK")
    assert "5 images" in text


def test_only_the_named_features_are_checked(built):
    report = verify(str(built), features=["clip"], progress=False)
    assert report.ok and report.checked["sidecars"] == 2
    report = verify(str(built), features=["dinov2"], progress=False)
    assert not report.ok and "no feature 'dinov2'" in report.problems[0].message


def truncate_inside(path: Path, member: int) -> str:
    """Cut a tar in the middle of the data of its `member`-th member; returns that member's key."""
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])
    return info.name.split(".", 1)[0]


def test_truncated_sidecar(ds):
    path = folder_of(ds, "vae") / "train-000001.tar"
    key = truncate_inside(path, 3)  # std.npy of the second sample
    assert key == SHARDS["train-000001"][1]
    report = verify(str(ds), progress=False)
    (problem,) = [p for p in problems_in(report, path) if "truncated" in p.message]
    assert (problem.shard, problem.key) == ("train-000001", key)
    assert "member pcdms_img7_750x1101.std.npy" in problem.message and "1 of 3 samples read" in problem.message
    assert {p.url for p in report.problems} == {url(path)}  # nothing else is blamed
    text = format_report(report)
    assert url(path) in text and "train-000001" in text


def test_sidecar_cut_right_after_a_member(ds):
    """tarfile reads such a file without complaint: the missing end-of-archive blocks and the
    missing members give it away."""
    path = folder_of(ds, "vae") / "train-000001.tar"
    with tarfile.open(path) as tar:
        info = tar.getmembers()[4]  # mean.npy of the third sample
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size + (-info.size % 512)])
    report = verify(str(ds), progress=False)
    key = SHARDS["train-000001"][2]
    messages = {p.message for p in problems_in(report, path) if p.key == key}
    assert "no 'std.npy' member" in messages
    assert any("ends after member pcdms_img8_750x1101.mean.npy, with no end-of-archive blocks" in m for m in messages)


def test_samples_out_of_order(ds):
    path = folder_of(ds, "openpose") / "train-000001.tar"

    def swap(samples):
        samples[0], samples[1] = samples[1], samples[0]

    rewrite(path, swap)
    report = verify(str(ds), progress=False)
    problems = problems_in(report, path)
    assert {p.key for p in problems} == set(SHARDS["train-000001"][:2])
    assert all("out of order" in p.message and p.shard == "train-000001" for p in problems)
    assert len(report.problems) == 2


def test_member_that_does_not_decode(ds):
    path = folder_of(ds, "vae") / "train-000000.tar"
    key = SHARDS["train-000000"][1]

    def garbage(samples):
        samples[1]["mean.npy"] = b"\x93NUMPY garbage, not an array"

    rewrite(path, garbage)
    report = verify(str(ds), progress=False)
    assert [(p.shard, p.key) for p in report.problems] == [("train-000000", key)]
    assert report.problems[0].url == url(path)
    assert "mean.npy: does not decode" in report.problems[0].message


def test_array_of_the_wrong_shape(ds):
    path = folder_of(ds, "clip") / "train-000001.tar"
    key = SHARDS["train-000001"][2]

    def reshape(samples):
        samples[2]["embeds.npy"] = encode_array(np.zeros(31, dtype=np.float16))

    rewrite(path, reshape)
    report = verify(str(ds), progress=False)
    (problem,) = report.problems
    assert (problem.url, problem.shard, problem.key) == (url(path), "train-000001", key)
    assert "embeds.npy: shape [31], the card says [32]" in problem.message


def test_skeleton_of_the_wrong_size_and_dtype(ds):
    from posedata.images import encode_png

    path = folder_of(ds, "openpose") / "train-000000.tar"

    def edit(samples):
        samples[0]["skeleton.png"] = encode_png(np.zeros((32, 48, 3), dtype=np.uint8))
        samples[1]["keypoints.npy"] = encode_array(np.zeros((18, 3), dtype=np.float64))

    rewrite(path, edit)
    report = verify(str(ds), progress=False)
    messages = {p.key: p.message for p in report.problems}
    assert "shape [32, 48, 3], the card says ['H', 'W', 3] (H=64 at 64x48)" in messages[SHARDS["train-000000"][0]]
    assert "dtype float64, the card says float32" in messages[SHARDS["train-000000"][1]]


def test_nan_in_an_array(ds):
    path = folder_of(ds, "vae") / "train-000001.tar"
    key = SHARDS["train-000001"][0]

    def poison(samples):
        std = np.load(io.BytesIO(samples[0]["std.npy"]))
        std[1, 2, 3] = np.nan
        std[0, 0, 0] = np.inf
        samples[0]["std.npy"] = encode_array(std)

    rewrite(path, poison)
    report = verify(str(ds), progress=False)
    (problem,) = report.problems
    assert (problem.url, problem.shard, problem.key) == (url(path), "train-000001", key)
    assert "std.npy: holds 1 NaN and 1 inf of 192 values" in problem.message


def test_missing_sidecar(ds):
    path = folder_of(ds, "openpose") / "train-000000.tar"
    path.unlink()
    report = verify(str(ds), progress=False)
    (problem,) = report.problems
    assert (problem.url, problem.shard, problem.key) == (url(path), "train-000000", "")
    assert problem.message.startswith("missing")


def test_missing_done_marker(ds):
    path = ds / "_done" / "shards" / "train-000001.parquet"
    path.unlink()
    report = verify(str(ds), progress=False)
    (problem,) = report.problems
    assert (problem.url, problem.shard) == (url(path), "train-000001")
    assert "done marker" in problem.message


def test_card_with_an_edited_fingerprint(ds):
    card = json.loads((ds / "dataset.json").read_text())
    folder = folder_of(ds, "clip").name
    card["features"][folder]["fingerprint"] = "0123456789ab"
    (ds / "dataset.json").write_text(json.dumps(card))
    report = verify(str(ds), progress=False)
    messages = [p.message for p in report.problems if p.url == url(ds / "dataset.json")]
    assert any(f"give the folder clip@0123456789ab, not {folder}" in m for m in messages)
    assert any("fingerprint inputs hash to" in m for m in messages)
    feature_json = ds / "meta" / "features" / folder / "feature.json"
    assert any("fingerprint is" in p.message for p in problems_in(report, feature_json))


def test_manifest_row_removed(ds):
    location = DatasetLocation(str(ds))
    manifest = location.read_parquet(location.path("manifest.parquet"))
    key = SHARDS["train-000001"][1]
    location.write_parquet(location.path("manifest.parquet"), manifest.filter(pc.not_equal(manifest["key"], key)))
    report = verify(str(ds), progress=False)
    base = ds / "shards" / "train-000001.tar"
    (problem,) = problems_in(report, base)
    assert (problem.shard, problem.key) == ("train-000001", key)
    assert "not in the manifest" in problem.message
    for name in ("openpose", "clip", "vae"):  # every sidecar has the extra sample too
        assert [p.key for p in problems_in(report, folder_of(ds, name) / "train-000001.tar")] == [key]
    manifest_problems = " ".join(p.message for p in problems_in(report, ds / "manifest.parquet"))
    assert "4 samples in split 'train', dataset.json says 5" in manifest_problems
    assert "index column of shard train-000001" in manifest_problems
    assert any("counts.written is 5" in p.message for p in problems_in(report, ds / "dataset.json"))
    assert any(p.key == key and "not in the manifest" in p.message for p in problems_in(report, ds / "pairs" / "train.parquet"))


def test_leftover_temporary_file(ds):
    leftover = folder_of(ds, "clip") / ".tmp-0123abcd-train-000000.tar"
    leftover.write_bytes(b"half a tar")
    report = verify(str(ds), progress=False)
    (problem,) = report.problems
    assert problem.url == url(leftover) and "interrupted write" in problem.message


def test_verify_reads_any_fsspec_url(built):
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in built.rglob("*"):
        if path.is_file():
            memory.pipe(f"/verify-test/{path.relative_to(built).as_posix()}", path.read_bytes())
    try:
        memory.pipe("/verify-test/shards/train-000000.tar", b"")
        report = verify("memory://verify-test", progress=False)
        (problem,) = [p for p in report.problems if "train-000000.tar" in p.url and "shards" in p.url]
        assert problem.url == "memory:///verify-test/shards/train-000000.tar"
        assert report.checked["sidecars"] == 6
    finally:
        memory.rm("/verify-test", recursive=True)


def test_fp8_and_bf16_members_decode_and_their_dtypes_are_checked(ds):
    """Outputs declared bfloat16 / float8_e4m3fn are stored as plain-numeric members
    (posedata.storage: `embeds.bf16.npy`; `embeds.e4m3.npy` + `embeds.scale.npy`) that the
    card lists; they decode, and a member of another dtype is reported."""
    from posedata.storage import card_output, encode_members

    clip = folder_of(ds, "clip")
    path = clip / "train-000001.tar"
    originals = {shard: (clip / f"{shard}.tar").read_bytes() for shard in SHARDS}
    card = json.loads((ds / "dataset.json").read_text())
    feature_json = ds / "meta" / "features" / clip.name / "feature.json"
    feature = json.loads(feature_json.read_text())
    for declared in ("bfloat16", "float8_e4m3fn"):
        for c in (card["features"][clip.name], feature):
            c["outputs"]["embeds.npy"] = card_output("embeds.npy", declared, [32])
        (ds / "dataset.json").write_text(json.dumps(card))
        feature_json.write_text(json.dumps(feature))

        def pack(samples, declared=declared):
            for sample in samples:
                value = decode_array(sample.pop("embeds.npy"))
                sample.update({m: encode_array(a) for m, a in encode_members("embeds.npy", value, declared).items()})

        for shard, data in originals.items():
            (clip / f"{shard}.tar").write_bytes(data)
            rewrite(clip / f"{shard}.tar", pack)
        report = verify(str(ds), features=["clip"], progress=False)
        assert report.ok, format_report(report)
        assert report.checked["arrays"] == 5
        assert next(Dataset(str(ds)).samples("train", ["clip"]))["clip.embeds"].dtype == np.float32

    def wrong(samples):
        samples[0]["embeds.e4m3.npy"] = encode_array(np.zeros(32, dtype=np.int16))

    rewrite(path, wrong)
    (problem,) = verify(str(ds), features=["clip"], progress=False).problems
    assert (problem.url, problem.key) == (url(path), SHARDS["train-000001"][0])
    assert "embeds.e4m3.npy: dtype int16, the card says uint8" in problem.message


def test_format_1_packed_arrays_still_verify(ds):
    """Datasets of format 1 stored fp8 / bf16 as one structured .npy under the output's name,
    and feature.json / null embeddings inside the feature folder: still read and checked."""
    from posedata.storage import encode_float

    downgrade_to_format_1(ds)
    clip = folder_of(ds, "clip")
    card = json.loads((ds / "dataset.json").read_text())
    card["features"][clip.name]["outputs"]["embeds.npy"]["dtype"] = "float8_e4m3fn"
    (ds / "dataset.json").write_text(json.dumps(card))
    feature = json.loads((clip / "feature.json").read_text())
    feature["outputs"]["embeds.npy"]["dtype"] = "float8_e4m3fn"
    (clip / "feature.json").write_text(json.dumps(feature))
    for shard in SHARDS:
        rewrite(clip / f"{shard}.tar", lambda samples: [s.update({"embeds.npy": encode_array(encode_float(decode_array(s["embeds.npy"]), "fp8"))}) for s in samples])
    report = verify(str(ds), progress=False)
    assert report.ok, format_report(report)
    sample = next(Dataset(str(ds)).samples("train", ["clip"]))
    assert sample["clip.embeds"].dtype == np.float32 and sample["clip.embeds"].shape == (32,)
    assert Dataset(str(ds)).null_embedding(Dataset(str(ds)).column("clip"), "embeds.npy").shape == (32,)

    def plain(samples):
        samples[0]["embeds.npy"] = encode_array(np.zeros(32, dtype=np.float16))

    rewrite(clip / "train-000001.tar", plain)
    (problem,) = verify(str(ds), features=["clip"], progress=False).problems
    assert "stored as float16, the card says packed fp8" in problem.message


def downgrade_to_format_1(root: Path) -> None:
    """Turn a format-2 dataset into the format-1 layout: feature.json and null embeddings
    back inside the feature folders, no meta/, no README.md, pairs without `split`."""
    import pyarrow.parquet as pq

    for meta in (root / "meta" / "features").iterdir():
        for f in meta.iterdir():
            if not f.name.endswith(".wids.json"):
                shutil.move(str(f), root / "features" / meta.name / f.name)
    shutil.rmtree(root / "meta")
    (root / "README.md").unlink()
    for pairs in (root / "pairs").glob("*.parquet"):
        pq.write_table(pq.read_table(pairs).drop_columns(["split"]), pairs)
    card = json.loads((root / "dataset.json").read_text())
    card["format_version"] = 1
    (root / "dataset.json").write_text(json.dumps(card))


def test_format_2_layout_problems_are_named(ds):
    """Only shards in the folders tools read, a wids index per folder and split with the
    right counts, the dataset card, no absolute source path in the manifest."""
    clip = folder_of(ds, "clip")
    (clip / "notes.txt").write_text("hi")
    index = ds / "meta" / "features" / clip.name / "train.wids.json"
    wids = json.loads(index.read_text())
    wids["shardlist"][1]["nsamples"] = 4
    index.write_text(json.dumps(wids))
    (ds / "meta" / "shards" / "train.wids.json").unlink()
    location = DatasetLocation(str(ds))
    manifest = location.read_parquet(location.path("manifest.parquet"))
    paths = manifest["source_path"].to_pylist()
    assert not any(p.startswith("/") for p in paths)  # as built: relative to --root
    column = manifest.column_names.index("source_path")
    location.write_parquet(location.path("manifest.parquet"), manifest.set_column(column, "source_path", pa.array(["/home/me/" + p for p in paths])))
    report = verify(str(ds), progress=False)
    assert "not a shard" in " ".join(p.message for p in problems_in(report, clip / "notes.txt"))
    assert "says 4 samples in train-000001.tar, the manifest 3" in " ".join(p.message for p in problems_in(report, index))
    assert problems_in(report, ds / "meta" / "shards" / "train.wids.json")
    assert "is absolute" in " ".join(p.message for p in problems_in(report, ds / "manifest.parquet"))
    (ds / "README.md").unlink()
    assert "missing" in " ".join(p.message for p in problems_in(verify(str(ds), progress=False), ds / "README.md"))


def test_features_added_by_extend_need_their_done_markers(ds):
    """A feature that is not in the build's settings came from `posedata extend`, which
    writes _done/features/<folder>/<shard>.json per shard."""
    settings = json.loads((ds / "_done" / "build.json").read_text())
    clip = settings["features"].pop("clip")
    (ds / "_done" / "build.json").write_text(json.dumps(settings))
    markers = ds / "_done" / "features" / clip
    markers.mkdir(parents=True)
    (markers / "train-000000.json").write_text(json.dumps({"shard": "train-000000", "samples": 2, "notes": {}}))
    (ds / "features" / "dinov2@0123456789ab").mkdir()
    (ds / "features" / "dinov2@0123456789ab" / "feature.json").write_text("{}")
    report = verify(str(ds), progress=False)
    assert [(p.url, p.shard) for p in report.problems] == [
        (url(markers / "train-000001.json"), "train-000001"),
        (url(ds / "features" / "dinov2@0123456789ab" / "feature.json"), ""),
    ]
    assert "unfinished `posedata extend`" in report.problems[1].message


# ---- the reader ---------------------------------------------------------------------------


def corrupt_clip_of_second_shard(root: Path) -> Path:
    path = folder_of(root, "clip") / "train-000001.tar"
    truncate_inside(path, 1)
    return path


def test_reader_raises_naming_the_file(ds):
    path = corrupt_clip_of_second_shard(ds)
    stream = PairStream(Dataset(str(ds)), "train", ["clip"], epochs=1)
    with pytest.raises(ShardError, match="train-000001.tar") as error:
        list(stream)
    assert url(path) in str(error.value)


def test_reader_skips_a_corrupt_shard_with_a_warning(ds, caplog):
    path = corrupt_clip_of_second_shard(ds)
    stream = PairStream(Dataset(str(ds)), "train", ["clip"], epochs=1, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="posedata.reader"):
        pairs = list(stream)
    first = SHARDS["train-000000"]
    assert sorted((p["source"]["__key__"], p["target"]["__key__"]) for p in pairs) == [(first[0], first[1]), (first[1], first[0])]
    assert stream.skipped_shards == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipping shard train-000001" in record.getMessage()
    assert str(path) in record.getMessage()


def test_reader_gives_up_when_every_shard_is_corrupt(ds):
    corrupt_clip_of_second_shard(ds)
    (folder_of(ds, "clip") / "train-000000.tar").unlink()
    stream = PairStream(Dataset(str(ds)), "train", ["clip"], epochs=None, on_corrupt="skip")
    with pytest.raises(ShardError, match="all 2 shards"):
        next(iter(stream))
    assert stream.skipped_shards == 2 and stream.skipped == set(SHARDS)


def test_a_skipped_shard_is_counted_and_warned_about_once(ds, caplog):
    corrupt_clip_of_second_shard(ds)
    stream = PairStream(Dataset(str(ds)), "train", ["clip"], epochs=3, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="posedata.reader"):
        pairs = list(stream)
    assert len(pairs) == 3 * 2 and stream.skipped_shards == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_on_corrupt_must_be_raise_or_skip(built):
    with pytest.raises(ValueError, match="on_corrupt"):
        PairStream(Dataset(str(built)), "train", ["clip"], on_corrupt="ignore")
