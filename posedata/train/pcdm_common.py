"""What the PCDMs stage-2 (`pcdm-inpaint`) and stage-3 (`pcdm-refine`) plugins share: the
SD-2.1-base UNet (configs, loading, widening `conv_in`), the DINOv2 MLP, the noise schedule,
latent sampling from stored posteriors, and the guided denoising loop.

Facts from the official code (tencent-ailab/PCDMs), used by both stages:

- UNet: `stabilityai/stable-diffusion-2-1-base`, subfolder `unet` (run_stage2.sh,
  run_stage3.sh), loaded with `in_channels` overridden (9, resp. 8) and
  `low_cpu_mem_usage=False, ignore_mismatched_sizes=True` (stage2_train_inpaint_model.py,
  stage3_train_refined_model.py). With those flags diffusers drops the pretrained `conv_in`
  weight (its shape differs) and keeps PyTorch's default init for the whole widened kernel;
  the bias is loaded. `CONV_IN_INITS`: "official" does exactly that; "copy" (our default, as
  in InstructPix2Pix / SD inpainting fine-tunes) copies the pretrained kernel into the first
  4 input channels and zeroes the new ones, so training starts from the pretrained UNet.
- `ImageProjModel_p` (both training scripts): Linear(1536, 768), GELU, Dropout(0),
  LayerNorm(768), Linear(768, 1024), Dropout(0) over DINOv2-G `last_hidden_state` [257, 1536].
  No LayerNorm at the end (the stage-1 pose MLP has one). Key names `net.{0,3,4}` kept, and
  the wrapper models name their parts `unet`, `image_proj_model_p` (and `pose_proj`) as the
  official `SDModel` does, so an official checkpoint's "module" state dict has our keys.
- Noise schedule: `DDPMScheduler.from_pretrained(<sd21-base>, subfolder="scheduler")`; the
  SD-2.1-base scheduler config is scaled_linear betas 0.00085..0.012 over 1000 steps with
  epsilon prediction (SD-2.1-base is the epsilon model; only the 768 model is v-prediction);
  loss MSE on the noise over the whole latent (`reduction="mean"`), noise offset 0.1 as
  `noise_offset * randn(B, C, 1, 1)`.
- Optimiser (stage2_config.py / stage3_config.py defaults + the run scripts): AdamW
  (0.9, 0.999), eps 1e-8, weight decay 1e-2, max grad norm 1.0 (not overridden by the run
  scripts), `--lr_scheduler` left at its default "constant", which ignores the
  `--lr_warmup_steps 5000` the scripts pass (as for stage 1); we default to the 5000 warm-up
  steps the flags ask for ("constant_with_warmup" in the shared trainer). Batch 8 (stage 2)
  / 16 (stage 3) per GPU on 8 GPUs, DeepSpeed, fp16, 1M steps.
- Sampling (stage2_batchtest_inpaint_model.py, stage3_batchtest_refined_model.py):
  `UniPCMultistepScheduler.from_config(<sd21-base scheduler>)`, 20 steps, guidance_scale 2.0,
  seed 42, 4 samples per pair of which the one with the best SSIM against the ground truth
  is kept (we do not do that). The unconditional branch is all-zeros in embedding space.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
)
from torch import nn

from posedata.train.plugin import Plugin

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"

# stabilityai/stable-diffusion-2-1-base unet/config.json (architecture keys).
SD21_UNET_CONFIG: dict[str, Any] = {
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
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "upcast_attention": False,
}
# Same class, two levels, for CPU tests (downsamples latents by 2 only).
TINY_UNET_CONFIG: dict[str, Any] = {
    **SD21_UNET_CONFIG,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],
}
# stabilityai/stable-diffusion-2-1-base scheduler/scheduler_config.json (a PNDM config; the
# official code reads it into DDPMScheduler for training and UniPC for sampling).
SD21_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
SAMPLERS = {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler}
CONV_IN_INITS = ("copy", "official")
UNCOND_MODES = ("null", "zeros")


# ---- model pieces ---------------------------------------------------------------------------


class ImageProjModel(nn.Module):
    """DINOv2 tokens [B, N, in_dim] -> [B, N, out_dim] (the official `ImageProjModel_p`)."""

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


class PcdmUNetModel(ModelMixin, ConfigMixin):
    """Base of the stage-2/3 models: one ModelMixin holding the UNet (its config recorded as
    `unet_config`) and the DINOv2 MLP, so `save_pretrained` / `from_pretrained` and the
    trainer's checkpoints cover every trained weight. `unet=` passes an already loaded UNet
    (the pretrained path); it is not part of the config."""

    _supports_gradient_checkpointing = True
    ignore_for_config: ClassVar[list[str]] = ["unet"]

    def _build(self, unet_config: dict[str, Any], unet: UNet2DConditionModel | None, image_embed_dim: int, proj_hidden_dim: int) -> None:
        self.unet = unet if unet is not None else UNet2DConditionModel.from_config(unet_config)
        self.image_proj_model_p = ImageProjModel(image_embed_dim, proj_hidden_dim, self.unet.config.cross_attention_dim)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, **kwargs: Any) -> PcdmUNetModel:
        return cls(unet_config=plain_config(unet), unet=unet, **kwargs)


def plain_config(unet: UNet2DConditionModel) -> dict[str, Any]:
    """A UNet's config as a JSON-ready dict without diffusers' private keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if not k.startswith("_")}


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int, init: str = "copy") -> None:
    """Give `unet.conv_in` `in_channels` inputs. "copy": the old kernel in the first channels,
    zeros in the new ones; "official": a fresh default-initialised kernel (what
    `from_pretrained(..., in_channels=N, ignore_mismatched_sizes=True)` leaves). The bias is
    kept either way."""
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
    added to the time embedding (what the official overrides create, default init)."""
    cfg = unet.config
    if cfg.class_embed_type == "projection" and cfg.projection_class_embeddings_input_dim == input_dim:
        return
    if unet.class_embedding is not None:
        raise ValueError(f"the UNet already has a class embedding ({cfg.class_embed_type!r})")
    time_embed_dim = unet.time_embedding.linear_2.out_features
    unet.class_embedding = TimestepEmbedding(input_dim, time_embed_dim).to(unet.device, unet.dtype)
    unet.register_to_config(class_embed_type="projection", projection_class_embeddings_input_dim=input_dim)


def model_subfolder(model: str) -> str | None:
    """Where the weights are: a pipeline's `unet/`, a trainer checkpoint's `model/`, or the
    directory itself; hub ids are SD pipelines (`unet`)."""
    if os.path.isdir(model):
        for sub in ("unet", "model"):
            if os.path.isfile(os.path.join(model, sub, "config.json")):
                return sub
        return None
    return "unet"


def load_pretrained(cls: type[PcdmUNetModel], model: str, from_unet: Callable[[UNet2DConditionModel], PcdmUNetModel]) -> PcdmUNetModel:
    """One path for hub ids and local directories: a saved `cls` (save_pretrained, or a
    trainer checkpoint's `model/`) is loaded as is; a UNet2DConditionModel (an SD pipeline's
    `unet/`) is loaded at its own shape and handed to `from_unet`, which widens it."""
    subfolder = model_subfolder(model)
    config = cls.load_config(model, subfolder=subfolder)
    name = config.get("_class_name")
    if name == cls.__name__:
        return cls.from_pretrained(model, subfolder=subfolder)
    if name not in (None, UNet2DConditionModel.__name__):
        raise ValueError(f"{model}: a {name}, expected a {cls.__name__} or a UNet2DConditionModel (e.g. {SD21_BASE})")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder=subfolder, torch_dtype=torch.float32)
    return from_unet(unet)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The parameter dtype (also through a DDP wrapper, which has no `.dtype`)."""
    return next(model.parameters()).dtype


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


