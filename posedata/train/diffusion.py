"""The diffusion side every plugin shares: training objective, noise from stored posteriors,
condition dropout, the sampling loop and decoding (docs/design.md, "Plugins").

- `Objective`: a diffusers scheduler config (betas, `prediction_type` epsilon / v_prediction
  / sample, `rescale_betas_zero_snr`, `timestep_spacing`, `variance_type`) plus the two
  training tricks that are not scheduler settings: noise offset and min-SNR weighting.
  `objective.noisy(x0, generator)` draws one training step, `objective.loss(pred, step)` is
  its (weighted, optionally masked) MSE; `objective.sampler("ddim")` builds any diffusers
  scheduler from the same config.
- `sample_latent`: `latent_dist.sample() * scaling_factor` from a stored (mean, std).
- `drop_conditions`: classifier-free-guidance dropout through stored null embeddings or
  zeros, one independent draw per condition.
- `denoise`: the pipelines' loop with classifier-free guidance, guidance rescale, any
  scheduler, learned variance, and a per-step hook that may take gradients.
- `decode_to_uint8`: scaled or unscaled latents -> uint8 images.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UnCLIPScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.training_utils import compute_snr

from posedata.train.config import SCHEDULER_NAMES

# `--scheduler NAME` -> diffusers class; built with `from_config(objective.scheduler)`.
SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "unipc": UniPCMultistepScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unclip": UnCLIPScheduler,
}
LEARNED_VARIANCE = ("learned", "learned_range")
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of `shape` on `like`'s device and dtype, drawn on the
    generator's device (so a CPU generator gives the same numbers on any device)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def sample_latent(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`latent_dist.sample() * scaling_factor` from a stored posterior: (mean + std * eps) * s."""
    return (mean + std * randn(tuple(mean.shape), mean, generator)) * scaling_factor


@dataclass
class NoisedBatch:
    """One training step's draw: the noisy input, its timesteps, the regression target."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    noise: torch.Tensor


@dataclass(frozen=True)
class Objective:
    """Training noise schedule + loss. `scheduler` is a diffusers scheduler config (the base
    model's, with a plugin's changes); `sampler_configs` holds per-sampler changes (e.g. the
    UnCLIP prior's clip range)."""

    scheduler: Mapping[str, Any]
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    # "diffusers": min(SNR, gamma) / (SNR + 1) for v-prediction (diffusers' scripts);
    # "plus_one": min(SNR + 1, gamma) / (SNR + 1) (Moore-AnimateAnyone / IMAGPose add 1 first)
    min_snr_variant: str = "diffusers"
    sampler_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def learned_variance(self) -> bool:
        return self.scheduler.get("variance_type") in LEARNED_VARIANCE

    def train_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(dict(self.scheduler))

    def sampler(self, name: str, **changes: Any):
        """A diffusers scheduler for sampling, from the training config (+ `changes`)."""
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
        config = {**self.scheduler, **self.sampler_configs.get(name, {}), **changes}
        return SCHEDULERS[name].from_config(config)

    def noisy(self, x0: torch.Tensor, generator: torch.Generator | None, scheduler: DDPMScheduler | None = None) -> NoisedBatch:
        """Noise, noise offset (one value per sample and channel: `randn(B, C, 1, 1)`, or
        `randn(B, 1)` for a [B, D] embedding), uniform timesteps, the noisy input and the
        target of `prediction_type`. Draws come from `generator` in that order."""
        scheduler = scheduler or self.train_scheduler()
        bsz = x0.shape[0]
        noise = randn(tuple(x0.shape), x0, generator)
        if self.noise_offset:
            offset_shape = (bsz, x0.shape[1]) + (1,) * (x0.ndim - 2) if x0.ndim > 2 else (bsz, 1)
            noise = noise + self.noise_offset * randn(offset_shape, x0, generator)
        gen_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=gen_device).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, t)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
        elif kind == "sample":
            target = x0
        else:
            raise ValueError(f"unknown prediction_type {kind!r}")
        return NoisedBatch(noisy, t, target, noise)

    def loss(self, prediction: torch.Tensor, step: NoisedBatch, mask: torch.Tensor | None = None,
             scheduler: DDPMScheduler | None = None) -> torch.Tensor:
        """MSE between prediction and target, in float32. With learned variance only the
        first half of the channels (the mean) is compared (the VLB term is the plugin's).
        `mask` (broadcastable to the target, 1 = counts) keeps padding out of the loss.
        `min_snr_gamma`: each sample weighted by min(SNR, gamma) / SNR (epsilon), / (SNR + 1)
        (v-prediction) or min(SNR, gamma) (x0), as diffusers' training scripts do."""
        pred = prediction[:, : step.target.shape[1]] if self.learned_variance else prediction
        pred, target = pred.float(), step.target.float()
        if mask is None and self.min_snr_gamma is None:
            return F.mse_loss(pred, target)
        err = (pred - target) ** 2
        if mask is not None:
            mask = mask.float().expand_as(err)
            per_sample = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
        else:
            per_sample = err.flatten(1).mean(1)
        if self.min_snr_gamma is not None:
            snr = compute_snr(scheduler or self.train_scheduler(), step.timesteps).float()
            if self.min_snr_variant == "plus_one" and self.prediction_type == "v_prediction":
                snr = snr + 1
            clipped = torch.minimum(snr, torch.full_like(snr, self.min_snr_gamma))
            if self.min_snr_variant == "plus_one" or self.prediction_type == "epsilon":
                weight = clipped / snr.clamp_min(1e-8)
            elif self.prediction_type == "v_prediction":
                weight = clipped / (snr + 1)
            else:
                weight = clipped
            per_sample = per_sample * weight
        return per_sample.mean()


