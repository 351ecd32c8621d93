"""Reading a dataset column by column, and pairs out of it while streaming.

Small composable stages (webdataset's style):

    shard list --split across nodes/workers--> open columns (only the requested sidecars; the
    base shard only for pixels) --check keys--> decode --> pairs inside each shard -->
    buffer shuffle --> (the trainer batches)

A plugin that needs CLIP embeddings and keypoints reads a few KB per sample, never the
images or the DINOv2 tokens.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
from webdataset.tariterators import group_by_keys, tar_file_iterator

from posedata.errors import PosedataError
from posedata.layout import CARD, MANIFEST, DatasetLocation
from posedata.shards import decode_array, decode_stored_output

BASE = "__base__"  # pseudo feature: the base shard (image + meta)
ON_CORRUPT = ("raise", "skip")

log = logging.getLogger("posedata.reader")


class ShardError(PosedataError, RuntimeError):
    """A shard or sidecar that cannot be read, or whose keys do not line up; names both."""


class DatasetError(PosedataError, KeyError):
    """A dataset that is not what was asked for: no such split or feature, a split without
    samples, a damaged card. A KeyError for callers that catch one; its message unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Column:
    """One feature as a reader sees it: the alias it is presented under and its folder."""

    alias: str
    folder: str
    suffixes: tuple[str, ...]

    def only(self, outputs: Sequence[str]) -> Column:
        """The column with just the named outputs (`keypoints` for `keypoints.npy`); outputs
        the feature does not have are ignored (an optional one, such as `hands`)."""
        return Column(self.alias, self.folder, tuple(s for s in self.suffixes if s.rsplit(".", 1)[0] in outputs))


def find_feature(card: dict[str, Any], name: str) -> tuple[str, dict[str, Any]] | None:
    """(folder, feature card) of feature `name`, `name:preset` (vae:sd15) or exactly
    `name@fp` in a dataset card; None if absent; an error if several coexist and `name`
    does not say which. A bare name means the feature without a preset when exactly one has
    none (`openpose` is the body-only one beside `openpose:full`)."""
    features = card["features"]
    if name in features:
        return name, features[name]
    base, _, preset = name.partition(":")
    folders = sorted(f for f, c in features.items() if c["name"] == base and (not preset or c.get("preset") == preset))
    if len(folders) > 1 and not preset:
        plain = [f for f in folders if features[f].get("preset") is None]
        folders = plain if len(plain) == 1 else folders
    if len(folders) > 1:
        raise KeyError(f"several {name!r} features ({', '.join(folders)}); name one as name:preset or name@fingerprint")
    return (folders[0], features[folders[0]]) if folders else None


