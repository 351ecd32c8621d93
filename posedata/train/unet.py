"""The UNet side every image plugin shares (docs/design.md, "Plugins"): named base models,
the parts the PGPIS models add to a Stable Diffusion UNet, a diffusers model base that holds
several networks, one loading path, and `UNetPlugin`, the set-up a UNet plugin inherits.

- `BASE_MODELS`: `sd15` (SD-1.5 UNet, cross-attention 768, `vae:sd15` = sd-vae-ft-mse) and
  `sd21` (SD-2.1-base, 1024, `vae:sd21`): architecture config, a tiny config of the same
  class, hub id, scheduler config, and the VAE feature the latents must come from.
- Parts, each usable alone: `widen_conv_in` (copy / official init), `add_class_projection`,
  `pose_embedding` + `conv_in_residual` (a ControlNet conditioning embedding added after
  `conv_in`: PCDMs, IMAGPose, TruePose), `TokenProjection` (image-encoder tokens -> the
  cross-attention width).
- `PluginModel`: `ModelMixin` + `ConfigMixin` base; `save_pretrained` / `from_pretrained`
  cover every network it holds (one UNet, or several: TruePose's SourceNet + TargetNet).
- `load_plugin_model`: hub id or local dir; a saved plugin model loads as is, an SD
  pipeline's UNet is loaded at its own shape and handed to the plugin to adapt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from posedata.train.diffusion import Objective
from posedata.train.plugin import Plugin, as_tensor, output_shape, vae_scaling_factor

# ---- base models ----------------------------------------------------------------------------

_SD_BLOCKS: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "upcast_attention": False,
}
# stabilityai/stable-diffusion-2-1-base unet/config.json (architecture keys)
SD21_UNET_CONFIG: dict[str, Any] = {**_SD_BLOCKS, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (architecture keys; 8 heads)
SD15_UNET_CONFIG: dict[str, Any] = {**_SD_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False}


def tiny_unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """Same class, two levels (latents downsampled by 2 only), for CPU tests."""
    return {**config, "sample_size": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 64], "layers_per_block": 1,
            "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": [2, 4]}


# Both SD schedulers (scheduler/scheduler_config.json, PNDM configs that the official code
# reads into DDPMScheduler for training and DDIM / UniPC for sampling): scaled-linear betas
# 0.00085..0.012 over 1000 steps, epsilon prediction (SD-2.1-base is the epsilon model; only
# the 768 model is v-prediction).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


@dataclass(frozen=True)
class BaseModel:
    """A Stable Diffusion UNet a plugin starts from."""

    name: str
    hub_id: str  # a diffusers pipeline repo (its unet/ subfolder is loaded)
    unet_config: dict[str, Any]
    tiny_unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    vae_feature: str  # the dataset feature its latents must come from

    def unet(self, weights: str, **overrides: Any) -> dict[str, Any]:
        """The UNet config for a weights mode (tiny, or full size) with `overrides`."""
        return {**(self.tiny_unet_config if weights == "tiny" else self.unet_config), **overrides}


BASE_MODELS: dict[str, BaseModel] = {
    "sd15": BaseModel("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", SD15_UNET_CONFIG, tiny_unet_config(SD15_UNET_CONFIG),
                      SD_SCHEDULER_CONFIG, "vae:sd15"),
    "sd21": BaseModel("sd21", "stabilityai/stable-diffusion-2-1-base", SD21_UNET_CONFIG, tiny_unet_config(SD21_UNET_CONFIG),
                      SD_SCHEDULER_CONFIG, "vae:sd21"),
}


def base_model(name: str) -> BaseModel:
    if name not in BASE_MODELS:
        raise KeyError(f"unknown base model {name!r}; known: {', '.join(BASE_MODELS)}")
    return BASE_MODELS[name]


# ---- parts ----------------------------------------------------------------------------------

CONV_IN_INITS = ("copy", "official")
PAPER_POSE_CHANNELS = (16, 32, 96, 256)  # ControlNet's, as PCDMs / IMAGPose / TruePose use it
TINY_POSE_CHANNELS = (8, 8, 16, 16)


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int, init: str = "copy") -> None:
    """Give `unet.conv_in` `in_channels` inputs. "copy": the old kernel in the first channels,
    zeros in the new ones (InstructPix2Pix / SD inpainting fine-tunes: training starts from
    the pretrained UNet); "official": a fresh default-initialised kernel, which is what
    `from_pretrained(..., in_channels=N, ignore_mismatched_sizes=True)` leaves (PCDMs,
    IMAGPose). The bias is kept either way."""
    if init not in CONV_IN_INITS:
        raise ValueError(f"conv_in init must be one of {CONV_IN_INITS}, got {init!r}")
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    if old.in_channels > in_channels:
        raise ValueError(f"conv_in already has {old.in_channels} input channels, more than {in_channels}")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, padding=old.padding, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        if init == "copy":
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


def add_class_projection(unet: UNet2DConditionModel, input_dim: int) -> None:
    """`class_embed_type="projection"`: a fresh TimestepEmbedding(input_dim, time_embed_dim)
    added to the time embedding (what a `from_pretrained` override creates, default init)."""
    cfg = unet.config
    if cfg.class_embed_type == "projection" and cfg.projection_class_embeddings_input_dim == input_dim:
        return
    if unet.class_embedding is not None:
        raise ValueError(f"the UNet already has a class embedding ({cfg.class_embed_type!r})")
    time_embed_dim = unet.time_embedding.linear_2.out_features
    unet.class_embedding = TimestepEmbedding(input_dim, time_embed_dim).to(unet.device, unet.dtype)
    unet.register_to_config(class_embed_type="projection", projection_class_embeddings_input_dim=input_dim)


def pose_embedding(unet_config: dict[str, Any] | Any, block_out_channels: tuple[int, ...] = PAPER_POSE_CHANNELS,
                   conditioning_channels: int = 3) -> ControlNetConditioningEmbedding:
    """diffusers' `ControlNetConditioningEmbedding`: a pose image [B, 3, H, W] -> [B, C0,
    H/8, W/8] (C0 = the UNet's first block width; zero-initialised last conv), to add after
    `conv_in` with `conv_in_residual`."""
    first = (unet_config["block_out_channels"] if isinstance(unet_config, dict) else unet_config.block_out_channels)[0]
    return ControlNetConditioningEmbedding(first, conditioning_channels=conditioning_channels, block_out_channels=tuple(block_out_channels))


def _add_residual(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    residual = getattr(module, "_residual", None)
    return output if residual is None else output + residual


def attach_conv_in_residual(unet: UNet2DConditionModel) -> None:
    """Let `conv_in_residual` add a tensor to `conv_in`'s output (a forward hook, so the UNet
    stays a stock `UNet2DConditionModel` and loads / saves as one)."""
    if not hasattr(unet.conv_in, "_residual"):
        unet.conv_in._residual = None
        unet.conv_in.register_forward_hook(_add_residual)


@contextlib.contextmanager
def conv_in_residual(unet: UNet2DConditionModel, residual: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `unet(...)` adds `residual` (e.g. the pose embedding) to the output
    of `conv_in`, as the official PCDMs / IMAGPose / AnimateAnyone UNets do."""
    attach_conv_in_residual(unet)
    unet.conv_in._residual = residual
    try:
        yield
    finally:
        unet.conv_in._residual = None


