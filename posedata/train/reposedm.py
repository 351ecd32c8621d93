"""reposedm: RePoseDM (Khandelwal, "RePoseDM: Recurrent Pose Alignment and Gradient Guidance
for Pose Guided Image Synthesis") trained from stored features. No public code exists: the
paper is the specification, read row by row against the nearest public code in
docs/reposedm-fidelity.md.

- Backbone (sec. 3.1, eq. 2-4): a latent UNet (diffusers `UNet2DConditionModel`, SD-1.5
  layout, `vae:sd15` latents) whose input is [y_t (4) | VAE(target pose) (4)] and whose
  output has 8 channels, the noise and the learned-range variance of Improved DDPM
  (`posedata.train.reposedm_vlb`); loss L_mse + L_vlb.
- Appearance (sec. 3.2): the warped source features F_S^N of Recurrent Pose Alignment
  (`posedata.train.reposedm_rpa`) enter the UNet's cross-attention per resolution, as PIDM
  (the paper's baseline B1) feeds its texture encoder: a small pyramid of stride-2 convs
  (`TexturePyramid`) gives one token set per UNet level, each projected to the
  cross-attention width, and every attn2 attends to its own level's set
  (`LevelAttnProcessor`, set per block by `unet.attn_processors` name).
- Gradient guidance (sec. 3.3-3.4, eq. 10-16): `posedata.train.reposedm_guidance`, with the
  dataset's own VAE and HigherHRNet, and the target's stored `higherhrnet.pose_features`.
- Condition dropout (sec. 3.4, supp. sec. 8): p = 10 % of pairs drop the pose AND the source
  together: the pose latent becomes the stored empty-skeleton posterior
  (`pose_latent.black_mean/std`) and F_S^N zeros ("no interaction conditioning").
- Ablations (Table 2): B1 = `--alignment none --pose-guidance 0` (a conv encoder of the
  source latent, no RPA, no guidance), B2 = `--pose-guidance 0` (RPA, no guidance).
- `--rpa-warp pixels`: eq. 9 as written, RPA re-warps the source IMAGE (read from the base
  shards) and re-encodes it with the dataset's frozen VAE encoder every iteration; the
  default `latent` warps the stored source latent (no VAE in the step). Recorded in the
  model config (`rpa_warp`), so sampling runs the variant the model was trained with.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from posedata.extractors.vae import VaeExtractor
from posedata.train.config import PluginOption, Preset, SampleSettings, TrainConfig
from posedata.train.diffusion import denoise, sample_latent
from posedata.train.plugin import feature_card, output_shape, rebuild_extractor, stack
from posedata.train.reposedm_guidance import (
    GUIDANCE_LATENTS,
    PoseInteractionField,
    alpha_bar,
    guidance_term,
    interaction_field,
)
from posedata.train.reposedm_rpa import (
    RHWF_KERNELS,
    RPA_WARPS,
    RecurrentPoseAlignment,
    VaeSourceEncoder,
    latent_encoder,
)
from posedata.train.reposedm_vlb import GaussianPosterior, vlb_loss
from posedata.train.unet import PluginModel, UNetPlugin, model_dtype, widen_conv_in

LATENT_CHANNELS = 4
IN_CHANNELS = 2 * LATENT_CHANNELS  # [y_t | VAE(target pose)]
OUT_CHANNELS = 2 * LATENT_CHANNELS  # [eps | variance]
ALIGNMENTS = ("rpa", "none")  # "none": baseline B1's plain encoder of the source
SOURCE_PIXELS = "source_pixels"  # the collated source images, [-1, 1] [B, 3, H, W] (rpa_warp "pixels")

logger = logging.getLogger(__name__)
VAE_NEED, POSE_NEED, HRNET_NEED = "vae:sd15", "pose_latent:sd15", "higherhrnet"
MEAN, STD = "vae.mean", "vae.std"
POSE_MEAN, POSE_STD = "pose_latent.mean", "pose_latent.std"
NULL_POSE_MEAN, NULL_POSE_STD = "pose_latent.black_mean", "pose_latent.black_std"
POSE_FEATURES = "higherhrnet.pose_features"

# PIDM's schedule (config/diffusion.conf: linear 1e-4 .. 2e-2, T = 1000; "linear noise
# schedule", T = 1000 in the paper's supp. sec. 8) with Improved DDPM's learned range.
SCHEDULER_CHANGES: dict[str, Any] = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "variance_type": "learned_range"}


def widen_conv_out(unet: UNet2DConditionModel, out_channels: int) -> None:
    """Give `unet.conv_out` `out_channels` outputs: the old kernel for the first ones, zeros
    for the new ones (learned-range variance channels start at v = 0, the middle of the range)."""
    old = unet.conv_out
    if old.out_channels == out_channels:
        return
    if old.out_channels > out_channels:
        raise ValueError(f"conv_out already has {old.out_channels} output channels, more than {out_channels}")
    new = nn.Conv2d(old.in_channels, out_channels, old.kernel_size, padding=old.padding, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[: old.out_channels] = old.weight
        new.bias[: old.out_channels] = old.bias
    unet.conv_out = new
    unet.register_to_config(out_channels=out_channels)


def zero_cross_attention_outputs(unet: UNet2DConditionModel) -> None:
    """Zero the output projection of every cross-attention (attn2): PIDM's `zero_module` on
    its cross-attention output, so an untrained UNet starts by ignoring the source."""
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            nn.init.zeros_(module.to_out[0].weight)
            nn.init.zeros_(module.to_out[0].bias)


class TexturePyramid(nn.Module):
    """F_S^N [B, D, h, w] -> one token set per UNet level, [B, h_l * w_l, cross_dim]: level 0
    at latent resolution, each further level a stride-2 3x3 conv (padding 1, the sizes of the
    UNet's own `Downsample2D`) of the one above, each with its own `Linear(D, cross_dim)`
    (PIDM's texture encoder feeds the map of the same resolution to each attention block)."""

    def __init__(self, dim: int, levels: int, cross_dim: int):
        super().__init__()
        self.down = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(dim, dim, 3, stride=2, padding=1)) for _ in range(levels - 1))
        self.proj = nn.ModuleList(nn.Linear(dim, cross_dim) for _ in range(levels))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = [features]
        for down in self.down:
            maps.append(down(maps[-1]))
        return tuple(proj(m.flatten(2).transpose(1, 2)) for proj, m in zip(self.proj, maps, strict=True))


