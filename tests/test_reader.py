"""The column reader and the pair stream, on one small dataset built once per module with
`posedata build market1501 --features clip --executor local`: Market-1501 names, real
photos, and an annotation CSV, so the dataset holds `clip` and `keypoints_annotated` only.

Shards (shard size 4, groups = person ids):
    train-000000  0002 x3
    train-000001  0005 x2, 0007 x2
    train-000002  0011 x3, 0013 x1
    train-000003  0020 x1            (one sample, no pairs)
    test-000000   0001 x2, 0003 x2
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from posedata.cli import main as cli_main
from posedata.reader import Dataset, PairStream, ShardError, torch_pairs

GROUPS = {"train": {"0002": 3, "0005": 2, "0007": 2, "0011": 3, "0013": 1, "0020": 1}, "test": {"0001": 2, "0003": 2}}
ANNOTATED = "0002_c1s1_001000_01"
KEYPOINT_YS = list(range(10, 28))
KEYPOINT_XS = [-1] + list(range(20, 37))


@pytest.fixture(scope="module")
def built(tmp_path_factory, fixtures_dir) -> Path:
    photos = [Image.open(p).convert("RGB") for p in sorted((fixtures_dir / "deepfashion").glob("pcdms_img*_750x1101.png"))]
    root = tmp_path_factory.mktemp("market")
    count = 0
    for split, groups in GROUPS.items():
        folder = root / f"bounding_box_{split}"
        folder.mkdir()
        for person, n in groups.items():
            for camera in range(1, n + 1):
                photo = photos[count % len(photos)].crop((count, 0, 750 - count, 1101))
                photo.resize((64, 128), Image.Resampling.BICUBIC).save(folder / f"{person}_c{camera}s1_{1000 + count:06d}_01.jpg", quality=92)
                count += 1
    (root / "market-annotation-train.csv").write_text(
        f"name:keypoints_y:keypoints_x\n{ANNOTATED}.jpg:{json.dumps(KEYPOINT_YS)}:{json.dumps(KEYPOINT_XS)}\n"
    )
    out = tmp_path_factory.mktemp("reader") / "market"
    args = ["build", "market1501", "--root", str(root), "--out", str(out), "--res", "128x64", "--weights", "tiny", "--features", "clip", "--shard-size", "4", "--executor", "local"]
    result = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A private copy of the dataset, for tests that damage it."""
    return Path(shutil.copytree(built, tmp_path / "copy"))


def folder_of(root: Path, name: str) -> Path:
    (folder,) = (root / "features").glob(f"{name}@*")
    return folder


def table_pairs(ds: Dataset, split: str) -> Counter:
    table = ds.pairs(split)
    return Counter(zip(table["source_key"].to_pylist(), table["target_key"].to_pylist()))


def keys_of(pairs) -> list[tuple[str, str]]:
    return [(p["source"]["__key__"], p["target"]["__key__"]) for p in pairs]


