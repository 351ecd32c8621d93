"""pcdm-refine: stage 3 of PCDMs (Shen et al., ICLR 2024), which refines the coarse target
image of stage 2 into the final one.

Facts from the official code (tencent-ailab/PCDMs; see also `posedata.train.pcdm_common`):

- Model (stage3_train_refined_model.py `SDModel`): a stock SD-2.1-base
  `UNet2DConditionModel` with `in_channels=8` ([noisy target latents | coarse image
  latents]), no class embedding; cross-attention context = `ImageProjModel_p`(source
  DINOv2-G last_hidden_state) [257, 1024].
- The coarse image at TRAINING time is NOT the target: src/dataset/stage3_dataset.py reads
  `<gen_t_img_path>/<source>_to_<target>.png`, the stage-2 model's output for that pair
  (stage3_config.py's default path is `./save_data/stage2/guidancescale2_seed42_numsteps20/`,
  i.e. stage 2 run over the training pairs with guidance 2, seed 42, 20 steps), encoded
  with `.latent_dist.sample() * scaling_factor`.
- Dropout: despite the comment "dropout s_img for dinov2", the dataset zeroes the coarse
  image's normalised pixels (`trans_gen_t_img`) with p = 0.1, i.e. feeds the VAE latent of
  a mid-grey image; the source DINOv2 condition is never dropped.
- Training (run_stage3.sh): lr 1e-5, batch 16 per GPU x 8 GPUs, noise offset 0.1, warm-up
  flag 5000 (ignored by "constant"), fp16, 512 x 512 images; MSE on the noise.
- Sampling (stage3_batchtest_refined_model.py, src/pipelines/stage3_refined_pipeline.py):
  UniPC, 20 steps, guidance 2.0 and `guidance_rescale=args.guidance_scale` (2.0, passed
  as the rescale factor too); the unconditional branch zeroes the post-MLP context and the
  coarse latents. The coarse image is stage 2's saved PNG, re-encoded with `.sample()`.

Departures forced by precomputed features (posedata):

- Coarse image: the dataset holds no stage-2 outputs (they are per pair, and depend on a
  trained stage 2). A pair may carry them as `pair["coarse"] = {"vae.mean", "vae.std"}`
  (the VAE posterior of the stage-2 output for that pair); without it the TARGET's own
  posterior stands in (an independent draw), which makes the task much easier than the
  official one (the model can learn to copy its input). Set `coarse_from_target = False`
  to refuse pairs without a coarse image.
- Dropped coarse image: the zero latent (the official sampler's unconditional input; the
  latent of the official mid-grey image is not stored, the VAE feature's null is a black
  image).
- Resolution: the stored resolution instead of 512 x 512; DINOv2 as in stage 2.
- Sampling's unconditional branch: `uncond="zeros"` (the official and default recipe, and
  the paper's eq. 8) zeroes the context and the coarse latents; `uncond="null"` drops only
  what training dropped (the coarse latents -> zeros, context kept). The official recipe
  also sets `guidance_rescale=2.0` (the test script passes its guidance scale as the
  rescale factor). At sampling, `coarse=` takes latents directly (e.g. pcdm-inpaint's
  output), skipping the official decode -> 8-bit PNG -> re-encode round trip.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from posedata.train.config import SampleSettings, TrainConfig
from posedata.train.diffusion import decode_to_unit, denoise, drop_conditions, sample_latent
from posedata.train.pcdm_common import UNCOND_MODES, PcdmPlugin, PcdmUNetModel, pcdm_presets
from posedata.train.plugin import as_tensor, stack
from posedata.train.unet import model_dtype, widen_conv_in

IN_CHANNELS = 8  # noisy target latents 4 + coarse latents 4
TOKENS, MEAN, STD = "dinov2.tokens", "vae.mean", "vae.std"
COARSE = "coarse"


class PcdmRefineModel(PcdmUNetModel):
    """UNet (8 input channels) + DINOv2 MLP."""

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        image_embed_dim: int = 1536,
        proj_hidden_dim: int = 768,
        unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        self._build(unet_config, unet, image_embed_dim, proj_hidden_dim)

    def forward(self, sample: torch.Tensor, timestep: Any, source_tokens: torch.Tensor):
        """sample [B, 8, h, w] = [noisy target | coarse latents]; source_tokens [B, N, D].
        Returns the UNet output (`.sample`: the noise prediction [B, 4, h, w])."""
        return self.unet(sample, timestep, encoder_hidden_states=self.image_proj_model_p(source_tokens))


class PcdmRefinePlugin(PcdmPlugin):
    """PCDMs stage 3: refines a coarse target image, conditioned on the source's DINOv2 tokens."""

    name = "pcdm-refine"
    needs = ("vae:sd21", "dinov2:giant")
    needs_pixels = False
    presets = pcdm_presets(TrainConfig(learning_rate=1e-5, weight_decay=0.01, warmup_steps=5000, batch_size=16, max_grad_norm=1.0))
    sample_recipes = {
        "official": SampleSettings(num_inference_steps=20, guidance_scale=2.0, guidance_rescale=2.0, scheduler="unipc", uncond="zeros"),
        "paper": SampleSettings(num_inference_steps=50, guidance_scale=2.0, scheduler="ddim", uncond="zeros"),
    }
    drop_prob = 0.1  # the coarse image (official); the DINOv2 source is never dropped
    coarse_from_target = True
    model_cls = PcdmRefineModel

    # ---- model --------------------------------------------------------------------------

    def unet_overrides(self) -> dict[str, Any]:
        return {"in_channels": IN_CHANNELS}

    def unet_changes(self, unet: UNet2DConditionModel) -> None:
        widen_conv_in(unet, IN_CHANNELS, self.conv_in_init)

    def check_model(self, model: PcdmRefineModel) -> PcdmRefineModel:
        if model.unet.config.in_channels != IN_CHANNELS:
            raise ValueError(f"{self.name}: expected a UNet with {IN_CHANNELS} input channels, got {model.unet.config.in_channels}")
        return super().check_model(model)

    # ---- data ---------------------------------------------------------------------------

    def _coarse(self, pair: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = pair.get(COARSE)
        if coarse is None:
            if not self.coarse_from_target:
                raise ValueError(f"{self.name}: pair {pair['source'].get('__key__')} -> {pair['target'].get('__key__')} has no coarse image (pair['coarse'])")
            coarse = pair["target"]
        return as_tensor(coarse[MEAN]), as_tensor(coarse[STD])

    def collate(self, pairs: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """-> target_mean/std, coarse_mean/std [B, 4, h, w], source_tokens [B, N, D]; the coarse
        image dropped (mean = std = 0, i.e. the zero latent) with p = drop_prob."""
        coarse = [self._coarse(p) for p in pairs]
        batch = {
            "target_mean": stack([p["target"] for p in pairs], MEAN),
            "target_std": stack([p["target"] for p in pairs], STD),
            "coarse_mean": torch.stack([m for m, _ in coarse]),
            "coarse_std": torch.stack([s for _, s in coarse]),
            "source_tokens": stack([p["source"] for p in pairs], TOKENS),
        }
        drop_conditions(batch, {("coarse_mean", "coarse_std"): 0.0}, self.drop_prob, generator)
        return batch

    # ---- training -----------------------------------------------------------------------

    def loss(self, model: PcdmRefineModel, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        latents = sample_latent(batch["target_mean"], batch["target_std"], self.scaling_factor, generator)
        coarse = sample_latent(batch["coarse_mean"], batch["coarse_std"], self.scaling_factor, generator)
        step = self.objective.noisy(latents, generator, self.noise_scheduler)
        dtype = model_dtype(model)
        pred = model(torch.cat([step.noisy, coarse], dim=1).to(dtype), step.timesteps, batch["source_tokens"].to(dtype)).sample
        return self.objective.loss(pred, step)

    # ---- sampling -----------------------------------------------------------------------

    @staticmethod
    def target_as_coarse(pairs: list[dict[str, Any]], generator: torch.Generator | None) -> torch.Tensor:
        """A draw from each target's stored posterior (unscaled latents): the coarse image
        when refine runs alone, as its training sees it."""
        mean, std = stack([p["target"] for p in pairs], MEAN), stack([p["target"] for p in pairs], STD)
        return mean + std * torch.randn(mean.shape, generator=generator)

    def sample_outputs(self, model: PcdmRefineModel, pairs: list[dict[str, Any]], *, generator: torch.Generator | None,
                       settings: SampleSettings, vae: Any = None, **options: Any) -> list[dict[str, Any]]:
        """`posedata sample pcdm-refine` alone refines the targets' own latents (pairs carry
        no stage-2 output)."""
        if "coarse" not in options and any(COARSE not in p for p in pairs):
            options["coarse"] = self.target_as_coarse(pairs, generator)
        return super().sample_outputs(model, pairs, generator=generator, settings=settings, vae=vae, **options)

    @torch.no_grad()
    def sample(
        self,
        model: PcdmRefineModel,
        pairs: list[dict[str, Any]],
        *,
        coarse: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        vae: Any = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Refine coarse targets. Pairs need the source's `dinov2.tokens`; the coarse image is
        `coarse` [B, 4, h, w] (unscaled latents, e.g. pcdm-inpaint's sample output) or each
        pair's `pair["coarse"]` posterior (sampled). `settings`: SampleSettings fields
        (default: the official recipe).

        Returns latents [B, 4, h, w] in the stored latents' space (unscaled), or with `vae`
        the decoded images [B, 3, H, W] in [0, 1]."""
        s, rest = self.split_settings(settings)
        if rest:
            raise TypeError(f"{self.name}.sample got unexpected arguments {sorted(rest)}")
        if s.uncond not in UNCOND_MODES:
            raise ValueError(f"uncond must be one of {UNCOND_MODES}, got {s.uncond!r}")
        device, dtype = model.device, model.dtype
        bsz = len(pairs)
        if coarse is not None:
            coarse_latents = coarse.float().to(device) * self.scaling_factor
        else:
            if any(COARSE not in p for p in pairs):
                raise ValueError(f"{self.name}.sample needs the coarse image: coarse= latents or pair['coarse'] posteriors")
            parts = [self._coarse(p) for p in pairs]
            mean, std = torch.stack([m for m, _ in parts]).to(device), torch.stack([s_ for _, s_ in parts]).to(device)
            coarse_latents = sample_latent(mean, std, self.scaling_factor, generator)
        coarse_latents = coarse_latents.to(dtype)
        context = model.image_proj_model_p(stack([p["source"] for p in pairs], TOKENS).to(device, dtype))
        if s.guidance_scale > 1.0:
            null_context = torch.zeros_like(context) if s.uncond == "zeros" else context
            context = torch.cat([null_context, context])
            coarse_latents = torch.cat([torch.zeros_like(coarse_latents), coarse_latents])

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.unet(torch.cat([x, coarse_latents], dim=1), t, encoder_hidden_states=context).sample

        latents = denoise(predict, (bsz, 4, *self.latent_shape[1:]), scheduler=self.objective.sampler(s.scheduler),
                          num_inference_steps=s.num_inference_steps, device=device, dtype=dtype, guidance_scale=s.guidance_scale,
                          guidance_rescale=s.guidance_rescale, generator=generator)
        if vae is not None:
            return decode_to_unit(vae, latents)
        return latents.float() / self.scaling_factor