class LevelAttnProcessor(AttnProcessor2_0):
    """torch SDPA attention whose cross-attention keys / values are the token set of its own
    UNet level, `texture_tokens[level]` (passed as `cross_attention_kwargs`); `level` None (a
    self-attention) attends as before. Taking the keyword on every attention keeps diffusers
    from warning about it on the self-attentions."""

    def __init__(self, level: int | None = None):
        super().__init__()
        self.level = level

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 texture_tokens: tuple[torch.Tensor, ...] | None = None, **kwargs: Any) -> torch.Tensor:
        if self.level is not None and texture_tokens is not None:
            encoder_hidden_states = texture_tokens[self.level]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def attention_level(name: str, levels: int) -> int | None:
    """The UNet level (0 = latent resolution) of an attn2 processor name, None for attn1:
    down_blocks.i at level i, the mid block at the last, up_blocks.j at levels - 1 - j."""
    if ".attn2." not in name:
        return None
    block, index = name.split(".")[:2]
    if block == "mid_block":
        return levels - 1
    if block == "down_blocks":
        return int(index)
    if block == "up_blocks":
        return levels - 1 - int(index)
    raise ValueError(f"unexpected attention processor {name!r}")


def set_level_processors(unet: UNet2DConditionModel) -> None:
    """Give every attention of `unet` a `LevelAttnProcessor` for its level."""
    levels = len(unet.config.block_out_channels)
    unet.set_attn_processor({name: LevelAttnProcessor(attention_level(name, levels)) for name in unet.attn_processors})


Encode = Callable[[torch.Tensor], torch.Tensor]  # [-1, 1] pixels -> scaled latents (eq. 9's Encoder)


