"""Which sample goes into which shard: group-aligned, deterministic, decided before any work.

Samples are ordered by (split, group, key) and groups are packed greedily into shards of
about `shard_size` samples; a group never straddles two shards (so pairs and IMAGPose's
groups of four form inside one shard while streaming), and a group larger than
`shard_size` gets a shard of its own. The plan depends only on the records, so reruns,
resumed runs and runs with any number of workers produce the same shards.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from posedata.layout import shard_name
from posedata.records import Record


@dataclass
class ShardTask:
    split: str
    number: int
    records: list[Record] = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


def plan_shards(records: list[Record], shard_size: int) -> list[ShardTask]:
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    ordered = sorted(records, key=lambda r: (r.split, r.group, r.key))
    tasks: list[ShardTask] = []
    for split, in_split in itertools.groupby(ordered, key=lambda r: r.split):
        current = ShardTask(split, 0)
        for _, members in itertools.groupby(in_split, key=lambda r: r.group):
            members = list(members)
            if current.records and len(current.records) + len(members) > shard_size:
                tasks.append(current)
                current = ShardTask(split, current.number + 1)
            current.records.extend(members)
        if current.records:
            tasks.append(current)
    return tasks