# ---- condition dropout ----------------------------------------------------------------------


def drop_conditions(
    batch: dict[str, torch.Tensor],
    nulls: Mapping[str | tuple[str, ...], torch.Tensor | float],
    p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Classifier-free-guidance dropout in place: for each entry of `nulls` (in order; a key
    or a tuple of batch keys dropped together), the rows where a uniform draw < p take the
    null value (a stored null embedding, broadcast to one row, or a number such as 0).
    One draw per row and entry, `torch.rand((B, len(nulls)))`. Returns that boolean mask."""
    bsz = next(iter(batch.values())).shape[0]
    if p <= 0:
        return torch.zeros((bsz, len(nulls)), dtype=torch.bool)
    drop = torch.rand((bsz, len(nulls)), generator=generator) < p
    # the mask as Python lists, read once: this runs per batch in the loader, where each
    # tensor op on a cache-cold core costs more than the whole decision
    columns = list(zip(*drop.tolist()))
    for (keys, value), column in zip(nulls.items(), columns):
        rows = [i for i, dropped in enumerate(column) if dropped]
        if not rows:
            continue
        for key in (keys,) if isinstance(keys, str) else keys:
            if torch.is_tensor(value):
                batch[key][rows] = value.to(batch[key].dtype).reshape(batch[key].shape[1:])
            else:
                batch[key][rows] = value
    return drop


# ---- sampling -------------------------------------------------------------------------------


@dataclass
class DenoiseStep:
    """What a step hook sees: step `index` at `timestep`, the current latents x_t (no grad),
    the guided model output (`model_output`: what the scheduler will get), the scheduler and
    `predict` (the model call, for hooks that differentiate through the model)."""

    index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    model_output: torch.Tensor
    scheduler: Any
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# returns a replacement model output, or None to keep it; runs with gradients enabled
StepHook = Callable[[DenoiseStep], torch.Tensor | None]


def guide(pred: torch.Tensor, channels: int, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance on a doubled batch [unconditional; conditional]. With learned
    variance (2 x `channels` outputs) only the mean part is guided; the variance is the
    conditional one (as DiT and IDDPM do)."""
    uncond, cond = pred.chunk(2)
    rest = None
    if pred.shape[1] > channels:
        uncond, (cond, rest) = uncond[:, :channels], (cond[:, :channels], cond[:, channels:])
    out = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        out = rescale_noise_cfg(out, cond, guidance_rescale=guidance_rescale)
    return out if rest is None else torch.cat([out, rest], dim=1)


@torch.no_grad()
def denoise(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    *,
    scheduler: Any,
    num_inference_steps: int,
    device: torch.device | str,
    dtype: torch.dtype,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    step_hook: StepHook | None = None,
) -> torch.Tensor:
    """Sample: start from noise of `shape` (or `latents`), and at every timestep call
    `predict(x, t)` on the scheduler-scaled latents (doubled, unconditional half first, when
    `guidance_scale` > 1), guide, let `step_hook` change the output, and step the scheduler.

    `predict` returns the model output for its input: noise, v or x0, whatever the scheduler
    config's prediction_type says; 2 x C channels for a learned-variance model (passed whole
    to a scheduler with a learned `variance_type`, else its mean half). `step_hook` runs
    under `torch.enable_grad()`, so it may differentiate (RePoseDM's pose guidance)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if latents is None:
        gen_device = generator.device if generator is not None else "cpu"
        latents = torch.randn(shape, generator=generator, device=gen_device).to(device, dtype) * scheduler.init_noise_sigma
    channels = latents.shape[1]
    guided = guidance_scale > 1.0
    params = inspect.signature(scheduler.step).parameters
    # only schedulers that take a variance_type read the variance half (DDPM, UnCLIP)
    takes_variance = "variance_type" in inspect.signature(type(scheduler).__init__).parameters
    learned = takes_variance and scheduler.config.get("variance_type") in LEARNED_VARIANCE
    for i, t in enumerate(timesteps):
        x = torch.cat([latents] * 2) if guided else latents
        pred = predict(scheduler.scale_model_input(x, t), t)
        if guided:
            pred = guide(pred, channels, guidance_scale, guidance_rescale)
        if step_hook is not None:
            with torch.enable_grad():
                changed = step_hook(DenoiseStep(i, t, latents, pred, scheduler, predict))
            pred = pred if changed is None else changed.detach()
        if pred.shape[1] > channels and not learned:
            pred = pred[:, :channels]
        extra: dict[str, Any] = {}
        if "generator" in params:
            extra["generator"] = generator
        if "prev_timestep" in params:
            extra["prev_timestep"] = timesteps[i + 1] if i + 1 < len(timesteps) else None
        latents = scheduler.step(pred, t, latents, **extra).prev_sample
    return latents


def decode_to_uint8(vae: Any, latents: torch.Tensor, scaled: bool = False) -> np.ndarray:
    """Latents [B, 4, h, w] -> uint8 images [B, H, W, 3]. `scaled`: the latents are in the
    diffusion model's space (divided by the VAE's scaling_factor first); otherwise they are
    in the stored posteriors' space."""
    if scaled:
        latents = latents / vae.config.scaling_factor
    images = vae.decode(latents.to(next(vae.parameters()).dtype)).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def decode_to_unit(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] [B, 3, H, W] (what the pipelines' postprocess does)."""
    images = vae.decode(latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
