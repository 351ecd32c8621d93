"""`posedata train PLUGIN --shards URL`: connects a dataset to a plugin and the trainer.

The plugin says which features it needs; this opens exactly those columns, streams pairs
from them, collates with the plugin, and hands the trainer a `batches_factory`.

Several processes (`accelerate launch --num_processes N -m posedata.cli train ...`, or
torchrun): each process reads its own part of the pair stream (`PairStream`'s rank /
world_size = accelerate's process_index / num_processes) and its DataLoader workers split
that part again.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posedata.reader import Dataset, GroupStream, PairStream
from posedata.train import plugin_class
from posedata.train.checkpoint import check_run_folder
from posedata.train.plugin import Plugin
from posedata.train.trainer import batch_seed, train, use_cpu

logger = logging.getLogger(__name__)
SKIPPED = None  # what a worker yields for a batch before the resume point (not collated)


def load_null_embeddings(dataset: Dataset, plugin: Plugin) -> dict[str, np.ndarray]:
    """`clip.embeds` -> the array stored as features/<clip folder>/null.embeds.npy."""
    nulls = {}
    for name in plugin.null_embeddings():
        feature, output = name.split(".", 1)
        nulls[name] = dataset.null_embedding(dataset.column(feature), output)
    return nulls


class CollatedBatches(torch.utils.data.IterableDataset):
    """Batches of `batch_size` pairs, collated where the pairs are read (the main process or
    each DataLoader worker), each with its own generator seeded by (seed, rank, global batch
    number). The DataLoader takes batches from its workers in turn, so worker w of W makes
    global batches w, w + W, w + 2W, ...; batches before `start` are read (to keep every
    worker's stream in step) but not collated: they come out as `SKIPPED`.

    So batch n is the same whether the run started at 0 or resumed at `start` <= n, and the
    condition dropout no longer depends on torch's global RNG in the workers. `pairs` must be
    endless (a `PairStream` with epochs=None) and split itself across workers."""

    def __init__(self, pairs: Iterable[dict[str, Any]], collate: Callable[..., dict[str, torch.Tensor]], batch_size: int, seed: int,
                 rank: int = 0, start: int = 0):
        super().__init__()
        self.pairs, self.collate, self.batch_size = pairs, collate, batch_size
        self.seed, self.rank, self.start = seed, rank, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pairs = iter(self.pairs)
        for j in itertools.count():
            chunk = list(itertools.islice(pairs, self.batch_size))
            if len(chunk) < self.batch_size:
                raise RuntimeError(f"the pair stream ended after {j * self.batch_size + len(chunk)} pairs in worker {worker}; it must be endless")
            index = j * workers + worker
            if index < self.start:
                yield SKIPPED
                continue
            yield self.collate(chunk, torch.Generator().manual_seed(batch_seed(self.seed, self.rank, index)))


def as_is(batch: Any) -> Any:
    return batch


def collated_loader(pairs: Iterable[dict[str, Any]], plugin: Plugin, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                    start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches from number `start` on (see `CollatedBatches`), through a DataLoader
    with `num_workers` worker processes (0: in this process)."""
    batches = CollatedBatches(pairs, plugin.collate, batch_size, seed, rank, start)
    if num_workers == 0 and not torch.cuda.is_available():
        # nothing for a DataLoader to do (no workers, no pinning): its per-batch bookkeeping
        # is a measurable part of a small model's step (bench/README.md, reader section)
        return itertools.islice(iter(batches), start, None)
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # the dataset yields whole batches
        collate_fn=as_is,  # as collated (no conversion of numpy arrays to tensors)
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # worker seeds from their own generator, not from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(batch_seed(seed, rank, 0, "loader")),
    )
    return itertools.islice(iter(loader), start, None)