class Dataset:
    """A posedata dataset opened for reading (local path or any fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.location = DatasetLocation(url, storage_options or {})
        try:
            self.card = self.location.card()
        except ValueError as e:  # json.JSONDecodeError: a truncated or damaged card
            raise DatasetError(f"{self.location.url_of(self.location.path(CARD))}: not a readable dataset card ({e}); rebuild the dataset or restore the file") from None
        self._manifest = None
        self._shards_info: dict[str, tuple[list[str], dict[str, tuple[str, str]]]] = {}

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.card["resolution"])

    @property
    def manifest(self):
        if self._manifest is None:
            self._manifest = self.location.read_parquet(self.location.path(MANIFEST))
        return self._manifest

    def shards(self, split: str) -> list[str]:
        if split not in self.card["splits"]:
            raise DatasetError(f"{self.location.url}: no split {split!r}; splits: {', '.join(self.card['splits'])}")
        return list(self.card["splits"][split]["shards"])

    def column(self, need: str | tuple[str, ...]) -> Column:
        """Resolve a feature need (a name, `name@fp`, or a tuple of interchangeable names,
        first preferred) to the folder that holds it."""
        names = (need,) if isinstance(need, str) else tuple(need)
        for name in names:
            found = find_feature(self.card, name)
            if found:
                folder, feature = found
                return Column(names[0].split("@")[0].split(":")[0], folder, tuple(feature["outputs"]))
        raise DatasetError(f"{self.location.url}: no feature {' or '.join(names)}; features here: {', '.join(self.card['features']) or 'none'}")

    def null_embedding(self, column: Column, suffix: str) -> np.ndarray:
        output = suffix.removesuffix(".npy")
        new, old = self.location.null_embedding(column.folder, output), self.location.legacy_null_embedding(column.folder, output)
        return decode_array(self.location.read_bytes(self.location.existing(new, old) or new))

    def shard_keys(self, shard: str) -> list[str]:
        return list(self._shard_info(shard)[0])

    def _shard_info(self, shard: str) -> tuple[list[str], dict[str, tuple[str, str]]]:
        """(keys in index order, {key: (split, group)}) of one shard, from the manifest; kept,
        as a reader asks again every epoch."""
        if shard not in self._shards_info:
            rows = self.manifest.filter(pc.equal(self.manifest["shard"], shard))
            order = np.argsort(rows["index"].to_numpy())
            keys = rows["key"].to_pylist()
            info = {k: (s, g) for k, s, g in zip(keys, rows["split"].to_pylist(), rows["group"].to_pylist())}
            self._shards_info[shard] = ([keys[i] for i in order], info)
        return self._shards_info[shard]

    def pairs(self, split: str):
        return self.location.read_parquet(self.location.path("pairs", f"{split}.parquet"))

    # ---- samples --------------------------------------------------------------------------

    def read_shard(self, shard: str, columns: Sequence[Column], pixels: bool = False, cache: ShardCache | None = None) -> Iterator[dict[str, Any]]:
        """Samples of one shard: the requested columns zipped by key, keys checked against each
        other and against the manifest. With a `cache`, each tar's members are read once and
        kept (as bytes: every read decodes afresh, so nothing a consumer does to an array
        reaches the next read)."""
        sources = [(c, self.location.sidecar(c.folder, shard)) for c in columns]
        if pixels:
            sources.insert(0, (Column(BASE, "", ("jpg", "json")), self.location.base_shard(shard)))
        expected, info = self._shard_info(shard)
        streams = [cache.members(self.location, path) if cache is not None else _tar_samples(self.location, path) for _, path in sources]
        read = 0
        for position, parts in enumerate(_zip_longest(streams)):
            keys = [p["__key__"] if p is not None else None for p in parts]
            want = expected[position] if position < len(expected) else None
            for (_column, path), key in zip(sources, keys):
                if key != want:
                    raise ShardError(f"{self.location.url_of(path)}: sample {position} has key {key!r}, expected {want!r} (from the manifest): the sidecar does not line up with shard {shard}")
            split, group = info[want]
            sample: dict[str, Any] = {"__key__": want, "__shard__": shard, "split": split, "group": group}
            for (column, path), part in zip(sources, parts):
                for suffix in column.suffixes:
                    try:
                        value = decode_stored_output(suffix, part)
                    except KeyError:
                        raise ShardError(f"{self.location.url_of(path)}: sample {want!r} has no {suffix!r}") from None
                    except Exception as e:
                        raise ShardError(f"{self.location.url_of(path)}: cannot decode {want}.{suffix}: {e}") from e
                    if column.alias == BASE:
                        sample["image" if suffix == "jpg" else "meta"] = value
                    else:
                        sample[f"{column.alias}.{suffix.rsplit('.', 1)[0]}"] = value
            read += 1
            yield sample
        if read < len(expected):
            files = ", ".join(self.location.url_of(path) for _, path in sources)
            raise ShardError(f"{files}: {read} samples read, the manifest lists {len(expected)} for shard {shard} (truncated or incomplete)")

    def require_samples(self, split: str) -> None:
        """Raise the one-line error for a split that is listed but has no samples (every input
        of it was rejected), instead of an empty stream failing later."""
        self.shards(split)
        if not self.card["splits"][split].get("samples", 1):
            raise DatasetError(f"{self.location.url}: split {split!r} has no samples (every input of it was rejected; `posedata inspect {self.location.url}` lists why)")

    def samples(self, split: str, needs: Sequence[str | tuple[str, ...]] = (), pixels: bool = False, limit: int | None = None) -> Iterator[dict[str, Any]]:
        columns = [self.column(n) for n in needs]
        count = 0
        for shard in self.shards(split):
            for sample in self.read_shard(shard, columns, pixels):
                yield sample
                count += 1
                if limit is not None and count >= limit:
                    return


def _tar_samples(location: DatasetLocation, path: str) -> Iterator[dict[str, Any]]:
    try:
        stream = location.open_read(path)
    except FileNotFoundError:
        raise ShardError(f"{location.url_of(path)}: missing (the dataset is incomplete or this feature was never extracted for this shard)") from None
    with stream:
        try:
            url = location.url_of(path)
            yield from group_by_keys({**member, "__url__": url} for member in tar_file_iterator(stream))
        except ShardError:
            raise
        except Exception as e:
            raise ShardError(f"{location.url_of(path)}: corrupt or truncated tar: {e}") from e


# Bytes of tar members a stream keeps per process (each DataLoader worker has its own).
SHARD_CACHE_BYTES = 512 * 2**20


class ShardCache:
    """The members of the tars a stream read, kept as bytes up to `max_bytes` (least
    recently used first out), so a stream that reads the same shards every epoch reads each
    file once while they fit: a pair stream over a shard re-reads it every epoch. A feature
    set of a few KB per sample (pcdm-prior's CLIP embeddings and keypoints) fits whole for
    a DeepFashion-size dataset; DINOv2 tokens do not, and are read again as before."""

    def __init__(self, max_bytes: int = SHARD_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.held = 0
        self._tars: collections.OrderedDict[str, tuple[list[dict[str, Any]], int]] = collections.OrderedDict()

    def members(self, location: DatasetLocation, path: str) -> Iterator[dict[str, Any]]:
        if path in self._tars:
            self._tars.move_to_end(path)
            return iter(self._tars[path][0])
        parts = list(_tar_samples(location, path))
        size = sum(len(v) for part in parts for k, v in part.items() if not k.startswith("__"))
        if size <= self.max_bytes:
            while self.held + size > self.max_bytes:
                _, (_, dropped) = self._tars.popitem(last=False)
                self.held -= dropped
            self._tars[path] = (parts, size)
            self.held += size
        return iter(parts)


def _zip_longest(streams: list[Iterator[dict[str, Any]]]) -> Iterator[list[dict[str, Any] | None]]:
    sentinel = object()
    while True:
        parts = [next(s, sentinel) for s in streams]
        if all(p is sentinel for p in parts):
            return
        yield [None if p is sentinel else p for p in parts]


# ---- pairs ------------------------------------------------------------------------------------


def split_for_consumer(items: list[Any], index: int, count: int) -> list[Any]:
    return items[index::count]


class PairStream:
    """Pairs `{"source": sample, "target": sample}` formed inside each shard while streaming,
    honouring the pair table; shards shuffled per epoch and pairs buffer-shuffled, with a
    seed; split across nodes (`rank`/`world_size`) and torch DataLoader workers.

    When there are fewer shards than consumers, every consumer reads every shard and keeps
    every n-th pair instead, so no worker sits idle on a small dataset.

    `on_corrupt`: what a `ShardError` (a missing, corrupt or truncated shard or sidecar, keys
    that do not line up with the manifest) does. "raise" (default): stop with the error, which
    names the file and the shard. "skip": log a warning naming the shard and the error (once
    per shard, however many epochs), add it to `skipped` / `skipped_shards` and go on with the
    next shard. A shard is read whole before its pairs are formed, so a shard with an error
    anywhere yields no pairs at all. With DataLoader workers each worker counts the shards it
    skipped in its own copy of the stream (the warning is what the user sees). If every shard
    a consumer reads in one epoch is skipped, it raises anyway rather than loop forever on
    nothing.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        needs: Sequence[str | tuple[str, ...]],
        pixels: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        on_corrupt: str = "raise",
        reads: Mapping[str, Sequence[str]] | None = None,
        cache_bytes: int = SHARD_CACHE_BYTES,
    ):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.skipped: set[str] = set()  # shards skipped as unreadable (on_corrupt="skip")
        self.dataset = dataset
        self.split = split
        # `reads`: {alias: outputs} for features of which only some outputs are decoded (a
        # plugin's `reads`); the others are decoded whole
        self.columns = [c.only(reads[c.alias]) if reads and c.alias in reads else c for c in (dataset.column(n) for n in needs)]
        self.cache = ShardCache(cache_bytes) if cache_bytes else None
        self.pixels = pixels
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epochs = epochs
        self.rank, self.world_size = rank, world_size
        self.shards = self._index()

    def _index(self) -> list[str]:
        """Read what the stream forms items from (the pair table); the shards that have any."""
        self.dataset.require_samples(self.split)
        table = self.dataset.pairs(self.split)
        self.pairs_by_shard: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        self.skipped_across_shards = 0
        for a, b, shard in zip(table["source_key"].to_pylist(), table["target_key"].to_pylist(), table["shard"].to_pylist()):
            if shard is None:
                self.skipped_across_shards += 1
            else:
                self.pairs_by_shard[shard].append((a, b))
        shards = [s for s in self.dataset.shards(self.split) if self.pairs_by_shard.get(s)]
        if not shards:
            raise ValueError(f"{self.dataset.location.url}: split {self.split!r} has no pairs inside one shard")
        return shards

    @property
    def skipped_shards(self) -> int:
        """How many shards this stream (in this process) skipped as unreadable."""
        return len(self.skipped)

    def __len__(self) -> int:
        return sum(len(v) for v in self.pairs_by_shard.values())

    def _consumer(self) -> tuple[int, int]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self._consumer()
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(f"{self.seed}:{epoch}:{consumer}")
            shard_order = list(self.shards)
            random.Random(f"{self.seed}:{epoch}").shuffle(shard_order)  # same order everywhere
            if len(shard_order) >= consumers:
                mine, pair_slice = split_for_consumer(shard_order, consumer, consumers), (0, 1)
            else:
                mine, pair_slice = shard_order, (consumer, consumers)
            yield from _buffer_shuffle(self._items(mine, pair_slice, rng), self.shuffle_buffer, rng)
            epoch += 1

    def _items(self, shards: list[str], pair_slice: tuple[int, int], rng: random.Random) -> Iterator[dict[str, Any]]:
        for shard, samples in self._readable(shards):
            pairs = list(split_for_consumer(self.pairs_by_shard[shard], *pair_slice))
            rng.shuffle(pairs)
            for a, b in pairs:
                yield {"source": samples[a], "target": samples[b]}

    def _readable(self, shards: list[str]) -> Iterator[tuple[str, dict[str, dict[str, Any]]]]:
        """(shard, {key: sample}) for each shard read whole; unreadable ones per `on_corrupt`."""
        skipped = 0
        for shard in shards:
            try:
                samples = {s["__key__"]: s for s in self.dataset.read_shard(shard, self.columns, self.pixels, self.cache)}
            except ShardError as e:
                if self.on_corrupt != "skip":
                    raise
                skipped += 1
                if shard not in self.skipped:  # warn once per shard, not every epoch
                    self.skipped.add(shard)
                    log.warning("skipping shard %s (%d skipped so far): %s", shard, self.skipped_shards, e)
                if skipped == len(shards):
                    raise ShardError(f"{self.dataset.location.url}: all {len(shards)} shards of split {self.split!r} this reader reads are unreadable; the last: {e}") from e
                continue
            yield shard, samples