class TokenProjection(nn.Module):
    """Image-encoder tokens [B, N, in_dim] -> [B, N, out_dim] for cross-attention: Linear,
    GELU, Dropout(0), LayerNorm, Linear, Dropout(0) (PCDMs' `ImageProjModel_p`; keys
    `net.{0,3,4}` as the official checkpoint)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, out_dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- models ---------------------------------------------------------------------------------


def plain_config(unet: UNet2DConditionModel) -> dict[str, Any]:
    """A UNet's config as a JSON-ready dict without diffusers' private keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if not k.startswith("_")}


class PluginModel(ModelMixin, ConfigMixin):
    """Base of plugin models: every network a plugin trains, in one diffusers model, so
    `save_pretrained` / `from_pretrained` and the trainer's checkpoints cover them all.

    A subclass decorates `__init__` with `@register_to_config`, records each UNet's config
    as a plain dict argument (`unet_config`, or `source_unet_config` + `target_unet_config`)
    and takes already loaded UNets through arguments listed in `ignore_for_config` (the
    pretrained path), building each with `make_unet(config, given)`."""

    _supports_gradient_checkpointing = True
    ignore_for_config: ClassVar[list[str]] = ["unet", "unets"]

    @staticmethod
    def make_unet(config: dict[str, Any], unet: UNet2DConditionModel | None = None) -> UNet2DConditionModel:
        return unet if unet is not None else UNet2DConditionModel.from_config(config)


def model_subfolder(model: str, pipeline_subfolder: str = "unet") -> str | None:
    """Where the weights are: a pipeline's `unet/`, a trainer checkpoint's `model/`, or the
    directory itself; hub ids are pipelines (`pipeline_subfolder`)."""
    if os.path.isdir(model):
        for sub in (pipeline_subfolder, "model"):
            if os.path.isfile(os.path.join(model, sub, "config.json")):
                return sub
        return None
    return pipeline_subfolder