def batches_factory(dataset: Dataset, plugin: Plugin, split: str, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                    on_corrupt: str = "raise"):
    """factory(start, seed): batches of the pair stream for `seed` (this rank's part), from
    batch `start` on. Resuming replays the stream's order and skips what was consumed without
    collating it, so the data position is exact (the skipped pairs are still read: cheap for
    feature-only plugins, no pixels are decoded). `on_corrupt="skip"` skips unreadable shards
    with a warning (see `PairStream`)."""

    def factory(start: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        # a plugin's `stream`: "pairs" (PairStream) or "groups" (GroupStream: IMAGPose's groups of four)
        stream_cls = GroupStream if getattr(plugin, "stream", "pairs") == "groups" else PairStream
        stream = stream_cls(dataset, split, plugin.needs, pixels=plugin.needs_pixels, seed=seed, rank=rank, world_size=world_size, on_corrupt=on_corrupt,
                            reads=plugin.reads)
        return collated_loader(stream, plugin, batch_size, num_workers, seed, rank, start)

    return factory


def describe_data(dataset: Dataset, plugin: Plugin, shards: str, split: str, num_workers: int, world_size: int, skip_corrupt: bool) -> dict[str, Any]:
    """What config.json records about the data: where, which feature folders (with their
    fingerprints and models), the split, and how the stream is cut."""
    card = dataset.card
    features = {}
    for need in plugin.needs:
        column = dataset.column(need)
        feature = card["features"][column.folder]
        features[column.alias] = {
            "need": list(need) if isinstance(need, tuple) else need,
            "folder": column.folder,
            "fingerprint": feature.get("fingerprint"),
            "name": feature.get("name"),
            "preset": feature.get("preset"),
            "model": feature.get("model"),
            "weights": feature.get("weights"),
            "dtype": feature.get("dtype"),
            "outputs": {k: v.get("shape") for k, v in feature.get("outputs", {}).items()},
        }
    info = card.get("splits", {}).get(split, {})
    # pairs whose two images lie in different shards cannot be streamed (docs/design.md §3)
    crossing = sum(shard is None for shard in dataset.pairs(split)["shard"].to_pylist())
    if crossing:
        logger.warning("%s: %d pairs of split %r cross two shards and are skipped (recorded in config.json)", shards, crossing, split)
    groups = {}
    if getattr(plugin, "stream", "pairs") == "groups":  # groups of one image cannot be trained on: counted
        stream = GroupStream(dataset, split, ())
        groups = {"groups": len(stream), "groups_of_one_image_skipped": stream.skipped_singletons}
        if stream.skipped_singletons:
            logger.warning("%s: %d groups of split %r have a single image and are skipped (recorded in config.json)", shards,
                           stream.skipped_singletons, split)
    return {
        "url": shards,
        "name": card.get("name"),
        "resolution": card.get("resolution"),
        "format_version": card.get("format_version"),
        "posedata_version": card.get("posedata_version"),
        "split": split,
        "shards": len(info.get("shards", [])),
        "samples": info.get("samples"),
        "pairs": info.get("pairs"),
        "pairs_across_shards_skipped": crossing,
        **groups,
        "pixels": plugin.needs_pixels,
        "features": features,
        "num_workers": num_workers,
        "world_size": world_size,
        "skip_corrupt_shards": skip_corrupt,
    }


def run_training(
    plugin_name: str,
    shards: str,
    out: str,
    *,
    weights: str = "pretrained",
    model: str | None = None,
    preset: str | None = None,
    options: dict[str, Any] | None = None,
    split: str = "train",
    num_workers: int = 0,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    skip_corrupt: bool = False,
    resume: bool | str = False,
    **changes: Any,
) -> dict[str, Any]:
    """Open the dataset, build the plugin (`options`: its `train_options` values), and train
    with its preset's `TrainConfig` with `changes` (TrainConfig fields: max_steps,
    batch_size, learning_rate, ema_decay, ...). `skip_corrupt`: skip shards that cannot be
    read (corrupt, truncated, missing, keys out of line) with a warning naming each, instead
    of stopping at the first. Under `accelerate launch` every process calls this; each reads
    its own part of the data."""
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu())
    rank, world_size = state.process_index, state.num_processes
    if state.is_main_process:
        check_run_folder(Path(os.path.expanduser(out)), overwrite)
    state.wait_for_everyone()
    dataset = Dataset(shards, storage_options)
    plugin = plugin_class(plugin_name)(dataset.card, weights=weights, model=model, preset=preset, **(options or {}))
    config = plugin.defaults.replace(**changes)
    on_corrupt = "skip" if skip_corrupt else "raise"
    return train(
        plugin,
        batches_factory(dataset, plugin, split, config.batch_size, num_workers, rank=rank, world_size=world_size, on_corrupt=on_corrupt),
        out,
        config,
        resume=resume,
        null_embeddings=load_null_embeddings(dataset, plugin),
        run_info=describe_data(dataset, plugin, shards, split, num_workers, world_size, skip_corrupt),
    )
