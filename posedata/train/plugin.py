"""The one protocol every training plugin follows (docs/design.md, "Plugins").

A plugin declares the features it reads, builds its model, turns a collated batch of pairs
into a loss, and knows how to sample; nothing else: the shared trainer
(`posedata.train.trainer`) owns devices, mixed precision, accumulation, checkpoints, resume,
logging and progress, and `posedata.train.sample` owns reading pairs and writing samples.
UNet plugins start from `posedata.train.unet.UNetPlugin`, which does the set-up they share.

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

Settings: `presets` (`paper`, `tiny`: model size + `TrainConfig`), `sample_recipes` (the
first is the default), and extra command-line options (`train_options`, `sample_options`)
are class attributes, so `posedata train --help` / `sample --help` can show them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from posedata.train.config import PluginOption, Preset, SampleSettings, TrainConfig, preset_name

# One need: a feature name, or a tuple of interchangeable names (first is preferred).
FeatureNeed = str | tuple[str, ...]


class Plugin:
    name: ClassVar[str]
    needs: ClassVar[tuple[FeatureNeed, ...]]
    needs_pixels: ClassVar[bool] = False
    # {alias: outputs} for the features of which `collate` reads only some outputs (e.g.
    # {"openpose": ("keypoints", "hands")}: the skeleton PNG is never decoded); a feature not
    # named here is decoded whole. The reader's cost per sample is mostly decoding.
    reads: ClassVar[dict[str, tuple[str, ...]] | None] = None
    presets: ClassVar[dict[str, Preset]]
    sample_recipes: ClassVar[dict[str, SampleSettings]] = {"default": SampleSettings()}
    train_options: ClassVar[tuple[PluginOption, ...]] = ()
    sample_options: ClassVar[tuple[PluginOption, ...]] = ()
    # what `sample` returns: "latents" (unscaled, the stored posteriors' space; decoded with
    # the dataset's VAE) or "embedding" (saved as .npy)
    output: ClassVar[str] = "latents"
    vae_need: str | None = None  # the VAE feature "latents" come from (UNetPlugin sets it from its base model)

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None, preset: str | None = None,
                 **options: Any):
        """`card` is the dataset card (dataset.json) so the plugin can size itself from the
        stored shapes; `weights` tiny|random|pretrained; `model` overrides the pretrained hub
        id or local directory; `preset` defaults to "tiny" for tiny weights, else "paper";
        `options` are the values of the plugin's `train_options`."""
        self.card = card
        self.weights = weights
        self.model_id = model
        self.preset_name = preset_name(weights, preset)
        if self.preset_name not in self.presets:
            raise ValueError(f"{self.name}: no preset {self.preset_name!r}; known: {', '.join(self.presets)}")
        self.preset = self.presets[self.preset_name]
        known = {o.name: o.default for o in self.train_options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {unknown}; known: {sorted(known) or 'none'}")
        self.options = {**known, **{k: v for k, v in options.items() if v is not None}}
        for option in self.train_options:  # the CLI checks choices too; the Python API needs it here
            value = self.options[option.name]
            if option.choices and value is not None and value not in option.choices:
                raise ValueError(f"{self.name}: {option.name} must be one of {list(option.choices)}, got {value!r}")
        self.nulls: dict[str, np.ndarray] = {}

    @property
    def defaults(self) -> TrainConfig:
        """The training settings of this plugin's preset (`posedata train` starts from them)."""
        return self.preset.train

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

    def null(self, name: str) -> torch.Tensor:
        """A stored null output as float32 torch."""
        if name not in self.nulls:
            raise ValueError(f"{self.name} needs the stored null output {name!r}; call set_null_embeddings first")
        return as_tensor(self.nulls[name])

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

    def sample(self, model: torch.nn.Module, pairs: list[dict[str, Any]], *, generator: torch.Generator | None = None, **settings: Any) -> Any:
        """Generate for pairs (features of the target that sampling cannot know, e.g. its
        CLIP embedding, may be absent). `settings` are `SampleSettings` fields
        (num_inference_steps, guidance_scale, guidance_rescale, scheduler, uncond) and the
        plugin's own inputs; what is not given comes from `sample_settings()`. Returns
        what `output` says."""
        raise NotImplementedError

    def sample_outputs(self, model: torch.nn.Module, pairs: list[dict[str, Any]], *, generator: torch.Generator | None, settings: SampleSettings,
                       vae: Any = None, **options: Any) -> list[dict[str, Any]]:
        """What `posedata sample PLUGIN` writes for a batch of pairs: one dict per output with
        "image" (uint8 [H, W, 3]) or "array" (saved as .npy), optionally "pair" (index into
        `pairs`, default: the position), "name" (file stem, default `<source>_to_<target>`),
        "source_key" / "target_key" (default: the pair's), and any extra columns for
        samples.parquet. Default: `sample` once per batch, one output per pair, latents
        decoded with the dataset's VAE (`vae`). Override for several outputs per pair."""
        from posedata.train.diffusion import decode_to_uint8

        result = self.sample(model, pairs, generator=generator, **settings.as_kwargs(), **options)
        if self.output == "embedding":
            return [{"array": result[i].float().cpu().numpy()} for i in range(len(pairs))]
        images = decode_to_uint8(vae, result)
        return [{"image": images[i]} for i in range(len(pairs))]

    def sample_settings(self, recipe: str | None = None, **changes: Any) -> SampleSettings:
        """The settings of `recipe` (default: the first of `sample_recipes`), with `changes`
        (None values ignored)."""
        name = recipe or next(iter(self.sample_recipes))
        if name not in self.sample_recipes:
            raise ValueError(f"{self.name}: no sampling recipe {name!r}; known: {', '.join(self.sample_recipes)}")
        fields = set(SampleSettings.__dataclass_fields__)
        return self.sample_recipes[name].replace(**{k: v for k, v in changes.items() if k in fields})

    def split_settings(self, kwargs: dict[str, Any]) -> tuple[SampleSettings, dict[str, Any]]:
        """`sample(**kwargs)` -> (SampleSettings from the default recipe with the given
        fields, the remaining keyword arguments)."""
        fields = set(SampleSettings.__dataclass_fields__)
        settings = self.sample_settings(**{k: v for k, v in kwargs.items() if k in fields})
        return settings, {k: v for k, v in kwargs.items() if k not in fields}


# ---- what the dataset card says -------------------------------------------------------------


def feature_card(card: dict[str, Any], need: str, plugin: str) -> dict[str, Any]:
    from posedata.reader import find_feature

    found = find_feature(card, need)
    if not found:
        raise ValueError(f"{plugin}: the dataset has no {need!r} feature; run `posedata build` / `posedata extend` with it")
    return found[1]


def output_shape(card: dict[str, Any], need: str, output: str, plugin: str) -> list[int]:
    try:
        return [int(v) for v in feature_card(card, need, plugin)["outputs"][output]["shape"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{plugin}: the card's {need!r} feature does not record the shape of {output}") from e


def vae_scaling_factor(card: dict[str, Any], need: str, plugin: str) -> float:
    value = feature_card(card, need, plugin).get("scaling_factor")
    if value is None:
        raise ValueError(f"{plugin}: the card's {need!r} feature has no scaling_factor")
    return float(value)


def rebuild_extractor(card: dict[str, Any], need: str, plugin: str):
    """The extractor a dataset's feature `need` was computed with, rebuilt from the card (its
    weights mode, model, preset, dtype, resolution and upstream folders) and checked against
    the stored fingerprint, so a frozen network used at train or sample time (a VAE to
    decode, RePoseDM's HigherHRNet) is exactly the one that made the features."""
    from posedata.extractors import create_extractor, parse_spec
    from posedata.reader import find_feature

    found = find_feature(card, need)
    if not found:
        raise ValueError(f"{plugin}: the dataset has no {need!r} feature; run `posedata build` / `posedata extend` with it")
    folder, feature = found
    name, preset = parse_spec(need)
    preset = feature.get("preset") or preset
    kwargs: dict[str, Any] = {"weights": feature["weights"], "resolution": tuple(card["resolution"]), "dtype": feature["dtype"]}
    if feature["weights"] == "pretrained":
        kwargs["model"] = feature["fingerprint_inputs"]["model"]
    extractor = create_extractor(f"{name}:{preset}" if preset else name, upstream=feature["fingerprint_inputs"].get("upstream"), **kwargs)
    if extractor.folder != folder:
        raise RuntimeError(f"{plugin}: cannot rebuild the model of {folder} from the card (got {extractor.folder}); pass the model explicitly")
    return extractor


def as_tensor(array: Any) -> torch.Tensor:
    """A stored array (fp16 / fp32 numpy) as float32 torch."""
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def stack(samples: list[dict[str, Any]], key: str) -> torch.Tensor:
    """One stored output of several samples as a float32 batch."""
    return torch.stack([as_tensor(s[key]) for s in samples])