def rewrite_tar(path: Path, reorder) -> None:
    """Rewrite a tar with plain tarfile, its members grouped by sample and reordered."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, list] = {}
    for member, data in members:
        samples.setdefault(member.name.split(".", 1)[0], []).append((member, data))
    ordered = reorder(list(samples.values()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in ordered:
            for member, data in sample:
                tar.addfile(member, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def test_the_fixture_dataset_is_as_planned(built):
    ds = Dataset(str(built))
    assert ds.shards("train") == ["train-000000", "train-000001", "train-000002", "train-000003"]
    assert [len(ds.shard_keys(s)) for s in ds.shards("train")] == [3, 4, 4, 1]
    assert sorted(f.split("@")[0] for f in ds.card["features"]) == ["clip", "keypoints_annotated"]
    assert sum(table_pairs(ds, "train").values()) == 6 + 2 + 2 + 6


# ---- columns ----------------------------------------------------------------------------------


def test_needs_clip_opens_only_the_clip_sidecars(built, monkeypatch):
    ds = Dataset(str(built))
    manifest = ds.manifest  # read before watching: only the shards' opens are of interest
    opened: list[str] = []
    real_open = ds.location.fs.open

    def watching_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ds.location.fs, "open", watching_open)

    samples = list(ds.samples("train", needs=["clip"]))

    clip = folder_of(built, "clip")
    assert opened == [str(clip / f"{shard}.tar") for shard in ds.shards("train")]
    assert [s["__key__"] for s in samples] == [k for shard in ds.shards("train") for k in ds.shard_keys(shard)]
    assert len(samples) == manifest.filter(manifest["split"].to_numpy(zero_copy_only=False) == "train").num_rows
    dim = ds.card["features"][clip.name]["outputs"]["embeds.npy"]["shape"][0]
    for sample in samples:
        assert set(sample) == {"__key__", "__shard__", "split", "group", "clip.embeds"}
        assert sample["clip.embeds"].shape == (dim,) and sample["clip.embeds"].dtype == np.float16
        assert sample["group"] == sample["__key__"][:4] and sample["split"] == "train"


def test_clip_reads_without_base_shards_and_pixels_name_the_missing_shard(copy):
    for tar in (copy / "shards").glob("*.tar"):
        tar.unlink()
    ds = Dataset(str(copy))

    assert sum(1 for _ in ds.samples("train", needs=["clip"])) == 12

    with pytest.raises(ShardError) as caught:
        next(iter(ds.samples("train", needs=["clip"], pixels=True)))
    assert str(copy / "shards" / "train-000000.tar") in str(caught.value)
    assert "missing" in str(caught.value)


def test_pixels_come_from_the_base_shard(built):
    ds = Dataset(str(built))
    (sample,) = ds.samples("test", needs=["clip"], pixels=True, limit=1)
    assert sample["image"].shape == (128, 64, 3) and sample["image"].dtype == np.uint8
    assert sample["meta"]["key"] == sample["__key__"]


def test_swapped_samples_in_a_sidecar_name_the_sidecar_and_the_shard(copy):
    sidecar = folder_of(copy, "clip") / "train-000001.tar"
    rewrite_tar(sidecar, lambda samples: [samples[1], samples[0], *samples[2:]])
    ds = Dataset(str(copy))

    for pixels in (False, True):
        with pytest.raises(ShardError) as caught:
            list(ds.read_shard("train-000001", [ds.column("clip")], pixels=pixels))
        message = str(caught.value)
        assert str(sidecar) in message and "shard train-000001" in message
        assert ds.shard_keys("train-000001")[0] in message  # the key it expected
    # The other shards are untouched and still read.
    assert len(list(ds.read_shard("train-000002", [ds.column("clip")]))) == 4


def test_a_sidecar_truncated_inside_a_member_names_the_file(copy):
    sidecar = folder_of(copy, "clip") / "train-000001.tar"
    with tarfile.open(sidecar) as tar:
        last = tar.getmembers()[-1]
    # cut inside the last member's data (the zero padding after it would lose nothing)
    sidecar.write_bytes(sidecar.read_bytes()[: last.offset_data + last.size // 2])
    ds = Dataset(str(copy))

    with pytest.raises(ShardError) as caught:
        list(ds.samples("train", needs=["clip"]))
    assert str(sidecar) in str(caught.value)


def test_a_base_shard_truncated_inside_a_member_names_the_file(copy):
    base = copy / "shards" / "train-000000.tar"
    base.write_bytes(base.read_bytes()[:3000])
    ds = Dataset(str(copy))

    with pytest.raises(ShardError) as caught:
        list(ds.read_shard("train-000000", [ds.column("clip")], pixels=True))
    assert str(base) in str(caught.value)


def test_a_sidecar_cut_at_a_member_boundary_names_the_file_and_the_count(copy):
    sidecar = folder_of(copy, "clip") / "train-000001.tar"
    with tarfile.open(sidecar) as tar:
        second = tar.getmembers()[1].offset
    sidecar.write_bytes(sidecar.read_bytes()[:second])  # the first sample, then nothing
    empty = folder_of(copy, "clip") / "train-000002.tar"
    with tarfile.open(empty, "w"):
        pass
    ds = Dataset(str(copy))

    with pytest.raises(ShardError) as caught:
        list(ds.read_shard("train-000001", [ds.column("clip")]))
    assert str(sidecar) in str(caught.value)
    with pytest.raises(ShardError) as caught:
        list(ds.read_shard("train-000002", [ds.column("clip")]))
    assert str(empty) in str(caught.value) and "0 samples read" in str(caught.value)


def test_an_empty_sidecar_of_a_one_sample_shard_is_an_error(copy):
    sidecar = folder_of(copy, "clip") / "train-000003.tar"
    with tarfile.open(sidecar, "w"):
        pass
    ds = Dataset(str(copy))
    assert len(ds.shard_keys("train-000003")) == 1

    with pytest.raises(ShardError):
        list(ds.read_shard("train-000003", [ds.column("clip")]))


def test_feature_alternatives_present_annotated_keypoints_under_the_first_name(built):
    ds = Dataset(str(built))
    assert "openpose" not in {c["name"] for c in ds.card["features"].values()}
    column = ds.column(("openpose", "keypoints_annotated"))
    assert column.alias == "openpose" and column.folder == folder_of(built, "keypoints_annotated").name
    with pytest.raises(KeyError, match="no feature openpose"):
        ds.column("openpose")

    samples = {s["__key__"]: s for s in ds.samples("train", needs=["clip", ("openpose", "keypoints_annotated")])}

    assert len(samples) == 12
    for key, sample in samples.items():
        assert set(sample) == {"__key__", "__shard__", "split", "group", "clip.embeds", "openpose.keypoints"}
        keypoints = sample["openpose.keypoints"]
        assert keypoints.shape == (18, 3) and keypoints.dtype == np.float32
        if key != ANNOTATED:
            assert not keypoints.any()
    expected = np.array([[0, 0, 0]] + [[x, y, 1] for x, y in zip(KEYPOINT_XS[1:], KEYPOINT_YS[1:])], dtype=np.float32)
    np.testing.assert_array_equal(samples[ANNOTATED]["openpose.keypoints"], expected)  # 128x64 frame
    pair = next(iter(PairStream(ds, "train", ["clip", ("openpose", "keypoints_annotated")], epochs=1)))
    assert "openpose.keypoints" in pair["source"] and "openpose.keypoints" in pair["target"]


# ---- pairs --------------------------------------------------------------------------------------


def test_pairs_stay_inside_a_shard_and_each_comes_once_per_epoch(built):
    ds = Dataset(str(built))
    stream = PairStream(ds, "train", ["clip"], seed=3, epochs=2)

    pairs = list(stream)

    assert len(stream) == 16 and stream.skipped_across_shards == 0
    assert stream.shards == ["train-000000", "train-000001", "train-000002"]  # 000003: no pairs
    for pair in pairs:
        assert pair["source"]["__shard__"] == pair["target"]["__shard__"]
        assert pair["source"]["group"] == pair["target"]["group"]
        assert pair["source"]["__key__"] != pair["target"]["__key__"]
    first, second = keys_of(pairs[:16]), keys_of(pairs[16:])
    assert Counter(first) == Counter(second) == table_pairs(ds, "train")
    assert first != second  # every epoch is shuffled anew


def test_the_order_repeats_with_a_seed_and_changes_with_another(built):
    ds = Dataset(str(built))

    def order(seed: int) -> list[tuple[str, str]]:
        return keys_of(PairStream(ds, "train", ["clip"], seed=seed, epochs=1))

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert Counter(order(1)) == table_pairs(ds, "train")


@pytest.mark.parametrize(
    "split, world_size",
    [("train", 2), ("train", 4), ("test", 2)],
    ids=["3-shards-2-ranks", "3-shards-4-ranks", "1-shard-2-ranks"],
)
def test_ranks_together_cover_each_pair_exactly_once(built, split, world_size):
    ds = Dataset(str(built))
    per_rank = [keys_of(PairStream(ds, split, ["clip"], seed=7, epochs=1, rank=r, world_size=world_size)) for r in range(world_size)]

    together = Counter(pair for rank in per_rank for pair in rank)
    assert together == table_pairs(ds, split)
    assert sum(together.values()) == sum(len(r) for r in per_rank)
    assert all(per_rank), "a rank got no pairs"


def test_dataloader_workers_split_the_stream_without_duplicates(built):
    ds = Dataset(str(built))
    stream = PairStream(ds, "train", ["clip"], seed=1, epochs=1)
    loader = torch.utils.data.DataLoader(
        torch_pairs(stream), batch_size=None, num_workers=2, collate_fn=lambda p: (p["source"]["__key__"], p["target"]["__key__"])
    )

    got = list(loader)

    assert Counter(got) == table_pairs(ds, "train")


def test_arrays_reach_a_dataloader_writable_without_a_warning(built):
    """Decoded images and arrays are writable: torch's default collate makes tensors of them
    without "The given NumPy array is not writable"."""
    import warnings

    ds = Dataset(str(built))
    stream = PairStream(ds, "train", ["clip", "keypoints_annotated"], pixels=True, seed=0, epochs=1)
    loader = torch.utils.data.DataLoader(
        torch_pairs(stream), batch_size=2, collate_fn=lambda pairs: torch.utils.data.default_collate([p["source"]["image"] for p in pairs])
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(iter(loader))
    assert batch.shape == (2, 128, 64, 3)
    assert not [w for w in caught if "not writable" in str(w.message)]
    sample = next(ds.samples("train", needs=["clip"], pixels=True))
    assert sample["image"].flags.writeable and sample["clip.embeds"].flags.writeable
