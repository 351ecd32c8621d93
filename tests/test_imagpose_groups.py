"""The group stream IMAGPose trains from (`posedata.reader.GroupStream`), on the reader
tests' small Market-1501-named dataset of real photos (tests/test_reader.py `built`):

    train-000000  0002 x3
    train-000001  0005 x2, 0007 x2
    train-000002  0011 x3, 0013 x1     (0013: one image, skipped and counted)
    train-000003  0020 x1              (one image: the shard yields no group)
    test-000000   0001 x2, 0003 x2
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from test_reader import GROUPS, built  # noqa: F401  (the reader tests' Market-1501-named dataset)

from posedata.reader import Dataset, GroupStream, torch_pairs

TRAIN_GROUPS = {"0002", "0005", "0007", "0011"}


def drawn(items) -> list[tuple[str, tuple[str, ...]]]:
    return [(g["group"], tuple(s["__key__"] for s in g["samples"])) for g in items]


def test_one_group_of_four_draws_per_person_per_epoch_never_all_the_same(built):
    ds = Dataset(str(built))
    stream = GroupStream(ds, "train", ["clip"], seed=3, epochs=2)

    items = list(stream)

    assert len(stream) == 4 and stream.skipped_singletons == 2
    assert stream.shards == ["train-000000", "train-000001", "train-000002"]
    members = {g: set() for g in TRAIN_GROUPS}
    for item in items:
        samples = item["samples"]
        assert len(samples) == 4
        assert {s["group"] for s in samples} == {item["group"]}
        assert len({s["__shard__"] for s in samples}) == 1
        assert len({s["__key__"] for s in samples}) > 1  # all four the same is redrawn
        assert all(s["clip.embeds"].shape == samples[0]["clip.embeds"].shape for s in samples)
        members[item["group"]].update(s["__key__"] for s in samples)
    assert Counter(g for g, _ in drawn(items[:4])) == Counter(g for g, _ in drawn(items[4:])) == Counter(TRAIN_GROUPS)
    assert all(len(members[g]) == GROUPS["train"][g] for g in ("0005", "0007"))  # both images of a pair-group always drawn
    assert drawn(items[:4]) != drawn(items[4:])  # every epoch draws anew


def test_draws_repeat_with_a_seed_and_change_with_another(built):
    ds = Dataset(str(built))

    def order(seed: int):
        return drawn(GroupStream(ds, "train", ["clip"], seed=seed, epochs=3))

    assert order(0) == order(0)
    assert order(0) != order(1)


@pytest.mark.parametrize("split, world_size", [("train", 2), ("train", 4), ("test", 2)])
def test_ranks_together_cover_each_group_exactly_once(built, split, world_size):
    ds = Dataset(str(built))
    per_rank = [[g for g, _ in drawn(GroupStream(ds, split, ["clip"], seed=7, epochs=1, rank=r, world_size=world_size))] for r in range(world_size)]

    together = Counter(g for rank in per_rank for g in rank)
    expected = {g for g, n in GROUPS[split].items() if n > 1}
    assert together == Counter(expected)
    assert all(per_rank), "a rank got no groups"


def test_dataloader_workers_split_the_groups_without_duplicates(built):
    ds = Dataset(str(built))
    stream = GroupStream(ds, "train", ["clip"], seed=1, epochs=1)
    loader = torch.utils.data.DataLoader(torch_pairs(stream), batch_size=None, num_workers=2, collate_fn=lambda g: g["group"])

    assert Counter(loader) == Counter(TRAIN_GROUPS)


def test_a_split_without_groups_of_two_is_a_clear_error(built):
    ds = Dataset(str(built))
    manifest = ds.manifest
    first_of_each = {}
    for key, group in zip(manifest["key"].to_pylist(), manifest["group"].to_pylist()):
        first_of_each.setdefault(group, key)
    ds._manifest = manifest.filter(pc.is_in(manifest["key"], value_set=pa.array(list(first_of_each.values()))))

    with pytest.raises(ValueError, match="split 'train' has no group with two or more images"):
        GroupStream(ds, "train", ["clip"])
    with pytest.raises(ValueError, match="at least 2"):
        GroupStream(Dataset(str(built)), "train", ["clip"], size=1)