# ---- dataset facts --------------------------------------------------------------------------


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


def as_tensor(array: Any) -> torch.Tensor:
    """A stored array (fp16 / fp32 numpy) as float32 torch."""
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


# ---- noise ----------------------------------------------------------------------------------


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler.from_config(SD21_SCHEDULER_CONFIG)


def sampling_scheduler(name: str = "unipc"):
    if name not in SAMPLERS:
        raise ValueError(f"scheduler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name].from_config(SD21_SCHEDULER_CONFIG)


def randn_like(x: torch.Tensor, generator: torch.Generator | None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Standard normal noise on x's device and dtype, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(shape or tuple(x.shape), generator=generator, device=device).to(x.device, x.dtype)


def sample_latent(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`latent_dist.sample() * scaling_factor` from a stored posterior: (mean + std * eps) * s."""
    return (mean + std * randn_like(mean, generator)) * scaling_factor


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {scheduler.config.prediction_type}")


class PcdmPlugin(Plugin):
    """Shared set-up of the stage-2/3 plugins (weights mode, VAE facts, noise schedule, the
    three ways to build a model, noisy latents for a step)."""

    vae_need = "vae:sd21"
    dinov2_need = "dinov2:giant"
    conv_in_init = "copy"  # or "official" (see the module docstring)

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None):
        super().__init__(card, weights, model)
        if weights not in ("tiny", "random", "pretrained"):
            raise ValueError(f"weights must be tiny|random|pretrained, got {weights!r}")
        self.height, self.width = (int(v) for v in card["resolution"])
        self.latent_shape = tuple(output_shape(card, self.vae_need, "mean.npy", self.name))
        self.scaling_factor = vae_scaling_factor(card, self.vae_need, self.name)
        self.token_shape = tuple(output_shape(card, self.dinov2_need, "tokens.npy", self.name))
        self.noise_offset = self.defaults.noise_offset
        self.noise_scheduler = train_scheduler()

    # subclasses: the model class, the UNet changes, the model's own kwargs
    model_cls: type[PcdmUNetModel]

    def unet_changes(self, unet: UNet2DConditionModel) -> None:
        raise NotImplementedError

    def unet_overrides(self) -> dict[str, Any]:
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        dim = self.token_shape[-1]
        return {"image_embed_dim": dim, "proj_hidden_dim": max(1, dim // 2)}  # 1536 -> 768 as official

    def check_model(self, model: PcdmUNetModel) -> PcdmUNetModel:
        if model.config.image_embed_dim != self.token_shape[-1]:
            raise ValueError(f"{self.name}: the model reads {model.config.image_embed_dim}-wide DINOv2 tokens; the dataset stores {self.token_shape[-1]}")
        return model

    def build_model(self) -> PcdmUNetModel:
        if self.weights == "pretrained":

            def from_unet(unet: UNet2DConditionModel) -> PcdmUNetModel:
                self.unet_changes(unet)
                return self.model_cls.from_unet(unet, **self.model_kwargs())

            return self.check_model(load_pretrained(self.model_cls, self.model_id or SD21_BASE, from_unet))
        base = TINY_UNET_CONFIG if self.weights == "tiny" else SD21_UNET_CONFIG
        return self.model_cls(unet_config={**base, **self.unet_overrides()}, **self.model_kwargs())

    def noisy(self, latents: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, loss target) for one training step, official recipe."""
        bsz, channels = latents.shape[:2]
        noise = randn_like(latents, generator)
        if self.noise_offset:
            noise = noise + self.noise_offset * randn_like(latents, generator, (bsz, channels, 1, 1))
        gen_device = generator.device if generator is not None else latents.device
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (bsz,), generator=generator, device=gen_device).to(latents.device)
        return self.noise_scheduler.add_noise(latents, noise, t), t, diffusion_target(self.noise_scheduler, latents, noise, t)


# ---- sampling -------------------------------------------------------------------------------


@torch.no_grad()
def denoise(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    *,
    device: torch.device,
    dtype: torch.dtype,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    num_inference_steps: int = 20,
    scheduler: str = "unipc",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The pipelines' loop: `predict(x, t)` gets the scaled latents (doubled, unconditional
    half first, when guidance_scale > 1) and returns the model's noise prediction."""
    sched = sampling_scheduler(scheduler)
    sched.set_timesteps(num_inference_steps, device=device)
    gen_device = generator.device if generator is not None else "cpu"
    latents = torch.randn(shape, generator=generator, device=gen_device).to(device, dtype) * sched.init_noise_sigma
    guided = guidance_scale > 1.0
    extra = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        x = torch.cat([latents] * 2) if guided else latents
        pred = predict(sched.scale_model_input(x, t), t)
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
            if guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, cond, guidance_rescale=guidance_rescale)
        latents = sched.step(pred, t, latents, **extra).prev_sample
    return latents


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (what the pipelines' postprocess does)."""
    vae_dtype = next(vae.parameters()).dtype
    images = vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
