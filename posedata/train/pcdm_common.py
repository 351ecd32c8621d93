"""What the PCDMs stage-2 (`pcdm-inpaint`) and stage-3 (`pcdm-refine`) plugins share on top
of the plugin layer (`posedata.train.unet`, `posedata.train.diffusion`): the SD-2.1-base
UNet with the DINOv2 MLP, and the dataset facts they read (DINOv2 token shape).

Facts from the official code (tencent-ailab/PCDMs), used by both stages:

- UNet: `stabilityai/stable-diffusion-2-1-base`, subfolder `unet` (run_stage2.sh,
  run_stage3.sh), loaded with `in_channels` overridden (9, resp. 8) and
  `low_cpu_mem_usage=False, ignore_mismatched_sizes=True` (stage2_train_inpaint_model.py,
  stage3_train_refined_model.py). With those flags diffusers drops the pretrained `conv_in`
  weight (its shape differs) and keeps PyTorch's default init for the whole widened kernel;
  the bias is loaded. `widen_conv_in(init="official")` does exactly that; "copy" (our
  default, as in InstructPix2Pix / SD inpainting fine-tunes) copies the pretrained kernel
  into the first 4 input channels and zeroes the new ones, so training starts from the
  pretrained UNet.
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
  is kept (we do not do that). The unconditional branch is all-zeros in embedding space
  (each stage's `sample_recipes["official"]`; `"paper"`: DDIM 50, w = 2, as the paper's
  appendix B states).
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

from posedata.train.config import Preset, TrainConfig
from posedata.train.plugin import output_shape
from posedata.train.unet import PluginModel, TokenProjection, UNetPlugin

UNCOND_MODES = ("null", "zeros")  # stored null embeddings through the model / zero embeddings


class PcdmUNetModel(PluginModel):
    """Base of the stage-2/3 models: the UNet (its config recorded as `unet_config`) and the
    DINOv2 MLP, named `unet` and `image_proj_model_p` as the official `SDModel` names them,
    so an official checkpoint's state dict has our keys."""

    def _build(self, unet_config: dict[str, Any], unet: UNet2DConditionModel | None, image_embed_dim: int, proj_hidden_dim: int) -> None:
        self.unet = self.make_unet(unet_config, unet)
        self.image_proj_model_p = TokenProjection(image_embed_dim, proj_hidden_dim, self.unet.config.cross_attention_dim)


def pcdm_presets(paper: TrainConfig, tiny_model: dict[str, Any] | None = None) -> dict[str, Preset]:
    """`paper`: the official run's settings; `tiny`: the tiny model learning visibly on CPU
    in a few dozen steps (batch 4, lr 1e-3, no warm-up; `tiny_model`: its size)."""
    tiny = paper.replace(batch_size=4, learning_rate=1e-3, warmup_steps=0, checkpoint_every=100)
    return {"paper": Preset(train=paper), "tiny": Preset(model=tiny_model or {}, train=tiny)}


class PcdmPlugin(UNetPlugin):
    """Shared set-up of the stage-2/3 plugins: SD-2.1-base, noise offset 0.1, and the
    DINOv2-G tokens through the official MLP (1536 -> 768 -> the UNet's width)."""

    base_model = "sd21"
    dinov2_need = "dinov2:giant"
    noise_offset = 0.1

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None, preset: str | None = None,
                 **options: Any):
        super().__init__(card, weights, model, preset, **options)
        self.token_shape = tuple(output_shape(card, self.dinov2_need, "tokens.npy", self.name))

    def model_kwargs(self) -> dict[str, Any]:
        dim = self.token_shape[-1]
        return {"image_embed_dim": dim, "proj_hidden_dim": max(1, dim // 2), **self.preset.model}  # 1536 -> 768 as official

    def check_model(self, model: PcdmUNetModel) -> PcdmUNetModel:
        if model.config.image_embed_dim != self.token_shape[-1]:
            raise ValueError(f"{self.name}: the model reads {model.config.image_embed_dim}-wide DINOv2 tokens; the dataset stores {self.token_shape[-1]}")
        return model
