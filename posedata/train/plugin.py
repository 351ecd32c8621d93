"""The one protocol every training plugin follows (DESIGN.md §5).

A plugin declares the features it reads, builds its model, turns a collated batch of pairs
into a loss, and knows how to sample; nothing else: the shared trainer
(`posedata.train.trainer`) owns devices, mixed precision, accumulation, checkpoints, resume,
logging and progress.

What a plugin receives from the reader (`posedata.reader`): pairs, each
`{"source": sample, "target": sample}`, where a sample is a flat dict with `__key__`,
`__shard__`, `split`, `group`, and one entry per stored output named `<feature>.<output>`,
e.g. `clip.embeds` (np.float16 [D]) or `openpose.keypoints` (np.float32 [18, 3]). A
feature that the plugin accepts under several names (`("openpose", "keypoints_annotated")`)
is presented under the first name in the tuple, whichever one the dataset has.

Null embeddings (classifier-free-guidance dropout): a plugin names the stored null outputs
it needs in `null_embeddings()` (e.g. `("clip.embeds",)`, read from
`features/<folder>/null.<output>.npy`); the trainer hands the arrays to
`set_null_embeddings` before it asks for any batch, so `collate` (which may run in
DataLoader workers) can swap them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass(frozen=True)
class TrainDefaults:
    learning_rate: float
    weight_decay: float = 0.01
    warmup_steps: int = 0
    batch_size: int = 8
    max_grad_norm: float = 10.0
    noise_offset: float = 0.0


# One need: a feature name, or a tuple of interchangeable names (first is preferred).
FeatureNeed = str | tuple[str, ...]


class Plugin:
    name: ClassVar[str]
    needs: ClassVar[tuple[FeatureNeed, ...]]
    needs_pixels: ClassVar[bool] = False
    defaults: ClassVar[TrainDefaults]

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None):
        """`card` is the dataset card (dataset.json) so the plugin can size itself from the
        stored shapes (e.g. the CLIP embedding width); `weights` is tiny|random|pretrained;
        `model` overrides the pretrained hub id or local directory."""
        self.card = card
        self.weights = weights
        self.model_id = model
        self.nulls: dict[str, np.ndarray] = {}

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def null_embeddings(self) -> tuple[str, ...]:
        """Names (`<feature>.<output>`) of the stored null embeddings this plugin needs."""
        return ()

    def set_null_embeddings(self, arrays: Mapping[str, Any]) -> None:
        """Called by the trainer with {name: array} for every name in `null_embeddings()`."""
        missing = [n for n in self.null_embeddings() if n not in arrays]
        if missing:
            raise ValueError(
                f"plugin {self.name!r} needs the stored null embeddings {missing} "
                "(features/<folder>/null.<output>.npy) for condition dropout"
            )
        self.nulls = {n: np.asarray(arrays[n]) for n in self.null_embeddings()}

    def collate(self, pairs: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """CPU-side: stack a list of pairs into tensors, applying condition dropout (runs in
        DataLoader workers). Draw every random number from `generator`: the trainer's loader
        (`posedata.train.run.collated_loader`) passes one seeded by (seed, rank, batch
        number), which is what makes a resumed run repeat the uninterrupted one exactly.
        `generator` None (direct calls) draws from torch's global RNG."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss of one batch (on the model's device). Draw noise and timesteps
        from `generator` (a CPU generator the trainer seeds by (seed, batch number,
        process)). With several processes `model` is the trainer's `WrappedModel`: calling it
        calls the DistributedDataParallel wrapper (gradients are synchronised), its
        attributes (`model.dtype`, the model's own methods) are the plain model's; call the
        model itself once per step, not only its submodules."""
        raise NotImplementedError

    def sample(self, model: torch.nn.Module, pairs: list[dict[str, Any]], *, generator: torch.Generator | None = None, **options: Any) -> Any:
        """Generate the plugin's output for pairs (features of the target that sampling
        cannot know, e.g. its CLIP embedding, may be absent)."""
        raise NotImplementedError
