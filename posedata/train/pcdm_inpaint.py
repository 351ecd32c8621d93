"""pcdm-inpaint: stage 2 of PCDMs (Shen et al., ICLR 2024), the inpainting model that paints
the target person next to the source one, [source | target] side by side.

Facts from the official code (tencent-ailab/PCDMs; see also `posedata.train.pcdm_common`):

- Model (stage2_train_inpaint_model.py `SDModel`, src/models/stage2_inpaint_unet_2d_condition.py):
  the SD-2.1-base UNet with `in_channels=9` (noisy latents 4, mask 1, masked-image latents
  4), `class_embed_type="projection"`, `projection_class_embeddings_input_dim=1024` (the
  target's CLIP `image_embeds` as class label, added to the time embedding);
  cross-attention context = [`ImageProjModel_p`(source DINOv2-G last_hidden_state) (257
  tokens) ; target CLIP image_embeds (1 token)] -> [258, 1024]; pose: the [source skeleton |
  target skeleton] image in [-1, 1] through diffusers' `ControlNetConditioningEmbedding(320,
  3, (16, 32, 96, 256))`, added to the UNet's hidden states right after `conv_in` (the
  official UNet copy adds `my_pose_cond` there; we add it with a forward hook on `conv_in`,
  so the UNet stays a stock `UNet2DConditionModel`).
- Data (src/dataset/stage2_dataset.py, stage2_config.py, run_stage2.sh): every image resized
  to 512 x 512 (bicubic) and pasted side by side, 512 x 1024; latents =
  `vae.encode([source | target]).latent_dist.sample() * scaling_factor`; masked image =
  [source | black], encoded and `.sample()`d the same way (a second, independent draw);
  mask = ones over the source half, zeros over the target half (1 = known), at latent
  resolution. Pose renders are OpenPose images (`_pose.jpg`) resized to 512 x 512.
- Dropout: the source image for DINOv2 and the target image for CLIP are each zeroed (after
  the CLIP processor) with p = 0.1, independently; the CLIP one is both the class label and
  the extra context token. This is exactly the stored null embedding of each encoder.
- Training (run_stage2.sh): lr 1e-4, batch 8 per GPU x 8 GPUs, noise offset 0.1, warm-up
  flag 5000 (ignored by the official "constant" schedule), fp16, seed 42; MSE on the noise
  over the whole [source | target] canvas.
- Sampling (stage2_batchtest_inpaint_model.py, src/pipelines/stage2_inpaint_pipeline.py):
  UniPC, 20 steps, guidance 2.0; the whole canvas starts from noise (the source half is
  regenerated too, never pasted back); the target CLIP embedding comes from the stage-1
  prior (test) or the CLIP encoder (train pairs); the unconditional branch zeroes the
  post-MLP context and the class label, and keeps pose, mask and masked latents.

Departures forced by precomputed features (posedata):

- Resolution: the stored resolution (e.g. 512 x 352 or 256 x 176, aspect kept) instead of a
  512 x 512 stretch, so the canvas is H x 2W.
- Latents are the per-image posteriors, concatenated along the latent width, not the
  posterior of the side-by-side image: the VAE's receptive field crosses the seam in the
  official encode. Same for the masked half: the stored latent of an all-black image
  alone (`null.black_mean/std`), sampled like `.sample()`.
- DINOv2 and CLIP see the stored resolution's image resized to 512 x 512 (the extractor
  follows the official preprocessing from there on).
- Skeletons are drawn from keypoints at the stored resolution with
  `posedata.render.draw_openpose` (no JPEG round trip, no resize of a render).
- Sampling's unconditional branch: `uncond="zeros"` (the official and default recipe) zeroes
  the post-MLP context and the class label; `uncond="null"` feeds the stored null
  embeddings through the MLP instead (what training dropped to). We return one sample per
  pair (no best-of-4 by SSIM against the ground truth).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from posedata.render import draw_openpose
from posedata.train.config import SampleSettings, TrainConfig
from posedata.train.diffusion import decode_to_unit, denoise, drop_conditions, sample_latent
from posedata.train.pcdm_common import UNCOND_MODES, PcdmPlugin, PcdmUNetModel, pcdm_presets
from posedata.train.plugin import output_shape, stack
from posedata.train.unet import (
    PAPER_POSE_CHANNELS,
    TINY_POSE_CHANNELS,
    add_class_projection,
    attach_conv_in_residual,
    conv_in_residual,
    model_dtype,
    pose_embedding,
    widen_conv_in,
)

IN_CHANNELS = 9  # noisy latents 4 + mask 1 + masked-image latents 4

TOKENS, EMBEDS, POSE = "dinov2.tokens", "clip.embeds", "openpose.keypoints"
HANDS = "openpose.hands"  # openpose:full: the official pose images are DWPose renders with hands
MEAN, STD = "vae.mean", "vae.std"


class PcdmInpaintModel(PcdmUNetModel):
    """UNet (9 input channels, projection class embedding) + DINOv2 MLP + pose embedding."""

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        image_embed_dim: int = 1536,
        proj_hidden_dim: int = 768,
        pose_channels: int = 3,
        pose_block_out_channels: tuple[int, ...] = PAPER_POSE_CHANNELS,
        unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        self._build(unet_config, unet, image_embed_dim, proj_hidden_dim)
        self.pose_proj = pose_embedding(self.unet.config, pose_block_out_channels, pose_channels)
        attach_conv_in_residual(self.unet)

    def context(self, source_tokens: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
        """[B, N, D_dino] + [B, D_clip] -> cross-attention context [B, N + 1, D_clip]."""
        return torch.cat([self.image_proj_model_p(source_tokens), target_embeds[:, None]], dim=1)

    def denoise(self, sample: torch.Tensor, timestep: Any, context: torch.Tensor, class_labels: torch.Tensor, pose_cond: torch.Tensor):
        """The UNet with `pose_cond` (pose_proj output) added after conv_in."""
        with conv_in_residual(self.unet, pose_cond):
            return self.unet(sample, timestep, encoder_hidden_states=context, class_labels=class_labels)

    def forward(self, sample: torch.Tensor, timestep: Any, source_tokens: torch.Tensor, target_embeds: torch.Tensor, pose: torch.Tensor):
        """sample [B, 9, h, 2w] = [noisy | mask | masked latents]; source_tokens [B, N, D_dino];
        target_embeds [B, D_clip]; pose [B, 3, H, 2W] in [-1, 1]. Returns the UNet output
        (`.sample`: the noise prediction [B, 4, h, 2w])."""
        return self.denoise(sample, timestep, self.context(source_tokens, target_embeds), target_embeds, self.pose_proj(pose))


class PcdmInpaintPlugin(PcdmPlugin):
    """PCDMs stage 2: paints the target beside the source on a [source | target] canvas."""

    name = "pcdm-inpaint"
    needs = ("vae:sd21", "dinov2:giant", "clip", ("openpose:full", "openpose", "keypoints_annotated"))  # hands when stored
    needs_pixels = False
    reads = {"openpose": ("keypoints", "hands")}  # the skeleton is drawn from them, not read
    presets = pcdm_presets(TrainConfig(learning_rate=1e-4, weight_decay=0.01, warmup_steps=5000, batch_size=8, max_grad_norm=1.0),
                           tiny_model={"pose_block_out_channels": TINY_POSE_CHANNELS})
    sample_recipes = {
        "official": SampleSettings(num_inference_steps=20, guidance_scale=2.0, scheduler="unipc", uncond="zeros"),
        "paper": SampleSettings(num_inference_steps=50, guidance_scale=2.0, scheduler="ddim", uncond="zeros"),
    }
    drop_prob = 0.1  # source DINOv2 tokens and target CLIP embedding, each independently
    model_cls = PcdmInpaintModel

    # null outputs, named by the need so a dataset with several presets resolves them
    BLACK_MEAN, BLACK_STD = "vae:sd21.black_mean", "vae:sd21.black_std"
    NULL_TOKENS, NULL_EMBEDS = "dinov2:giant.tokens", "clip.embeds"

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None, preset: str | None = None,
                 **options: Any):
        super().__init__(card, weights, model, preset, **options)
        self.embed_dim = output_shape(card, "clip", "embeds.npy", self.name)[0]

    def null_embeddings(self) -> tuple[str, ...]:
        return (self.BLACK_MEAN, self.BLACK_STD, self.NULL_TOKENS, self.NULL_EMBEDS)

    # ---- model --------------------------------------------------------------------------

    def unet_overrides(self) -> dict[str, Any]:
        # the CLIP token joins the DINOv2 tokens in one context: its width is the UNet's
        return {"in_channels": IN_CHANNELS, "class_embed_type": "projection", "projection_class_embeddings_input_dim": self.embed_dim,
                "cross_attention_dim": self.embed_dim}

    def unet_changes(self, unet: UNet2DConditionModel) -> None:
        if unet.config.cross_attention_dim != self.embed_dim:
            raise ValueError(f"{self.name}: the UNet's cross_attention_dim is {unet.config.cross_attention_dim}, the dataset's CLIP embeddings are {self.embed_dim} wide")
        widen_conv_in(unet, IN_CHANNELS, self.conv_in_init)
        add_class_projection(unet, self.embed_dim)

    def check_model(self, model: PcdmInpaintModel) -> PcdmInpaintModel:
        unet = model.unet.config
        if unet.in_channels != IN_CHANNELS or unet.projection_class_embeddings_input_dim != self.embed_dim:
            raise ValueError(f"{self.name}: expected a UNet with {IN_CHANNELS} input channels and a {self.embed_dim}-wide class projection")
        return super().check_model(model)

    # ---- data ---------------------------------------------------------------------------

    def pose_image(self, source: dict[str, Any], target: dict[str, Any]) -> torch.Tensor:
        """[source skeleton | target skeleton] rendered at the stored resolution -> float32
        [3, H, 2W] in [-1, 1] (ToTensor + Normalize(0.5, 0.5), as the official loader)."""
        canvas = np.concatenate([draw_openpose(s[POSE], self.height, self.width, hands=s.get(HANDS)) for s in (source, target)], axis=1)
        return torch.from_numpy(canvas).permute(2, 0, 1).float() / 127.5 - 1.0

    def mask(self, batch: int) -> torch.Tensor:
        _, h, w = self.latent_shape
        mask = torch.zeros(batch, 1, h, 2 * w)
        mask[..., :w] = 1.0  # 1 = the known source half
        return mask

    def black(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored posterior of an all-black image, for the masked target half."""
        return self.null(self.BLACK_MEAN).expand(batch, *self.latent_shape), self.null(self.BLACK_STD).expand(batch, *self.latent_shape)

    def collate(self, pairs: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """-> latent_mean/std [B, 4, h, 2w] ([source | target] posteriors), masked_mean/std
        (the same with the stored black-image posterior on the right), mask [B, 1, h, 2w],
        pose [B, 3, H, 2W], source_tokens [B, N, D_dino], target_embeds [B, D_clip]; the two
        image conditions dropped to their null embeddings with p = drop_prob each."""
        src = [p["source"] for p in pairs]
        tgt = [p["target"] for p in pairs]
        bsz = len(pairs)
        black_mean, black_std = self.black(bsz)
        source_mean, source_std = stack(src, MEAN), stack(src, STD)
        batch = {
            "latent_mean": torch.cat([source_mean, stack(tgt, MEAN)], dim=-1),
            "latent_std": torch.cat([source_std, stack(tgt, STD)], dim=-1),
            "masked_mean": torch.cat([source_mean, black_mean], dim=-1),
            "masked_std": torch.cat([source_std, black_std], dim=-1),
            "mask": self.mask(bsz),
            "pose": torch.stack([self.pose_image(s, t) for s, t in zip(src, tgt)]),
            "source_tokens": stack(src, TOKENS),
            "target_embeds": stack(tgt, EMBEDS),
        }
        drop_conditions(batch, {"source_tokens": self.null(self.NULL_TOKENS), "target_embeds": self.null(self.NULL_EMBEDS)},
                        self.drop_prob, generator)
        return batch

    # ---- training -----------------------------------------------------------------------

    def loss(self, model: PcdmInpaintModel, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        latents = sample_latent(batch["latent_mean"], batch["latent_std"], self.scaling_factor, generator)
        masked = sample_latent(batch["masked_mean"], batch["masked_std"], self.scaling_factor, generator)
        step = self.objective.noisy(latents, generator, self.noise_scheduler)
        dtype = model_dtype(model)
        x = torch.cat([step.noisy, batch["mask"].to(step.noisy.dtype), masked], dim=1).to(dtype)
        pred = model(x, step.timesteps, batch["source_tokens"].to(dtype), batch["target_embeds"].to(dtype), batch["pose"].to(dtype)).sample
        return self.objective.loss(pred, step)

    # ---- sampling -----------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        model: PcdmInpaintModel,
        pairs: list[dict[str, Any]],
        *,
        generator: torch.Generator | None = None,
        target_embeds: torch.Tensor | None = None,
        vae: Any = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Paint the target of each pair. Pairs need the source's `vae.mean/std`,
        `dinov2.tokens` and keypoints and the target's keypoints; `target_embeds` [B, D]
        (e.g. pcdm-prior's sample) or else the target's stored `clip.embeds`. `settings`:
        SampleSettings fields (default: the official recipe).

        Returns the target half's latents [B, 4, h, w] in the stored latents' space (unscaled:
        `vae.decode(out)` decodes them), or, with `vae`, the decoded target half [B, 3, H, W]
        in [0, 1] (the whole canvas is decoded and cropped, as the official test does)."""
        s, rest = self.split_settings(settings)
        if rest:
            raise TypeError(f"{self.name}.sample got unexpected arguments {sorted(rest)}")
        if s.uncond not in UNCOND_MODES:
            raise ValueError(f"uncond must be one of {UNCOND_MODES}, got {s.uncond!r}")
        device, dtype = model.device, model.dtype
        src = [p["source"] for p in pairs]
        tgt = [p["target"] for p in pairs]
        bsz = len(pairs)
        embeds = (target_embeds.float() if target_embeds is not None else stack(tgt, EMBEDS)).to(device, dtype)
        tokens = stack(src, TOKENS).to(device, dtype)
        black_mean, black_std = self.black(bsz)
        masked_mean = torch.cat([stack(src, MEAN), black_mean], dim=-1)
        masked_std = torch.cat([stack(src, STD), black_std], dim=-1)
        masked = sample_latent(masked_mean.to(device), masked_std.to(device), self.scaling_factor, generator).to(dtype)
        mask = self.mask(bsz).to(device, dtype)
        pose_cond = model.pose_proj(torch.stack([self.pose_image(s_, t_) for s_, t_ in zip(src, tgt)]).to(device, dtype))
        context, labels = model.context(tokens, embeds), embeds
        if s.guidance_scale > 1.0:
            if s.uncond == "zeros":
                null_context, null_labels = torch.zeros_like(context), torch.zeros_like(labels)
            else:
                null_embeds = self.null(self.NULL_EMBEDS).reshape(1, -1).expand(bsz, -1).to(device, dtype)
                null_tokens = self.null(self.NULL_TOKENS).expand(bsz, *tokens.shape[1:]).to(device, dtype)
                null_context, null_labels = model.context(null_tokens, null_embeds), null_embeds
            context, labels = torch.cat([null_context, context]), torch.cat([null_labels, labels])
            mask, masked, pose_cond = (torch.cat([x, x]) for x in (mask, masked, pose_cond))

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.denoise(torch.cat([x, mask, masked], dim=1), t, context, labels, pose_cond).sample

        _, h, w = self.latent_shape
        latents = denoise(predict, (bsz, 4, h, 2 * w), scheduler=self.objective.sampler(s.scheduler), num_inference_steps=s.num_inference_steps,
                          device=device, dtype=dtype, guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale, generator=generator)
        if vae is not None:
            return decode_to_unit(vae, latents)[..., self.width:]
        return latents[..., w:].float() / self.scaling_factor