GROUP_SIZE = 4  # IMAGPose's 2 x 2 canvas


class GroupStream(PairStream):
    """Groups of one person (IMAGPose): `{"group": name, "samples": [sample] * size}`, the
    `size` samples drawn with replacement from one group of one shard, redrawn while all are
    the same image (the official `HumanPoseDataset.__getitem__`), one item per group per
    epoch. Groups of a single image cannot give two different images: they are skipped and
    counted in `skipped_singletons`. Same seeding, shard shuffle, rank / DataLoader-worker
    split, buffer shuffle and `on_corrupt` as `PairStream`, so a resumed run that replays
    the stream sees the same groups in the same order."""

    def __init__(self, dataset: Dataset, split: str, needs: Sequence[str | tuple[str, ...]], size: int = GROUP_SIZE, **options: Any):
        if size < 2:
            raise ValueError(f"group size must be at least 2, got {size}")
        self.size = size
        super().__init__(dataset, split, needs, **options)

    def _index(self) -> list[str]:
        self.dataset.require_samples(self.split)
        manifest = self.dataset.manifest
        rows = manifest.filter(pc.equal(manifest["split"], self.split))
        members: dict[tuple[str, str], list[tuple[int, str]]] = collections.defaultdict(list)
        for key, group, shard, index in zip(rows["key"].to_pylist(), rows["group"].to_pylist(), rows["shard"].to_pylist(), rows["index"].to_pylist()):
            members[(shard, group)].append((index, key))
        self.groups_by_shard: dict[str, list[tuple[str, list[str]]]] = collections.defaultdict(list)
        self.skipped_singletons = 0
        for (shard, group), keyed in sorted(members.items()):
            if len(keyed) < 2:
                self.skipped_singletons += 1
            else:
                self.groups_by_shard[shard].append((group, [k for _, k in sorted(keyed)]))
        shards = [s for s in self.dataset.shards(self.split) if self.groups_by_shard.get(s)]
        if not shards:
            raise ValueError(f"{self.dataset.location.url}: split {self.split!r} has no group with two or more images")
        return shards

    def __len__(self) -> int:
        return sum(len(v) for v in self.groups_by_shard.values())

    def _items(self, shards: list[str], group_slice: tuple[int, int], rng: random.Random) -> Iterator[dict[str, Any]]:
        # With fewer shards than consumers every consumer reads every shard; groups are then
        # dealt round-robin over the whole epoch (a shard often holds fewer groups than there
        # are consumers, so dealing per shard would leave some consumers nothing).
        consumer, consumers = group_slice
        position = 0
        dealt = 0
        for shard, samples in self._readable(shards):
            groups = self.groups_by_shard[shard]
            mine = [g for i, g in enumerate(groups, position) if i % consumers == consumer]
            position += len(groups)
            dealt += len(mine)
            rng.shuffle(mine)
            for group, keys in mine:
                while True:
                    drawn = [rng.choice(keys) for _ in range(self.size)]
                    if len(set(drawn)) > 1:
                        break
                yield {"group": group, "samples": [samples[k] for k in drawn]}
        if not dealt and consumers > 1:
            raise ValueError(f"{self.dataset.location.url}: split {self.split!r} has {len(self)} groups, fewer than the {consumers} ranks x DataLoader workers reading it")


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def torch_pairs(stream: PairStream):
    """The stream as a torch IterableDataset (for DataLoader with workers)."""
    import torch.utils.data

    class _Pairs(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(stream)

    return _Pairs()
