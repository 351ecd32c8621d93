"""truepose: TruePose (Xu et al., "Human-Parsing-guided Attention Diffusion for Full-ID
Preserving Pose Transfer", arXiv 2502.03426), trained from stored features.

No code was published; the paper is the specification and, where it is silent, the nearest
public code: Moore-AnimateAnyone (the paper's own ablation B2 is "the original architecture of
[Animate Anyone]"). Row-by-row readings and departures: docs/truepose-fidelity.md.

- Model (`TruePoseModel`): TargetNet and SourceNet, two SD-1.5 UNets of the same architecture
  and the same initial weights, both trained (Sec. 4.1; Moore's reference UNet is trained).
  SourceNet sees the source latent at t = 0 and its fused blocks' `norm1` outputs F'_l are
  the features (Moore's writer); HPFA (eq. 6-8) and CAA (eq. 9) are attention processors on
  the `attn1` of every fused `BasicTransformerBlock` (`posedata.train.truepose_attention`),
  all 16 by default (`fusion_blocks` names a subset). PoseEncoder: the layer's
  `pose_embedding` (ControlNet conditioning embedding (16, 32, 96, 256) -> 320, zero-init
  output; Moore's PoseGuider), target skeleton in [0, 1] (Moore's ToTensor), added after
  TargetNet's `conv_in`. Both UNets' text cross-attention get SD-1.5's null text embedding
  (`null_text`, a buffer: CLIP text encoder output for "" in the pretrained path, zeros for
  tiny / random weights, which have no text encoder).
- Data: `vae:sd15` posteriors of source and target (a `.sample()` draw each at training,
  the posterior mean for SourceNet at sampling, as Moore), the source's `parsing` label map
  (HPFA's mask M and CAA's region masks: pixels, not boxes), the source's `clip_regions`
  (one CLIP embedding per parsing class present, M <= 17, placed at its ATR id with a
  validity flag), and the target's keypoints (A_tau and the skeleton render).
- Classifier-free guidance: {F', F_clip} are dropped together with p = 0.3 (eq. 10, Sec. 4.4;
  HPFA and CAA become the identity, TargetNet's self-attention stays, the pose stays: Moore's
  unconditional branch). Sampling: DDIM 35 steps, guidance 3.5 (Sec. 4.4); SourceNet, the
  reweighted attention and CAA's region choice run once per pair and are reused every step.
- Training: epsilon MSE on SD-1.5's scaled-linear schedule, AdamW lr 1e-5 constant
  (Sec. 4.4), weight decay 1e-2 and max grad norm 1.0 (Moore's stage-1 config).
- Style transfer (Sec. 5.4): the sample option `style_region` blends, at every step, the noise
  predicted from the source (the donor) with the noise predicted from the target (the
  reference image, its own stored features) by the reference's parsing mask
  (`posedata.train.truepose_style`).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from posedata.extractors.parsing import ATR_LABELS, NUM_LABELS
from posedata.render import draw_openpose
from posedata.train.config import PluginOption, Preset, SampleSettings, TrainConfig
from posedata.train.diffusion import denoise, drop_conditions, sample_latent
from posedata.train.plugin import feature_card, stack
from posedata.train.truepose_attention import (
    DELTA,
    FUSION_KEYS,
    SIGMA,
    TOP_K,
    FusionState,
    SourceDone,
    SourceWriter,
    TargetReader,
    level_grids,
    target_classes,
)
from posedata.train.truepose_style import (
    REGION_FROM,
    blend_branches,
    branch_rows,
    region_mask,
    spread_latents,
    style_region_ids,
)
from posedata.train.unet import (
    PAPER_POSE_CHANNELS,
    TINY_POSE_CHANNELS,
    PluginModel,
    UNetPlugin,
    conv_in_residual,
    load_plugin_model,
    model_dtype,
    plain_config,
    pose_embedding,
)

DROP_PROB = 0.3  # eta (Sec. 4.4)
TEXT_TOKENS = 77  # SD-1.5's tokenizer length: the null text embedding is [77, 768]
KEEP = "keep"
POSE = "openpose.keypoints"


def transformer_blocks(unet: UNet2DConditionModel) -> list[str]:
    """Names of the UNet's `BasicTransformerBlock`s in forward order (16 in SD-1.5)."""
    names = [name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]
    units = forward_units(unet)
    return sorted(names, key=lambda n: units.index(n.split(".transformer_blocks.")[0]))