def load_plugin_model(cls: type[PluginModel], model: str, from_unet: Callable[[UNet2DConditionModel], PluginModel]) -> PluginModel:
    """One path for hub ids and local directories: a saved `cls` (save_pretrained, or a
    trainer checkpoint's `model/`) is loaded as is; a UNet2DConditionModel (an SD pipeline's
    `unet/`) is loaded at its own shape and handed to `from_unet`, which adapts it."""
    subfolder = model_subfolder(model)
    config = cls.load_config(model, subfolder=subfolder)
    name = config.get("_class_name")
    if name == cls.__name__:
        return cls.from_pretrained(model, subfolder=subfolder)
    if name not in (None, UNet2DConditionModel.__name__):
        raise ValueError(f"{model}: a {name}, expected a {cls.__name__} or a UNet2DConditionModel (a Stable Diffusion pipeline's unet/)")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder=subfolder, torch_dtype=torch.float32)
    return from_unet(unet)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The parameter dtype (also through a DDP wrapper, which has no `.dtype`)."""
    return next(model.parameters()).dtype


# ---- the plugin base ------------------------------------------------------------------------


class UNetPlugin(Plugin):
    """What a Stable-Diffusion-UNet plugin shares: the base model, the VAE facts of the
    dataset, the training objective, and the three ways to build a model (tiny, random,
    pretrained). A subclass sets `base_model`, `model_cls`, `needs`, `presets`, and
    overrides the hooks below; it writes `collate`, `loss` and `sample` itself, with the
    layer's parts (`Objective.noisy` / `.loss`, `sample_latent`, `drop_conditions`,
    `denoise`)."""

    base_model: ClassVar[str] = "sd15"
    model_cls: ClassVar[type[PluginModel]]
    conv_in_init: str = "copy"  # or "official" (see widen_conv_in)
    noise_offset: ClassVar[float] = 0.0
    min_snr_gamma: ClassVar[float | None] = None
    scheduler_changes: ClassVar[dict[str, Any]] = {}  # e.g. v_prediction + zero-terminal SNR

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None, preset: str | None = None,
                 **options: Any):
        super().__init__(card, weights, model, preset, **options)
        self.base = base_model(self.base_model)
        self.vae_need = self.base.vae_feature
        self.height, self.width = (int(v) for v in card["resolution"])
        self.latent_shape = tuple(output_shape(card, self.vae_need, "mean.npy", self.name))
        self.scaling_factor = vae_scaling_factor(card, self.vae_need, self.name)
        self.objective = self.make_objective()
        self.noise_scheduler = self.objective.train_scheduler()

    def make_objective(self) -> Objective:
        return Objective({**self.base.scheduler_config, **self.scheduler_changes}, noise_offset=self.noise_offset,
                         min_snr_gamma=self.min_snr_gamma)

    # ---- model hooks ----------------------------------------------------------------------

    def unet_overrides(self) -> dict[str, Any]:
        """Config changes of the plugin's UNet (in_channels, class embedding, ...)."""
        return {}

    def unet_changes(self, unet: UNet2DConditionModel) -> None:
        """The same changes made to a loaded pretrained UNet (widen conv_in, ...)."""

    def model_kwargs(self) -> dict[str, Any]:
        """The model's other constructor arguments (from the preset's `model` by default)."""
        return dict(self.preset.model)

    def check_model(self, model: PluginModel) -> PluginModel:
        """Refuse a loaded model that does not fit the dataset (a clear error)."""
        return model

    def from_unet(self, unet: UNet2DConditionModel) -> PluginModel:
        """A model around one pretrained UNet (a multi-network model copies it)."""
        self.unet_changes(unet)
        return self.model_cls(unet_config=plain_config(unet), unet=unet, **self.model_kwargs())

    def build_model(self) -> PluginModel:
        if self.weights == "pretrained":
            return self.check_model(load_plugin_model(self.model_cls, self.model_id or self.base.hub_id, self.from_unet))
        return self.check_model(self.model_cls(unet_config=self.base.unet(self.weights, **self.unet_overrides()), **self.model_kwargs()))

    # ---- data helpers ---------------------------------------------------------------------

    def posterior(self, sample: dict[str, Any], flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample's stored VAE posterior (mean, std), the horizontally flipped image's
        (`vae.mean_flip`, built with `--flip`) when `flipped`."""
        suffix = "_flip" if flipped else ""
        if flipped and "vae.mean_flip" not in sample:
            raise ValueError(f"{self.name}: {sample.get('__key__')} has no flipped latents (build or extend the vae feature with --flip)")
        return as_tensor(sample[f"vae.mean{suffix}"]), as_tensor(sample[f"vae.std{suffix}"])

    def noisy(self, latents: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, loss target) for one training step."""
        step = self.objective.noisy(latents, generator, self.noise_scheduler)
        return step.noisy, step.timesteps, step.target
