"""`posedata train PLUGIN --shards URL`: connects a dataset to a plugin and the trainer.

The plugin says which features it needs; this opens exactly those columns, streams pairs
from them, collates with the plugin, and hands the trainer a `batches_factory`.
"""

from __future__ import annotations

import itertools
import os
import shutil
from typing import Any, Iterator

import numpy as np
import torch

from posedata.reader import Dataset, PairStream, torch_pairs
from posedata.train import plugin_class
from posedata.train.plugin import Plugin
from posedata.train.trainer import train


def load_null_embeddings(dataset: Dataset, plugin: Plugin) -> dict[str, np.ndarray]:
    """`clip.embeds` -> the array stored as features/<clip folder>/null.embeds.npy."""
    nulls = {}
    for name in plugin.null_embeddings():
        feature, output = name.split(".", 1)
        nulls[name] = dataset.null_embedding(dataset.column(feature), output)
    return nulls


def batches_factory(dataset: Dataset, plugin: Plugin, split: str, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1, on_corrupt: str = "raise"):
    """factory(start, seed): batches of the pair stream for `seed`, from batch `start` on.
    Resuming replays the stream's order and skips what was consumed, so the data position
    is exact (cheap for feature-only plugins: no pixels are decoded). `on_corrupt="skip"`
    skips unreadable shards with a warning (see `PairStream`)."""

    def factory(start: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        stream = PairStream(dataset, split, plugin.needs, pixels=plugin.needs_pixels, seed=seed, rank=rank, world_size=world_size, on_corrupt=on_corrupt)
        loader = torch.utils.data.DataLoader(
            torch_pairs(stream),
            batch_size=batch_size,
            collate_fn=plugin.collate,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        return itertools.islice(iter(loader), start, None)

    return factory


def run_training(
    plugin_name: str,
    shards: str,
    out: str,
    *,
    weights: str = "pretrained",
    model: str | None = None,
    split: str = "train",
    batch_size: int | None = None,
    num_workers: int = 0,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    skip_corrupt: bool = False,
    **train_options: Any,
) -> dict[str, Any]:
    """`skip_corrupt`: skip shards that cannot be read (corrupt, truncated, missing, keys
    out of line) with a warning naming each, instead of stopping at the first."""
    if overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    dataset = Dataset(shards, storage_options)
    plugin = plugin_class(plugin_name)(dataset.card, weights=weights, model=model)
    batch_size = batch_size or plugin.defaults.batch_size
    return train(
        plugin,
        batches_factory(dataset, plugin, split, batch_size, num_workers, on_corrupt="skip" if skip_corrupt else "raise"),
        out,
        batch_size=batch_size,
        null_embeddings=load_null_embeddings(dataset, plugin),
        **train_options,
    )