def forward_units(unet: UNet2DConditionModel) -> list[str]:
    """The UNet's resnets / attentions / samplers by name, in the order its forward runs them."""
    units = ["conv_in", "time_embedding"]

    def level(prefix: str, block: torch.nn.Module) -> None:
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            units.append(f"{prefix}.resnets.{j}")
            if attentions is not None:
                units.append(f"{prefix}.attentions.{j}")
        for sampler in ("downsamplers", "upsamplers"):
            if getattr(block, sampler, None) is not None:
                units.append(f"{prefix}.{sampler}")

    for i, block in enumerate(unet.down_blocks):
        level(f"down_blocks.{i}", block)
    units.append("mid_block.resnets.0")
    for j in range(len(unet.mid_block.attentions)):
        units += [f"mid_block.attentions.{j}", f"mid_block.resnets.{j + 1}"]
    for i, block in enumerate(unet.up_blocks):
        level(f"up_blocks.{i}", block)
    return units + ["conv_norm_out", "conv_out"]


def unused_after(unet: UNet2DConditionModel, block: str) -> list[str]:
    """What SourceNet never needs when its forward stops after `block`'s self-attention: the
    rest of that block, of its transformer, and every later unit."""
    unit, index = block.split(".transformer_blocks.")
    units = forward_units(unet)
    transformer = unet.get_submodule(unit)
    rest = [f"{block}.{part}" for part in ("norm2", "attn2", "norm3", "ff") if getattr(unet.get_submodule(block), part, None) is not None]
    rest += [f"{unit}.transformer_blocks.{k}" for k in range(int(index) + 1, len(transformer.transformer_blocks))]
    rest += [f"{unit}.{part}" for part in ("norm_out", "proj_out") if getattr(transformer, part, None) is not None]
    return rest + units[units.index(unit) + 1 :]


def module_key(name: str) -> str:
    return name.replace(".", "_")


def null_text_embedding(model: str, subfolder_text: str = "text_encoder", subfolder_tokenizer: str = "tokenizer") -> torch.Tensor:
    """SD's unconditional text embedding: the pipeline's CLIP text encoder on "" padded to the
    tokenizer's length ([1, 77, 768] for SD-1.5), as `encode_prompt` makes it."""
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder=subfolder_tokenizer)
        encoder = CLIPTextModel.from_pretrained(model, subfolder=subfolder_text)
    except (OSError, ValueError) as e:
        raise ValueError(f"truepose: {model} has no {subfolder_tokenizer}/ and {subfolder_text}/ for the null text embedding ({e})") from e
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0].float()