class RePoseDMModel(PluginModel):
    """UNet [y_t | pose latent] -> [eps | v], the source's appearance through Recurrent Pose
    Alignment (or B1's plain encoder) and a texture pyramid into each level's cross-attention."""

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        alignment: str = "rpa",
        rpa_dim: int = 96,
        rpa_radius: int = 4,
        rpa_iterations: int = 5,
        rpa_kernels: tuple[int, ...] | list[int] = RHWF_KERNELS,
        zero_init_cross_attention: bool = True,
        rpa_warp: str = "latent",
        unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if rpa_warp not in RPA_WARPS:
            raise ValueError(f"rpa_warp must be one of {RPA_WARPS}, got {rpa_warp!r}")
        if rpa_warp == "pixels" and alignment != "rpa":
            raise ValueError(f"rpa_warp 'pixels' warps inside Recurrent Pose Alignment; alignment {alignment!r} has none")
        self.unet = self.make_unet(unet_config, unet)
        if unet is None and zero_init_cross_attention:
            zero_cross_attention_outputs(self.unet)
        if alignment == "rpa":
            self.rpa = RecurrentPoseAlignment(LATENT_CHANNELS, rpa_dim, rpa_radius, rpa_iterations, rpa_kernels)
        else:
            self.texture_encoder = latent_encoder(LATENT_CHANNELS, rpa_dim)
        set_level_processors(self.unet)
        self.texture_pyramid = TexturePyramid(rpa_dim, len(self.unet.config.block_out_channels), self.unet.config.cross_attention_dim)

    def appearance(self, source: torch.Tensor, pose: torch.Tensor, pixels: torch.Tensor | None = None,
                   encode: Encode | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(F_S^N [B, D, h, w], the warped source latent or None for B1). A model trained with
        `rpa_warp="pixels"` needs the source `pixels` ([-1, 1] [B, 3, H, W]) and `encode`
        (the frozen VAE encoder, `VaeSourceEncoder`)."""
        if self.config.alignment == "rpa":
            if self.config.rpa_warp == "pixels":
                if pixels is None or encode is None:
                    raise ValueError("this RePoseDM model warps the source pixels (rpa_warp 'pixels'): give the source images and the VAE encoder")
                features, warped, _ = self.rpa(source, pose, pixels, encode)
            else:
                features, warped, _ = self.rpa(source, pose)
            return features, warped
        return self.texture_encoder(source), None

    def context(self, source: torch.Tensor, pose: torch.Tensor, keep: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
                encode: Encode | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """One cross-attention token set per UNet level, [B, h_l * w_l, cross_dim] (zero
        rows where `keep` is 0), and the warp."""
        features, warped = self.appearance(source, pose, pixels, encode)
        tokens = self.texture_pyramid(features)
        if keep is not None:
            tokens = tuple(t * keep.to(t.device, t.dtype).view(-1, 1, 1) for t in tokens)
        return tokens, warped

    def denoise_step(self, noisy: torch.Tensor, timestep: Any, pose: torch.Tensor, context: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """[eps | v] [B, 8, h, w] for noisy latents, the pose latent and the per-level tokens."""
        levels = len(self.unet.config.block_out_channels)
        if len(context) != levels:
            raise ValueError(f"expected {levels} token sets (one per UNet level), got {len(context)}")
        return self.unet(torch.cat([noisy, pose], dim=1), timestep, encoder_hidden_states=context[0],
                         cross_attention_kwargs={"texture_tokens": tuple(context)}).sample

    def forward(self, noisy: torch.Tensor, timestep: Any, pose: torch.Tensor, source: torch.Tensor, keep: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None, encode: Encode | None = None):
        """One training call: (UNet output [B, 8, h, w], warped source latent or None)."""
        context, warped = self.context(source, pose, keep, pixels, encode)
        return self.denoise_step(noisy, timestep, pose, context), warped


def reposedm_presets() -> dict[str, Preset]:
    """`paper`: supp. sec. 8 (AdamW lr 1e-4, batch 8, EMA 0.9999, 300k iterations) with RHWF's
    MapFormer width 96 and a correlation radius of 4; `tiny`: a tiny UNet and MapFormer that
    learn visibly on CPU in a few dozen steps with no flags."""
    paper = TrainConfig(max_steps=300_000, batch_size=8, learning_rate=1e-4, weight_decay=1e-2, warmup_steps=0, ema_decay=0.9999)
    # 30 steps: the guidance decodes and runs HigherHRNet every step (loss 1.2 -> ~0.2 at 256x176)
    tiny = paper.replace(max_steps=30, batch_size=4, learning_rate=1e-3, ema_decay=0.99, checkpoint_every=100)
    return {
        "paper": Preset(model={"rpa_dim": 96, "rpa_radius": 4, "rpa_iterations": 5}, train=paper),
        "tiny": Preset(model={"rpa_dim": 8, "rpa_radius": 2, "rpa_iterations": 5}, train=tiny),
    }


class RePoseDMPlugin(UNetPlugin):
    """RePoseDM: RPA appearance features + pose latent + learned variance + pose guidance."""

    name = "reposedm"
    needs = (VAE_NEED, POSE_NEED, HRNET_NEED)
    needs_pixels = False
    reads = {"higherhrnet": ("pose_features",)}
    base_model = "sd15"
    model_cls = RePoseDMModel
    scheduler_changes = SCHEDULER_CHANGES
    presets = reposedm_presets()
    # supp. sec. 8: w_c = 2; PIDM's test sampler (train.py `--sample_algorithm ddim`,
    # `ddim_steps`: 50 steps, eta 0, cond_scale 2). "ddpm": eq. 2 with the learned variance.
    sample_recipes = {
        "paper": SampleSettings(num_inference_steps=50, guidance_scale=2.0, scheduler="ddim", uncond="null"),
        "ddpm": SampleSettings(num_inference_steps=1000, guidance_scale=2.0, scheduler="ddpm", uncond="null"),
    }
    train_options = (
        PluginOption("pose_guidance", "lambda of the gradient guidance in the training target (eq. 3 + 15); 0 = off (ablation B2)", 1.0, float),
        PluginOption("guidance_latents", "what P~_t decodes: Tweedie's x0 (eq. 13) or eq. 10's eps - eps_theta", "tweedie", str, GUIDANCE_LATENTS),
        PluginOption("alignment", "rpa: Recurrent Pose Alignment; none: baseline B1's plain source encoder", "rpa", str, ALIGNMENTS),
        PluginOption("warp_loss", "weight of an L1 loss between the warped source latent and the target latent (not in the paper)", 0.0, float),
        PluginOption("rpa_warp", "what RPA re-warps each iteration (eq. 9): latent: the stored source latent, learned conv re-encoding, "
                     "no VAE in the step; pixels: the source image, re-encoded by the frozen VAE encoder (the paper's; reads the "
                     "images, 6 VAE encoder passes + their backward per step)", "latent", str, RPA_WARPS),
    )
    sample_options = (
        PluginOption("pose_guidance", "scale of the gradient guidance added to the guided noise (eq. 15-16); 0 = off", 1.0, float),
    )
    drop_prob = 0.1  # pose and source together (supp. sec. 8: p = 10)

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None, preset: str | None = None,
                 **options: Any):
        super().__init__(card, weights, model, preset, **options)
        pose_shape = tuple(output_shape(card, POSE_NEED, "mean.npy", self.name))
        if pose_shape != self.latent_shape:
            raise ValueError(f"{self.name}: pose latents {pose_shape} and image latents {self.latent_shape} differ")
        if "pose_features.npy" not in feature_card(card, HRNET_NEED, self.name)["outputs"]:
            raise ValueError(f"{self.name}: the dataset's {HRNET_NEED} feature has no pose_features.npy")
        if self.options["rpa_warp"] == "pixels" and self.options["alignment"] != "rpa":
            raise ValueError(f"{self.name}: --rpa-warp pixels warps inside Recurrent Pose Alignment; --alignment {self.options['alignment']} has none")
        self.needs_pixels = self.options["rpa_warp"] == "pixels"  # the reader then decodes the stored images
        self.posterior = GaussianPosterior(self.noise_scheduler.betas)
        self._vae: Any = None
        self._field: PoseInteractionField | None = None
        self._encoder: VaeSourceEncoder | None = None

    # ---- model --------------------------------------------------------------------------

    def unet_overrides(self) -> dict[str, Any]:
        return {"in_channels": IN_CHANNELS, "out_channels": OUT_CHANNELS}

    def unet_changes(self, unet: UNet2DConditionModel) -> None:
        widen_conv_in(unet, IN_CHANNELS, self.conv_in_init)
        widen_conv_out(unet, OUT_CHANNELS)

    def model_kwargs(self) -> dict[str, Any]:
        return {"alignment": self.options["alignment"], "rpa_warp": self.options["rpa_warp"], **self.preset.model}

    def check_model(self, model: RePoseDMModel) -> RePoseDMModel:
        cfg = model.unet.config
        if (cfg.in_channels, cfg.out_channels) != (IN_CHANNELS, OUT_CHANNELS):
            raise ValueError(f"{self.name}: expected a UNet with {IN_CHANNELS} inputs and {OUT_CHANNELS} outputs, got {cfg.in_channels}, {cfg.out_channels}")
        # a loaded model keeps the variant it was trained with (like its alignment); the
        # plugin follows it, so `posedata sample` on a bare model folder warps what it should
        recorded = model.config.get("rpa_warp", "latent")
        if recorded != self.options["rpa_warp"]:
            logger.warning("%s: the model was trained with rpa_warp %r; using it instead of %r", self.name, recorded, self.options["rpa_warp"])
            self.options["rpa_warp"] = recorded
            self.needs_pixels = recorded == "pixels"
        return model

    def null_embeddings(self) -> tuple[str, ...]:
        return (NULL_POSE_MEAN, NULL_POSE_STD)

    def frozen_vae(self) -> Any:
        """The dataset's own VAE (rebuilt from the card, fingerprint checked), built once and
        shared by the guidance's decoder and the pixel warp's encoder."""
        if self._vae is None:
            self._vae = rebuild_extractor(self.card, VAE_NEED, self.name).build_model()
        return self._vae

    def field(self, device: torch.device) -> PoseInteractionField:
        """The frozen VAE + HigherHRNet of the dataset, built once, on `device`."""
        if self._field is None:
            self._field = interaction_field(self.card, VAE_NEED, HRNET_NEED, self.name, self.scaling_factor, vae=self.frozen_vae())
        return self._field.to(device)

    def source_encoder(self, device: torch.device) -> VaeSourceEncoder:
        """Eq. 9's Encoder for `rpa_warp` "pixels": the dataset's frozen VAE encoder, on `device`."""
        if self._encoder is None:
            self._encoder = VaeSourceEncoder(self.frozen_vae(), self.scaling_factor)
        return self._encoder.to(device)

    def pixel_inputs(self, model: RePoseDMModel, pixels: Callable[[], torch.Tensor], device: torch.device,
                     dtype: torch.dtype) -> dict[str, Any]:
        """`pixels` / `encode` keyword arguments for the model: empty unless it warps pixels."""
        if model.config.alignment != "rpa" or model.config.rpa_warp != "pixels":
            return {}
        return {"pixels": pixels().to(device, dtype), "encode": self.source_encoder(device)}

    # ---- data ---------------------------------------------------------------------------

    def collate(self, pairs: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """-> source/target/pose mean and std [B, 4, h, w], the target's stored pose features
        [B, 32, H/4, W/4] and `keep` [B] (0 = this pair's pose and source are dropped: the pose
        posterior becomes the empty skeleton's, the context zeros)."""
        sources, targets = [p["source"] for p in pairs], [p["target"] for p in pairs]
        batch = {
            "source_mean": stack(sources, MEAN),
            "source_std": stack(sources, STD),
            "target_mean": stack(targets, MEAN),
            "target_std": stack(targets, STD),
            "pose_mean": stack(targets, POSE_MEAN),
            "pose_std": stack(targets, POSE_STD),
            "pose_features": stack(targets, POSE_FEATURES),
        }
        drop = torch.rand(len(pairs), generator=generator) < self.drop_prob
        batch["pose_mean"][drop] = self.null(NULL_POSE_MEAN)
        batch["pose_std"][drop] = self.null(NULL_POSE_STD)
        batch["keep"] = (~drop).float()
        if self.needs_pixels:
            batch[SOURCE_PIXELS] = source_pixels(sources, self.name)
        return batch

    # ---- training -----------------------------------------------------------------------

    def loss(self, model: RePoseDMModel, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.scaling_factor
        target = sample_latent(batch["target_mean"], batch["target_std"], s, generator)
        source = sample_latent(batch["source_mean"], batch["source_std"], s, generator)
        pose = sample_latent(batch["pose_mean"], batch["pose_std"], s, generator)
        step = self.objective.noisy(target, generator, self.noise_scheduler)
        dtype = model_dtype(model)

        def pixels() -> torch.Tensor:
            if SOURCE_PIXELS not in batch:
                raise ValueError(f"{self.name}: the model warps the source pixels (rpa_warp 'pixels') but the batch has no images; "
                                 "train it with --rpa-warp pixels")
            return batch[SOURCE_PIXELS]

        output, warped = model(step.noisy.to(dtype), step.timesteps, pose.to(dtype), source.to(dtype), batch["keep"],
                               **self.pixel_inputs(model, pixels, source.device, dtype))
        output = output.float()
        lam = float(self.options["pose_guidance"])
        if lam:
            # eq. 3 with eq. 15: the target becomes eps - lambda sqrt(1 - abar) sg(dG/dz), for
            # the pairs that kept their pose (a dropped pair learns p(y_0), unguided)
            eps = output[:, :LATENT_CHANNELS]
            abar = alpha_bar(self.noise_scheduler.alphas_cumprod, step.timesteps, eps)
            term, _ = guidance_term(self.field(eps.device), batch["pose_features"].to(eps.device), step.noisy, eps.detach(), abar,
                                    kind=self.options["guidance_latents"], noise=step.noise)
            keep = batch["keep"].to(eps.device).view(-1, 1, 1, 1)
            step = dataclasses.replace(step, target=step.target - lam * keep * term.detach())
        loss = self.objective.loss(output, step, scheduler=self.noise_scheduler)
        loss = loss + vlb_loss(self.posterior, output, target, step.noisy, step.timesteps)
        weight = float(self.options["warp_loss"])
        if weight and warped is not None:
            loss = loss + weight * F.l1_loss(warped.float(), target.float())
        return loss

    # ---- sampling -----------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model: RePoseDMModel, pairs: list[dict[str, Any]], *, generator: torch.Generator | None = None,
               **settings: Any) -> torch.Tensor:
        """Target latents [B, 4, h, w] in the stored posteriors' space (unscaled) for pairs with
        the source's `vae` posterior and the target's `pose_latent` posterior and
        `higherhrnet.pose_features`. `settings`: SampleSettings fields (default: the paper
        recipe, DDIM 50, w_c = 2) and `pose_guidance` (the eq. 15 scale, 0 = off). The
        unconditional branch (`uncond` "null", the only mode) feeds the empty skeleton's
        latent and zero context, what training dropped to."""
        s, rest = self.split_settings(settings)
        pose_scale = float(rest.pop("pose_guidance", 1.0))
        if rest:
            raise TypeError(f"{self.name}.sample got unexpected arguments {sorted(rest)}")
        if s.uncond != "null":
            raise ValueError(f"{self.name}: uncond must be 'null' (empty skeleton + zero context), got {s.uncond!r}")
        device, dtype = model.device, model.dtype
        sources, targets = [p["source"] for p in pairs], [p["target"] for p in pairs]
        sf = self.scaling_factor
        source = sample_latent(stack(sources, MEAN).to(device), stack(sources, STD).to(device), sf, generator).to(dtype)
        pose = sample_latent(stack(targets, POSE_MEAN).to(device), stack(targets, POSE_STD).to(device), sf, generator).to(dtype)
        context, _ = model.context(source, pose, **self.pixel_inputs(model, lambda: source_pixels(sources, self.name), device, dtype))
        if s.guidance_scale > 1.0:
            bsz = len(pairs)
            null_mean = self.null(NULL_POSE_MEAN).to(device).expand(bsz, -1, -1, -1)
            null_std = self.null(NULL_POSE_STD).to(device).expand(bsz, -1, -1, -1)
            null_pose = sample_latent(null_mean, null_std, sf, generator).to(dtype)
            pose = torch.cat([null_pose, pose])
            context = tuple(torch.cat([torch.zeros_like(c), c]) for c in context)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.denoise_step(x, t, pose, context)

        hook = None
        if pose_scale:
            field = self.field(device)
            pose_features = stack(targets, POSE_FEATURES).to(device)

            def hook(step) -> torch.Tensor:
                # eq. 16 read as eps_u + w_c (eps_c - eps_u) + scale sqrt(1 - abar) dG/dx0,
                # at the x0 of the guided noise
                eps, rest_ = step.model_output[:, :LATENT_CHANNELS], step.model_output[:, LATENT_CHANNELS:]
                abar = alpha_bar(step.scheduler.alphas_cumprod, step.timestep, step.latents)
                term, _ = guidance_term(field, pose_features, step.latents, eps, abar)
                return torch.cat([eps + pose_scale * term.to(eps.dtype), rest_], dim=1)

        latents = denoise(predict, (len(pairs), LATENT_CHANNELS, *self.latent_shape[1:]), scheduler=self.objective.sampler(s.scheduler),
                          num_inference_steps=s.num_inference_steps, device=device, dtype=dtype, guidance_scale=s.guidance_scale,
                          guidance_rescale=s.guidance_rescale, generator=generator, step_hook=hook)
        return latents.float() / sf


def source_pixels(samples: list[dict[str, Any]], plugin: str) -> torch.Tensor:
    """The samples' stored images as [-1, 1] float32 [B, 3, H, W] (the VAE extractor's own
    preprocessing, so a re-encoding of an unwarped image is the stored latent)."""
    missing = [s.get("__key__") for s in samples if "image" not in s]
    if missing:
        raise ValueError(f"{plugin}: samples {missing} have no image (read them with pixels)")
    return VaeExtractor.preprocess([s["image"] for s in samples])
