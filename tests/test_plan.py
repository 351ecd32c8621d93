from posedata.plan import plan_shards
from posedata.records import Record


def records(groups):
    return [Record(key=f"{g}_{i}", split=s, group=g, path="") for s, g, n in groups for i in range(n)]


def test_groups_never_straddle_shards_and_order_is_deterministic():
    recs = records([("train", "a", 3), ("train", "b", 4), ("train", "c", 2), ("test", "d", 2), ("train", "e", 9), ("train", "f", 1)])
    tasks = plan_shards(list(reversed(recs)), shard_size=5)
    assert [t.name for t in tasks] == ["test-000000"] + [f"train-00000{i}" for i in range(5)]
    # a (3) then b (4) would make 7 > 5: b starts a shard; c (2) would make 6: new shard;
    # e (9) is larger than a shard and gets one of its own; f cannot join it.
    assert [[r.group for r in t.records] for t in tasks] == [["d"] * 2, ["a"] * 3, ["b"] * 4, ["c"] * 2, ["e"] * 9, ["f"]]
    for t in tasks:
        assert len({r.split for r in t.records}) == 1
    assert [t.name for t in plan_shards(recs, 5)] == [t.name for t in tasks]
    groups_seen = {}
    for t in tasks:
        for r in t.records:
            assert groups_seen.setdefault(r.group, t.name) == t.name