class TruePoseModel(PluginModel):
    """TargetNet (`target_unet`) + SourceNet (`source_unet`) + PoseEncoder (`pose_encoder`) +
    one CAA attention per fused block (`caa`); HPFA has no weights of its own (eq. 7 uses
    SourceNet's block projections, eq. 8 TargetNet's; see truepose_attention)."""

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        region_embed_dim: int = 1024,
        pose_block_out_channels: tuple[int, ...] = PAPER_POSE_CHANNELS,
        fusion_blocks: list[str] | None = None,
        fusion_keys: str = "concat",
        sigma: float = SIGMA,
        delta: float = DELTA,
        top_k: int = TOP_K,
        chunk_size: int = 1024,
        text_tokens: int = TEXT_TOKENS,
        unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        if fusion_keys not in FUSION_KEYS:
            raise ValueError(f"fusion_keys must be one of {FUSION_KEYS}, got {fusion_keys!r}")
        self.target_unet = self.make_unet(unet_config, unet)
        # same architecture, same initial weights (Sec. 4.1); a saved model overwrites both
        self.source_unet = copy.deepcopy(self.target_unet)
        self.pose_encoder = pose_embedding(unet_config, tuple(pose_block_out_channels))
        names = transformer_blocks(self.target_unet)
        chosen = names if fusion_blocks is None else list(fusion_blocks)
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise ValueError(f"fusion_blocks {unknown} are not BasicTransformerBlocks of the UNet; known: {names}")
        self.fused = [n for n in names if n in set(chosen)]
        cross = self.target_unet.config.cross_attention_dim
        self.register_buffer("null_text", torch.zeros(1, text_tokens, cross))
        self.caa = torch.nn.ModuleDict()
        blocks = dict(self.target_unet.named_modules())
        for name in self.fused:
            attn1 = blocks[name].attn1
            dim = attn1.to_q.in_features
            caa = Attention(query_dim=dim, cross_attention_dim=region_embed_dim, heads=attn1.heads, dim_head=dim // attn1.heads)
            torch.nn.init.zeros_(caa.to_out[0].weight)  # zero-initialised: the model starts as HPFA alone
            torch.nn.init.zeros_(caa.to_out[0].bias)
            self.caa[module_key(name)] = caa
        self.state = FusionState()
        self._install_processors()
        # SourceNet stops after the last fused block (its later layers feed nothing): those
        # weights get no gradient, so they are frozen (multi-GPU DDP needs every trained
        # parameter used)
        for name in unused_after(self.source_unet, self.fused[-1]):
            self.source_unet.get_submodule(name).requires_grad_(False)

    def _install_processors(self) -> None:
        cfg = self.config
        source_blocks, target_blocks = dict(self.source_unet.named_modules()), dict(self.target_unet.named_modules())
        for name in self.fused:
            source_blocks[name].attn1.set_processor(SourceWriter(name, self.state, cfg.sigma, cfg.delta, cfg.chunk_size,
                                                                 last=name == self.fused[-1]))
            target_blocks[name].attn1.set_processor(TargetReader(name, self.state, self.caa[module_key(name)], cfg.fusion_keys, cfg.top_k))

    def set_null_text(self, embedding: torch.Tensor) -> None:
        if tuple(embedding.shape[1:]) != tuple(self.null_text.shape[1:]):
            raise ValueError(f"null text embedding {tuple(embedding.shape)} does not fit the UNet ({tuple(self.null_text.shape)})")
        self.null_text.copy_(embedding.reshape(self.null_text.shape).to(self.null_text))

    def text(self, batch: int) -> torch.Tensor:
        return self.null_text.expand(batch, -1, -1)

    # ---- the two halves of a forward pass --------------------------------------------------

    def encode_source(self, source_latents: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor, region_tokens: torch.Tensor,
                      region_valid: torch.Tensor, keep: torch.Tensor) -> None:
        """Run SourceNet once (t = 0) and leave in `self.state` what TargetNet's processors
        read: H' and the attention each source token received, per fused block, and the
        region masks / tokens for CAA. labels uint8/long [B, H, W] (ATR ids, stored pixels);
        selected bool [B, 18] (A_tau's classes); region_tokens [B, 18, D] (row = ATR id);
        region_valid bool [B, 18]; keep bool [B]."""
        state = self.state
        state.clear()
        bsz = source_latents.shape[0]
        classes = F.one_hot(labels.long(), NUM_LABELS).permute(0, 3, 1, 2).float()
        grids = level_grids(source_latents.shape[-2], source_latents.shape[-1], len(self.source_unet.config.block_out_channels))
        for grid in grids:
            cover = F.adaptive_avg_pool2d(classes, grid).flatten(2)  # [B, 18, N]; classes are disjoint
            n = cover.shape[-1]
            # M resized to the grid: a token is in M when M covers at least half its cell
            state.key_masks[n] = torch.einsum("bcn,bc->bn", cover, selected.float()) >= 0.5
            state.region_coverage[n] = cover
        state.region_tokens = region_tokens
        state.region_valid = region_valid.bool()
        state.keep = keep.bool()
        state.write = True
        try:
            t0 = torch.zeros(bsz, dtype=torch.long, device=source_latents.device)
            self.source_unet(source_latents, t0, encoder_hidden_states=self.text(bsz))
        except SourceDone:
            pass
        finally:
            state.write = False

    def denoise_target(self, sample: torch.Tensor, timestep: Any, pose_features: torch.Tensor):
        """TargetNet with the pose features added after conv_in; the fusion processors read
        `self.state` (empty state: a plain UNet)."""
        with conv_in_residual(self.target_unet, pose_features):
            return self.target_unet(sample, timestep, encoder_hidden_states=self.text(sample.shape[0]))

    def forward(self, sample: torch.Tensor, timestep: Any, source_latents: torch.Tensor, pose: torch.Tensor, labels: torch.Tensor,
                selected: torch.Tensor, region_tokens: torch.Tensor, region_valid: torch.Tensor, keep: torch.Tensor):
        """One training forward: SourceNet on the source latents, then TargetNet on the noisy
        target latents `sample` [B, 4, h, w] with the target skeleton `pose` [B, 3, H, W] in
        [0, 1]. Returns TargetNet's output (`.sample`: the noise prediction)."""
        self.encode_source(source_latents, labels, selected, region_tokens, region_valid, keep)
        return self.denoise_target(sample, timestep, self.pose_encoder(pose))


def truepose_presets() -> dict[str, Preset]:
    # paper: AdamW lr 1e-5 constant, batch 12 per GPU at 512 x 352 (60 at 256 x 176) on 4 GPUs,
    # 50 epochs of DeepFashion's 101,966 training pairs = 50 x ceil(101966 / 48) steps.
    paper = TrainConfig(max_steps=50 * 2125, batch_size=12, learning_rate=1e-5, weight_decay=1e-2, warmup_steps=0, lr_schedule="constant",
                        max_grad_norm=1.0)
    tiny = paper.replace(max_steps=60, batch_size=4, learning_rate=1e-3, checkpoint_every=100)
    return {
        "paper": Preset(model={"pose_block_out_channels": PAPER_POSE_CHANNELS}, train=paper),
        "tiny": Preset(model={"pose_block_out_channels": TINY_POSE_CHANNELS, "chunk_size": 256}, train=tiny),
    }


class TruePosePlugin(UNetPlugin):
    """TruePose: SourceNet + TargetNet with parsing-guided fusion attention and CLIP-guided alignment."""

    name = "truepose"
    needs = ("vae:sd15", "parsing", "clip_regions", ("openpose", "keypoints_annotated"))
    needs_pixels = False
    reads = {"openpose": ("keypoints",), "parsing": ("labels",)}
    base_model = "sd15"
    model_cls = TruePoseModel
    presets: ClassVar[dict[str, Preset]] = truepose_presets()
    # Sec. 4.4: DDIM, 35 steps, classifier scale 3.5; "drop": the unconditional branch without
    # {F', F_clip} (what training dropped to), pose kept
    sample_recipes: ClassVar[dict[str, SampleSettings]] = {
        "paper": SampleSettings(num_inference_steps=35, guidance_scale=3.5, scheduler="ddim", uncond="drop"),
    }
    sample_options: ClassVar[tuple[PluginOption, ...]] = (
        PluginOption("style_region", "style transfer (Sec. 5.4): comma-separated parsing regions of each pair's target, the reference "
                     f"image ({', '.join(ATR_LABELS)}); they take the source's appearance at the reference's pose, the rest stays the "
                     "reference's"),
        PluginOption("style_region_from", "with --style-region, which image the regions come from: source (the paper's formula) or "
                     "reference (the regions stay the reference's, the rest takes the source's)", default="source", choices=REGION_FROM),
    )
    drop_prob = DROP_PROB

    def __init__(self, card: dict[str, Any], weights: str = "pretrained", model: str | None = None, preset: str | None = None,
                 **options: Any):
        super().__init__(card, weights, model, preset, **options)
        # embeds.npy is [M, D] with M per image: only D is a number
        try:
            self.region_dim = int(feature_card(card, "clip_regions", self.name)["outputs"]["embeds.npy"]["shape"][-1])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{self.name}: the card's clip_regions feature does not record its embedding width") from e

    # ---- model ----------------------------------------------------------------------------

    def model_kwargs(self) -> dict[str, Any]:
        return {**super().model_kwargs(), "region_embed_dim": self.region_dim}

    def from_unet(self, unet: UNet2DConditionModel) -> TruePoseModel:
        """Both UNets from the pretrained SD-1.5 UNet, and SD-1.5's null text embedding."""
        model = self.model_cls(unet_config=plain_config(unet), unet=unet, **self.model_kwargs())
        source = self.model_id or self.base.hub_id
        model.set_null_text(null_text_embedding(source))
        return model

    def build_model(self) -> TruePoseModel:
        if self.weights == "pretrained":
            return self.check_model(load_plugin_model(self.model_cls, self.model_id or self.base.hub_id, self.from_unet))
        return self.check_model(self.model_cls(unet_config=self.base.unet(self.weights), **self.model_kwargs()))

    def check_model(self, model: TruePoseModel) -> TruePoseModel:
        if model.config.region_embed_dim != self.region_dim:
            raise ValueError(f"{self.name}: the model's CAA reads {model.config.region_embed_dim}-wide CLIP region embeddings; "
                             f"the dataset stores {self.region_dim}")
        if model.target_unet.config.in_channels != self.latent_shape[0]:
            raise ValueError(f"{self.name}: the UNet reads {model.target_unet.config.in_channels}-channel latents; the dataset stores "
                             f"{self.latent_shape[0]}")
        return model

    # ---- data -----------------------------------------------------------------------------

    def pose_image(self, sample: dict[str, Any]) -> torch.Tensor:
        """The target skeleton rendered at the stored resolution, float32 [3, H, W] in [0, 1]."""
        return torch.from_numpy(draw_openpose(sample[POSE], self.height, self.width)).permute(2, 0, 1).float() / 255.0

    def regions(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's CLIP region embeddings at their ATR ids: ([18, D], valid bool [18])."""
        key = sample.get("__key__", "?")
        embeds = np.asarray(sample["clip_regions.embeds"], dtype=np.float32).reshape(-1, self.region_dim)
        classes = np.asarray(sample["clip_regions.classes"]).astype(np.int64).reshape(-1)
        if len(classes) != len(embeds) or (len(classes) and (classes.min() < 1 or classes.max() >= NUM_LABELS)):
            raise ValueError(f"{self.name}: {key}: clip_regions classes {classes.tolist()} do not match its {len(embeds)} embeddings "
                             f"or the ATR ids 1..{NUM_LABELS - 1}")
        tokens = torch.zeros(NUM_LABELS, self.region_dim)
        valid = torch.zeros(NUM_LABELS, dtype=torch.bool)
        tokens[classes] = torch.from_numpy(embeds)
        valid[classes] = True
        return tokens, valid

    def labels(self, sample: dict[str, Any]) -> torch.Tensor:
        labels = np.asarray(sample["parsing.labels"])
        if labels.shape != (self.height, self.width):
            raise ValueError(f"{self.name}: {sample.get('__key__', '?')}: parsing labels are {labels.shape}, the dataset is "
                             f"{self.height} x {self.width}")
        return torch.from_numpy(labels.astype(np.uint8))

    def conditions(self, pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """What HPFA / CAA / the PoseEncoder read, for a list of pairs."""
        src = [p["source"] for p in pairs]
        tgt = [p["target"] for p in pairs]
        regions = [self.regions(s) for s in src]
        return {
            "source_mean": stack(src, "vae.mean"),
            "source_std": stack(src, "vae.std"),
            "pose": torch.stack([self.pose_image(t) for t in tgt]),
            "labels": torch.stack([self.labels(s) for s in src]),
            "selected": torch.from_numpy(np.stack([target_classes(t[POSE]) for t in tgt])),
            "region_tokens": torch.stack([r[0] for r in regions]),
            "region_valid": torch.stack([r[1] for r in regions]),
        }

    def collate(self, pairs: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """-> target latent_mean / latent_std [B, 4, h, w], the conditions (`conditions`) and
        `keep` [B] (False: {F', F_clip} dropped, p = 0.3, one draw per pair)."""
        tgt = [p["target"] for p in pairs]
        batch = {"latent_mean": stack(tgt, "vae.mean"), "latent_std": stack(tgt, "vae.std"), **self.conditions(pairs)}
        batch[KEEP] = torch.ones(len(pairs))
        drop_conditions(batch, {KEEP: 0.0}, self.drop_prob, generator)
        batch[KEEP] = batch[KEEP] > 0.5
        return batch

    # ---- training -------------------------------------------------------------------------

    def loss(self, model: TruePoseModel, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        latents = sample_latent(batch["latent_mean"], batch["latent_std"], self.scaling_factor, generator)
        source = sample_latent(batch["source_mean"], batch["source_std"], self.scaling_factor, generator)
        step = self.objective.noisy(latents, generator, self.noise_scheduler)
        dtype = model_dtype(model)
        pred = model(step.noisy.to(dtype), step.timesteps, source.to(dtype), batch["pose"].to(dtype), batch["labels"], batch["selected"],
                     batch["region_tokens"].to(dtype), batch["region_valid"], batch[KEEP]).sample
        return self.objective.loss(pred, step)

    # ---- sampling -------------------------------------------------------------------------

    def style(self, style_region: str | None, style_region_from: str) -> tuple[list[int], bool] | None:
        """`--style-region` / `--style-region-from` -> (the region ids, whether m is inverted),
        or None for ordinary sampling (see posedata.train.truepose_style)."""
        if not style_region:
            return None
        if style_region_from not in REGION_FROM:
            raise ValueError(f"{self.name}: --style-region-from must be one of {', '.join(REGION_FROM)}, got {style_region_from!r}")
        from posedata.reader import find_feature

        if find_feature(self.card, "parsing") is None:
            raise ValueError(f"{self.name}: --style-region needs the reference images' parsing labels and the dataset has no 'parsing' "
                             "feature; run `posedata extend` with it")
        return style_region_ids(style_region, self.name), style_region_from == "reference"

    def style_mask(self, pairs: list[dict[str, Any]], ids: list[int], inverted: bool) -> torch.Tensor:
        """m [B, 1, h, w] bool: the regions `ids` of each pair's target (the reference) at the
        latent grid; `inverted`: its complement."""
        references = [p["target"] for p in pairs]
        missing = [r.get("__key__", "?") for r in references if "parsing.labels" not in r]
        if missing:
            raise ValueError(f"{self.name}: --style-region needs the reference's parsing labels; {', '.join(missing)} have none")
        mask = region_mask(torch.stack([self.labels(r) for r in references]), ids, tuple(self.latent_shape[1:]))
        return ~mask if inverted else mask

    @torch.no_grad()
    def sample(self, model: TruePoseModel, pairs: list[dict[str, Any]], *, generator: torch.Generator | None = None,
               style_region: str | None = None, style_region_from: str = "source", **kwargs: Any) -> torch.Tensor:
        """Target latents [B, 4, h, w] in the stored posteriors' space for the pairs (the
        source's vae / parsing / clip_regions and the target's keypoints are read).
        `style_region` ("upper-clothes,skirt"): style transfer (Sec. 5.4, truepose_style):
        the target is the reference image, whose own vae / parsing / clip_regions drive the
        second prediction and whose parsing gives the mask; `style_region_from` "reference"
        swaps the mask's sides."""
        settings, rest = self.split_settings(kwargs)
        if rest:
            raise ValueError(f"{self.name}: unknown sampling option(s) {sorted(rest)}")
        if settings.uncond != "drop":
            raise ValueError(f"{self.name}: uncond must be 'drop' (the branch without source features), got {settings.uncond!r}")
        style = self.style(style_region, style_region_from)
        device, dtype = model.device, model.dtype
        bsz = len(pairs)
        guided = settings.guidance_scale > 1.0
        mask = None
        if style is not None:
            mask = self.style_mask(pairs, *style).to(device)
            # the reference branch: the reference is its own source, at its own pose
            pairs = pairs + [{"source": p["target"], "target": p["target"]} for p in pairs]
        cond = {k: v.to(device) for k, v in self.conditions(pairs).items()}
        source = (cond["source_mean"] * self.scaling_factor).to(dtype)  # posterior mean, as Moore's pipeline
        model.encode_source(source, cond["labels"], cond["selected"], cond["region_tokens"].to(dtype), cond["region_valid"],
                            torch.ones(len(pairs), dtype=torch.bool, device=device))
        pose_features = model.pose_encoder(cond["pose"][:bsz].to(dtype))  # the target's pose in every branch
        if style is not None:
            model.state.select(branch_rows(bsz, guided))
        elif guided:
            model.state.repeat(2)
        rows = len(model.state.keep)
        if guided:  # the first bsz rows: the unconditional prediction, without source features
            model.state.keep = (torch.arange(rows) >= bsz).to(device)
        pose_features = pose_features.repeat(rows // bsz, 1, 1, 1)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if mask is None:
                return model.denoise_target(x, t, pose_features).sample
            out = model.denoise_target(spread_latents(x, guided), t, pose_features).sample
            return blend_branches(out, mask, guided)

        try:
            latents = denoise(predict, (bsz, *self.latent_shape), scheduler=self.objective.sampler(settings.scheduler),
                              num_inference_steps=settings.num_inference_steps, device=device, dtype=dtype,
                              guidance_scale=settings.guidance_scale, guidance_rescale=settings.guidance_rescale, generator=generator)
        finally:
            model.state.clear()
        return latents.float() / self.scaling_factor

    def sample_outputs(self, model: TruePoseModel, pairs: list[dict[str, Any]], *, generator: torch.Generator | None,
                       settings: SampleSettings, vae: Any = None, **options: Any) -> list[dict[str, Any]]:
        """The default outputs; with `--style-region`, samples.parquet also records the
        regions, which image they come from and the share of the latent grid the mask covers
        (0: the regions are absent from the reference, the output is the reference re-posed)."""
        outputs = super().sample_outputs(model, pairs, generator=generator, settings=settings, vae=vae, **options)
        style = self.style(options.get("style_region"), options.get("style_region_from") or "source")
        if style is not None:
            covered = self.style_mask(pairs, *style).float().mean((1, 2, 3)).tolist()
            regions = ",".join(ATR_LABELS[i] for i in style[0])
            for output, share in zip(outputs, covered):
                output.update(style_region=regions, style_region_from=options.get("style_region_from") or "source", style_mask_share=share)
        return outputs
