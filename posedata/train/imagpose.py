"""imagpose: IMAGPose (Shen & Tang, NeurIPS 2024) trained from stored features, three stages
as the official code (muzishen/IMAGPose) trains it. Row-by-row readings and departures:
docs/imagpose-fidelity.md. The networks: `posedata.train.imagpose_model`.

- Data: groups of one person from one shard (`posedata.reader.GroupStream`): four draws with
  replacement, never all the same image. Per group, four flags redrawn until there is at
  least one source and one target (official `pose_dataset.py`): 1-3 tiles masked.
- Inputs on the padded 2 x 2 canvas: the tiles' `vae:sd15` posteriors (a `.sample()` each),
  the mask (1 = known source tile), the masked canvas (source tiles' latents, the stored
  latent of a black image in target tiles), the joint pose (every tile's skeleton drawn from
  its keypoints, with hands when the dataset has `openpose:full`, in [0, 1]); the FLC
  context from ONE reference: a random source tile's DINOv2 `last_hidden_state` and its
  VAE latent.
- Stages (`--stage`): 1 = UNet + pose guider + tokenizer (no CVA), 2 = CVA alone (added to
  the stage-1 model given with `--init`), 3 = everything. Official lr 5e-5, 5e-5, 1e-6;
  AdamW wd 1e-2, constant, clip 1.0, no EMA.
- Objective (`--recipe official`, default): v-prediction, zero-terminal-SNR betas,
  trailing spacing, min-SNR gamma 5 weighted min(SNR + 1, 5) / (SNR + 1) as the official
  `train_stage*.py` computes it, noise offset 0.05, scaled-linear 0.00085-0.012, MSE over
  the whole canvas (padding excluded). `--recipe paper`: epsilon, linear betas, plain MSE,
  DINOv2-G preferred. The model records its recipe, so sampling uses the same schedule.
- Condition dropout: stage 1, p = 0.1 for the whole batch, the DINOv2 tokens -> the stored
  null embedding (the official drop zeroes the encoder's pixels, once per step); stages 2-3,
  per sample 5 % DINOv2, 5 % VAE latent (zeros), 5 % both.
- Sampling (`posedata sample imagpose`, `posedata.train.imagpose_sample`): DDIM 30 steps,
  guidance 2.0, the unconditional branch zeroes the DINOv2 and VAE tokens (official), pose,
  mask and masked latents kept; modes single (T2, official test.py), t1, multi-source (T3),
  multi-target (IMAGPose*).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import MotionAdapter, UNet2DConditionModel

from posedata.reader import find_feature
from posedata.render import draw_openpose
from posedata.train.config import PluginOption, Preset, SampleSettings, TrainConfig
from posedata.train.diffusion import Objective, denoise, sample_latent
from posedata.train.imagpose_model import (
    CVA_HEADS,
    IN_CHANNELS,
    MOTION_ADAPTER,
    TILES,
    TOKENIZER_KERNEL,
    ImagPoseModel,
    from_canvas,
    motion_module_file,
    pad_multiple,
    pad_tiles,
    padded,
    to_canvas,
)
from posedata.train.plugin import as_tensor, output_shape
from posedata.train.unet import (
    PAPER_POSE_CHANNELS,
    TINY_POSE_CHANNELS,
    UNetPlugin,
    load_plugin_model,
    model_dtype,
    widen_conv_in,
)

STAGES = (1, 2, 3)
# what each stage trains (official train_stage1.py / train_stage2.py / stage 3)
STAGE_PARTS: dict[int, tuple[str, ...]] = {1: ("unet", "pose_guider", "tokenizer", "image_proj"), 2: ("cva",),
                                          3: ("unet", "pose_guider", "tokenizer", "image_proj", "cva")}
RECIPES = ("official", "paper")
SAMPLE_MODES = ("single", "t1", "multi-source", "multi-target")
OFFICIAL_SCHEDULER = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
PAPER_SCHEDULER = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon"}
STAGE1_DROP = 0.1  # whole batch, DINOv2 (train_stage1.py)
STAGE23_DROP = 0.05  # per sample: DINOv2, VAE latent, both (train_stage2.py)

MEAN, STD, TOKENS = "vae.mean", "vae.std", "dinov2.tokens"
KEYPOINTS, HANDS = "openpose.keypoints", "openpose.hands"
POSE_NEED = ("openpose:full", "openpose", "keypoints_annotated")

# The tiny UNet has SD-1.5's four levels (so the 1/8 canvas split is exercised), no attention
# at the full-resolution level and one head (CPU seconds at 512 x 352).
TINY_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 32,
             "attention_head_dim": 1}

# official: batch 2 / 4 / 1 per GPU x 8, 50k / 200k / 50k steps, lr 5e-5 / 5e-5 / 1e-6
PAPER_TRAIN = TrainConfig(learning_rate=5e-5, weight_decay=1e-2, warmup_steps=0, lr_schedule="constant", max_grad_norm=1.0, batch_size=2,
                          max_steps=50_000)
STAGE_TRAIN: dict[int, dict[str, Any]] = {1: {}, 2: {"batch_size": 4, "max_steps": 200_000}, 3: {"learning_rate": 1e-6, "batch_size": 1}}
TINY_TRAIN = PAPER_TRAIN.replace(learning_rate=1e-3, batch_size=4, max_steps=40, checkpoint_every=20, lr_schedule="constant")
TINY_STAGE_TRAIN: dict[int, dict[str, Any]] = {1: {}, 2: {}, 3: {"learning_rate": 2e-5}}  # stage 3 at 1/50 of stage 1, as official


def run_model_path(run: str) -> str:
    """A run directory -> its newest checkpoint (`model/` inside); a model folder as it is."""
    from posedata.train.checkpoint import checkpoints

    path = Path(run)
    found = checkpoints(path) if path.is_dir() else []
    if found:
        return str(found[-1][1])
    if (path / "config.json").is_file() or (path / "model" / "config.json").is_file():
        return str(path)
    raise FileNotFoundError(f"{run}: no checkpoint of a run and no saved model here (--init names the previous stage's run)")


class ImagPosePlugin(UNetPlugin):
    name = "imagpose"
    base_model = "sd15"
    model_cls = ImagPoseModel
    conv_in_init = "official"  # random 9-channel kernel, SD bias (ignore_mismatched_sizes)
    stream = "groups"  # the reader's GroupStream: items {"group", "samples": [4 samples]}
    sampler = "posedata.train.imagpose_sample:sample_imagpose"  # canvases, not pairs
    needs: ClassVar[tuple] = ("vae:sd15", ("dinov2:base", "dinov2:giant"), POSE_NEED)
    reads: ClassVar[dict] = {"openpose": ("keypoints", "hands")}  # the skeleton is drawn from them, not read
    presets = {
        "paper": Preset(model={"pose_block_out_channels": PAPER_POSE_CHANNELS}, train=PAPER_TRAIN),
        # tiny: a 4 x 4 tokenizer, so that tiles from 32 px up still give VAE tokens
        "tiny": Preset(model={"pose_block_out_channels": TINY_POSE_CHANNELS, "cva_heads": 1, "tokenizer_kernel": 4}, train=TINY_TRAIN),
    }
    sample_recipes = {
        "official": SampleSettings(num_inference_steps=30, guidance_scale=2.0, scheduler="ddim", uncond="zeros"),
        "paper": SampleSettings(num_inference_steps=20, guidance_scale=2.0, scheduler="ddim", uncond="zeros"),
    }
    train_options = (
        PluginOption("stage", "training stage: 1 = UNet + pose guider + tokenizer, 2 = CVA only, 3 = everything", default=1, type=int),
        PluginOption("init", "the previous stage's run (or a saved model) to start from; stages 2 and 3 need it", default=None),
        PluginOption("recipe", "objective: official (v-prediction, zero-terminal SNR, min-SNR 5, offset 0.05) or paper (epsilon, linear); "
                     "default official, or what the model given with --init / --model was trained with", default=None, choices=RECIPES),
        PluginOption("cva_model", "stage 2 with --weights pretrained: the motion modules the CVA starts from: a diffusers MotionAdapter "
                     f"(hub id or dir, default {MOTION_ADAPTER}) or an original-format file (AnimateAnyone's motion_module.pth, as official)",
                     default=None),
    )
    sample_options = (PluginOption("mode", "single (T2) | t1 | multi-source (T3) | multi-target (IMAGPose*)", default="single",
                                   choices=SAMPLE_MODES),)

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None, preset: str | None = None,
                 **options: Any):
        super().__init__(card, weights, model, preset, **options)
        self.stage = int(self.options["stage"])
        if self.stage not in STAGES:
            raise ValueError(f"{self.name}: --stage must be one of {STAGES}, got {self.stage}")
        if self.recipe not in RECIPES:
            raise ValueError(f"{self.name}: --recipe must be one of {RECIPES}, got {self.recipe!r}")
        dino = ("dinov2:giant", "dinov2:base") if self.recipe == "paper" else ("dinov2:base", "dinov2:giant")
        self.dinov2_need = next((n for n in dino if find_feature(card, n)), dino[0])
        self.needs = ("vae:sd15", dino, POSE_NEED)  # the recipe's preferred image encoder first
        self.token_shape = tuple(output_shape(card, self.dinov2_need, "tokens.npy", self.name))
        self.unet_config = self.base.unet(self.weights, **self.unet_overrides())
        _, h, w = self.latent_shape
        kernel = self.preset.model.get("tokenizer_kernel", TOKENIZER_KERNEL)
        if min(h, w) < kernel:
            raise ValueError(f"{self.name}: a {self.height}x{self.width} tile has {h}x{w} latents, fewer than the FLC tokenizer's {kernel}x{kernel} "
                             f"kernel (no VAE tokens); build the dataset at a larger --res (the paper: 256x176 or 512x352)")
        self.factor = self.height // h
        multiple = pad_multiple(self.unet_config)
        self.tile_latent = (padded(h, multiple), padded(w, multiple))  # padded tile, latent pixels
        self.tile_pixels = (self.tile_latent[0] * self.factor, self.tile_latent[1] * self.factor)

    # ---- settings -------------------------------------------------------------------------

    @property
    def recipe(self) -> str:
        """The objective: --recipe, else what a saved model records (set by build_model), else official."""
        return self.options.get("recipe") or getattr(self, "_model_recipe", None) or "official"

    @property
    def defaults(self) -> TrainConfig:
        stages = TINY_STAGE_TRAIN if self.preset_name == "tiny" else STAGE_TRAIN
        return self.preset.train.replace(**stages[self.stage])

    def make_objective(self) -> Objective:
        if self.recipe == "paper":
            return Objective({**self.base.scheduler_config, **PAPER_SCHEDULER})
        return Objective({**self.base.scheduler_config, **OFFICIAL_SCHEDULER}, noise_offset=0.05, min_snr_gamma=5.0, min_snr_variant="plus_one")

    def null_embeddings(self) -> tuple[str, ...]:
        return ("vae:sd15.black_mean", "vae:sd15.black_std", f"{self.dinov2_need}.tokens")

    # ---- model ----------------------------------------------------------------------------

    def unet_overrides(self) -> dict[str, Any]:
        return {"in_channels": IN_CHANNELS, **(TINY_UNET if self.weights == "tiny" else {})}

    def unet_changes(self, unet: UNet2DConditionModel) -> None:
        widen_conv_in(unet, IN_CHANNELS, self.conv_in_init)

    def model_kwargs(self) -> dict[str, Any]:
        return {**super().model_kwargs(), "image_embed_dim": self.token_shape[-1], "objective": self.recipe}

    def check_model(self, model: ImagPoseModel) -> ImagPoseModel:
        if model.unet.config.in_channels != IN_CHANNELS:
            raise ValueError(f"{self.name}: expected a UNet with {IN_CHANNELS} input channels, got {model.unet.config.in_channels}")
        if model.config.image_embed_dim != self.token_shape[-1]:
            raise ValueError(f"{self.name}: the model takes {model.config.image_embed_dim}-wide image tokens, the dataset's {self.dinov2_need} are {self.token_shape[-1]}")
        if self.options.get("recipe") and model.config.objective != self.options["recipe"]:
            raise ValueError(f"{self.name}: the model was trained with --recipe {model.config.objective}, this run asks for {self.options['recipe']}")
        if model.config.objective != self.recipe:  # a saved model sets the schedule it was trained with
            self._model_recipe = model.config.objective
            self.objective = self.make_objective()
            self.noise_scheduler = self.objective.train_scheduler()
        if pad_multiple(model.unet.config) != pad_multiple(self.unet_config):
            raise ValueError(f"{self.name}: the model's UNet has {len(model.unet.config.block_out_channels)} levels, expected {len(self.unet_config['block_out_channels'])}")
        return model

    def motion_adapter(self, unet_config: dict[str, Any]) -> MotionAdapter | None:
        """The CVA a stage-2 model starts from: AnimateDiff's pretrained motion modules (the
        official code loads AnimateAnyone's motion_module.pth), or fresh zero-output ones."""
        if self.weights != "pretrained":
            return None
        source = self.options.get("cva_model") or MOTION_ADAPTER
        if os.path.isfile(source):  # an original-format checkpoint (AnimateAnyone's motion_module.pth)
            return motion_module_file(source, unet_config, self.preset.model.get("cva_heads", CVA_HEADS))
        return MotionAdapter.from_pretrained(source)

    def build_model(self) -> ImagPoseModel:
        init = self.options.get("init")
        if init and not self.model_id:  # an explicit --model (e.g. the checkpoint being sampled) wins
            model = self.check_model(load_plugin_model(ImagPoseModel, run_model_path(init), self.from_unet))
        elif self.stage > 1 and not self.model_id:
            raise ValueError(f"{self.name}: stage {self.stage} starts from the previous stage's run: pass --init RUN")
        else:
            model = super().build_model()
        if self.stage >= 2 and model.cva is None:
            adapter = self.motion_adapter(dict(model.unet.config))
            if adapter is not None and dict(adapter.config)["block_out_channels"] != list(model.unet.config.block_out_channels):
                raise ValueError(f"{self.name}: the motion adapter's blocks {adapter.config.block_out_channels} do not fit the UNet's")
            model = model.with_cva(adapter)
        if self.stage == 1 and init and not self.model_id and model.cva is not None:
            raise ValueError(f"{self.name}: stage 1 trains a model without CVA; {init} already has CVA modules (use --stage 3)")
        model.set_trainable(tuple(p for p in STAGE_PARTS[self.stage] if p in model.parts()))
        return model

    # ---- the canvas -----------------------------------------------------------------------

    def skeleton(self, sample: dict[str, Any]) -> np.ndarray:
        """A tile's joint-pose render at the stored resolution (hands when stored)."""
        return draw_openpose(sample[KEYPOINTS], self.height, self.width, hands=sample.get(HANDS))

    def canvas(self, tiles: list[list[dict[str, Any]]], flags: torch.Tensor, reference: list[int], latents: bool = True) -> dict[str, torch.Tensor]:
        """Batch of canvases. `tiles`: per canvas 4 samples (TL, TR, BL, BR); `flags` [B, 4]
        (1 = known source); `reference`: per canvas the tile whose DINOv2 tokens and latent
        form the FLC context. `latents`: include every tile's posterior (training)."""
        bsz = len(tiles)
        hp, wp = self.tile_latent
        mean = torch.stack([torch.stack([as_tensor(s[MEAN]) for s in row]) for row in tiles])  # [B, 4, 4, h, w]
        std = torch.stack([torch.stack([as_tensor(s[STD]) for s in row]) for row in tiles])
        known = flags.float()[:, :, None, None, None]
        black_mean = self.null("vae:sd15.black_mean").expand_as(mean)
        black_std = self.null("vae:sd15.black_std").expand_as(std)
        h, w = mean.shape[-2:]
        region = pad_tiles(torch.ones(bsz, TILES, 1, h, w), hp, wp, 0.0)
        pose = np.stack([np.stack([self.skeleton(s) for s in row]) for row in tiles])  # [B, 4, H, W, 3]
        pose = torch.from_numpy(pose).permute(0, 1, 4, 2, 3).float() / 255.0
        batch = {
            "masked_mean": to_canvas(pad_tiles(known * mean + (1 - known) * black_mean, hp, wp)),
            "masked_std": to_canvas(pad_tiles(known * std + (1 - known) * black_std, hp, wp)),
            "mask": to_canvas(known.expand(bsz, TILES, 1, hp, wp).contiguous()),
            "loss_mask": to_canvas(region),
            "pose": to_canvas(pad_tiles(pose, *self.tile_pixels)),
            "image_tokens": torch.stack([as_tensor(row[r][TOKENS]) for row, r in zip(tiles, reference)]),
            "reference_mean": torch.stack([mean[i, r] for i, r in enumerate(reference)]),
            "reference_std": torch.stack([std[i, r] for i, r in enumerate(reference)]),
        }
        if latents:
            batch["latent_mean"], batch["latent_std"] = to_canvas(pad_tiles(mean, hp, wp)), to_canvas(pad_tiles(std, hp, wp))
        return batch

    # ---- training -------------------------------------------------------------------------

    def collate(self, groups: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Groups -> canvases with 1-3 target tiles (four fair flags redrawn until both kinds
        are present), a random source tile as the FLC reference, and the stage's condition
        dropout. Every draw comes from `generator`."""
        flags, reference = [], []
        for _ in groups:
            while True:
                row = torch.randint(0, 2, (TILES,), generator=generator)
                if 0 < int(row.sum()) < TILES:
                    break
            sources = torch.nonzero(row).flatten()
            flags.append(row)
            reference.append(int(sources[torch.randint(0, len(sources), (1,), generator=generator)]))
        batch = self.canvas([g["samples"] for g in groups], torch.stack(flags), reference)
        batch["reference"] = torch.tensor(reference)  # which tile (bench/train_cost.py's online step encodes it)
        self.drop(batch, generator)
        return batch

    def drop(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
        """The stage's condition dropout, in place: stage 1, the DINOv2 tokens of the whole
        batch -> the stored null embedding with p = 0.1; stages 2-3, per sample one draw u:
        DINOv2 (u < 0.05), the VAE reference latent -> zeros (0.05 <= u < 0.10), both
        (0.10 <= u < 0.15) (train_stage2.py)."""
        null_tokens = self.null(f"{self.dinov2_need}.tokens")
        if self.stage == 1:
            if float(torch.rand((), generator=generator)) < STAGE1_DROP:
                batch["image_tokens"][:] = null_tokens
            return
        u = torch.rand((len(batch["image_tokens"]),), generator=generator)
        drop_dino = (u < STAGE23_DROP) | ((u >= 2 * STAGE23_DROP) & (u < 3 * STAGE23_DROP))
        drop_vae = (u >= STAGE23_DROP) & (u < 3 * STAGE23_DROP)
        batch["image_tokens"][drop_dino] = null_tokens
        batch["reference_mean"][drop_vae] = 0.0
        batch["reference_std"][drop_vae] = 0.0

    def loss(self, model: ImagPoseModel, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        latents = sample_latent(batch["latent_mean"], batch["latent_std"], self.scaling_factor, generator)
        masked = sample_latent(batch["masked_mean"], batch["masked_std"], self.scaling_factor, generator)
        reference = sample_latent(batch["reference_mean"], batch["reference_std"], self.scaling_factor, generator)
        step = self.objective.noisy(latents, generator, self.noise_scheduler)
        dtype = model_dtype(model)
        x = torch.cat([step.noisy, batch["mask"].to(step.noisy.dtype), masked], dim=1).to(dtype)
        pred = model(x, step.timesteps, batch["image_tokens"].to(dtype), reference.to(dtype), batch["pose"].to(dtype)).sample
        return self.objective.loss(pred, step, mask=batch["loss_mask"], scheduler=self.noise_scheduler)

    # ---- sampling -------------------------------------------------------------------------

    @staticmethod
    def layout(mode: str, sources: list[dict[str, Any]], targets: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
        """The four tiles and their flags for a sampling scenario (see `SAMPLE_MODES`)."""
        if mode not in SAMPLE_MODES:
            raise ValueError(f"mode must be one of {SAMPLE_MODES}, got {mode!r}")
        if not sources or not targets:
            raise ValueError("a canvas needs at least one source and one target")
        if mode == "single":  # official test.py: the source three times, the target pose last
            return [sources[0]] * 3 + [targets[0]], [1, 1, 1, 0]
        if mode == "t1":  # paper's T1: the target pose three times
            return [sources[0]] + [targets[0]] * 3, [1, 0, 0, 0]
        if mode == "multi-source":  # paper's T3: up to three different sources, cycled
            chosen = sources[:3]
            return [chosen[i % len(chosen)] for i in range(3)] + [targets[0]], [1, 1, 1, 0]
        chosen = targets[:3]  # multi-target (IMAGPose*): free tiles repeat the source
        tiles = [sources[0]] + chosen + [sources[0]] * (3 - len(chosen))
        return tiles, [1] + [0] * len(chosen) + [1] * (3 - len(chosen))

    @torch.no_grad()
    def sample_canvases(self, model: ImagPoseModel, canvases: list[tuple[list[dict[str, Any]], list[int]]], *,
                        generator: torch.Generator | None = None, **settings: Any) -> torch.Tensor:
        """Denoise whole canvases (tiles + flags, the first tile the FLC reference). Returns
        the canvas latents [B, 4, 2hp, 2wp] in the stored posteriors' space (unscaled)."""
        s, rest = self.split_settings(settings)
        if rest:
            raise TypeError(f"{self.name}.sample got unexpected arguments {sorted(rest)}")
        if s.uncond not in ("zeros", "null"):
            raise ValueError(f"uncond must be zeros (official) or null, got {s.uncond!r}")
        device, dtype = model.device, model.dtype
        flags = torch.tensor([f for _, f in canvases])
        batch = self.canvas([t for t, _ in canvases], flags, [0] * len(canvases), latents=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        # posterior means, as the official pipeline encodes them at inference (`latent_dist.mean`)
        masked = (batch["masked_mean"] * self.scaling_factor).to(dtype)
        reference = (batch["reference_mean"] * self.scaling_factor).to(dtype)
        context = model.context(batch["image_tokens"].to(dtype), reference)
        pose_cond = model.pose_guider(batch["pose"].to(dtype))
        mask = batch["mask"].to(dtype)
        if s.guidance_scale > 1.0:
            if s.uncond == "zeros":  # official: zero DINOv2 and VAE tokens
                null_context = torch.zeros_like(context)
            else:  # what training dropped to: the null DINOv2 embedding, a zero latent
                null_tokens = self.null(f"{self.dinov2_need}.tokens").to(device, dtype).expand_as(batch["image_tokens"])
                null_context = model.context(null_tokens, torch.zeros_like(reference))
            context = torch.cat([null_context, context])
            mask, masked, pose_cond = (torch.cat([x, x]) for x in (mask, masked, pose_cond))

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.denoise(torch.cat([x, mask, masked], dim=1), t, context, pose_cond).sample

        hp, wp = self.tile_latent
        latents = denoise(predict, (len(canvases), 4, 2 * hp, 2 * wp), scheduler=self.objective.sampler(s.scheduler),
                          num_inference_steps=s.num_inference_steps, device=device, dtype=dtype, guidance_scale=s.guidance_scale,
                          guidance_rescale=s.guidance_rescale, generator=generator)
        return latents.float() / self.scaling_factor

    def tile_latents(self, canvas_latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, 2hp, 2wp] -> the four tiles without padding [B, 4, 4, h, w]."""
        _, h, w = self.latent_shape
        return from_canvas(canvas_latents)[..., :h, :w]

    def sample(self, model: ImagPoseModel, pairs: list[dict[str, Any]], *, generator: torch.Generator | None = None,
               mode: str = "single", **settings: Any) -> torch.Tensor:
        """One target per pair (`single` or `t1`): its tile's latents [B, 4, h, w] in the stored
        posteriors' space. The other scenarios need several images of a person:
        `posedata sample imagpose` (`posedata.train.imagpose_sample`)."""
        if mode not in ("single", "t1"):
            raise ValueError(f"{self.name}.sample on pairs takes mode single or t1; {mode} runs through `posedata sample imagpose`")
        canvases = [self.layout(mode, [p["source"]], [p["target"]]) for p in pairs]
        latents = self.tile_latents(self.sample_canvases(model, canvases, generator=generator, **settings))
        first_target = [flags.index(0) for _, flags in canvases]
        return torch.stack([latents[i, t] for i, t in enumerate(first_target)])

