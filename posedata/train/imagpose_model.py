"""IMAGPose's networks (docs/imagpose-fidelity.md): an SD-1.5 UNet with 9 input channels,
the pose guider added after `conv_in`, the FLC tokenizer, and the CVA modules, in one
diffusers model; plus the 2 x 2 canvas arithmetic the plugin and the sampler share.

- **Canvas (ILC).** Four tiles in a 2 x 2 grid, in the official order top-left, top-right,
  bottom-left, bottom-right (`pose_dataset.concat_big_img`). Each tile's latent is padded on
  the right and bottom to a multiple of 2^(UNet levels - 1) (8 for SD-1.5) so the canvas
  splits into four equal tiles at every UNet level: the official code cannot run the
  paper's 256x176 / 512x352 (a 256x176 tile is 22 latent columns, 11 at the 1/2 level; the
  official split then fails with `stack expects equal size`). The padding is noise in the
  noisy canvas, zeros in the masked canvas and the tile's own flag in the mask, and it is
  kept out of the loss; samples are cut out of the canvas without it.
- **FLC.** `tokenizer` = Conv2d(4, 768, kernel 16, stride 16) + flatten over the reference
  tile's VAE latent (unpadded): [B, m, 768], m = (h // 16) * (w // 16); the context is
  [DINOv2 tokens (projected when they are not the UNet's width), VAE tokens].
- **CVA.** diffusers' `MotionAdapter` (AnimateDiff): 21 `AnimateDiffTransformer3D` modules
  (one "vanilla" temporal transformer each: GroupNorm, proj_in, a `BasicTransformerBlock`
  with two self-attentions over frames + GEGLU feed-forward, sinusoidal positions, proj_out,
  residual; its layers are run with a per-tile GroupNorm, see `across_tiles`). Each runs after one UNet module, as the official `motion_module.py` places
  them: after each spatial transformer of a block with attention (down 0-2, mid, up 1-3)
  and after each ResNet of the two blocks without (down 3, up 0); the canvas features are
  split into the four tiles, which are the frames: a position attends to the same position
  in the other tiles. `MotionAdapter`'s layout (2 per down block, 1 mid, 3 per up block) is
  exactly that, so `--weights pretrained` loads an AnimateDiff motion adapter with its own
  `from_pretrained`. `proj_out` starts at zero (AnimateDiff's `zero_initialize`), so a
  fresh CVA leaves the stage-1 UNet's output unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from posedata.train.unet import PAPER_POSE_CHANNELS, PluginModel, TokenProjection, conv_in_residual, pose_embedding

TILES = 4  # 2 x 2
IN_CHANNELS = 9  # noisy 4 + mask 1 + masked-image latent 4 (train_stage1.py: cat order)
TOKENIZER_KERNEL = 16  # paper §4 (a): kernel = stride = 16, 4 -> 768 channels
CVA_HEADS = 8
CVA_MAX_FRAMES = 32  # AnimateDiff's temporal_position_encoding_max_len (4 are used)
MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"  # the SD-1.5 AnimateDiff v2 modules


# ---- canvas ---------------------------------------------------------------------------------


def pad_multiple(unet_config: dict[str, Any] | Any) -> int:
    """What a tile's latent height and width must be a multiple of: 2^(number of
    downsamplings), so every UNet level splits the canvas into four equal tiles."""
    blocks = unet_config["block_out_channels"] if isinstance(unet_config, dict) else unet_config.block_out_channels
    return 2 ** (len(blocks) - 1)


def padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def to_canvas(tiles: torch.Tensor) -> torch.Tensor:
    """[B, 4, C, h, w] (TL, TR, BL, BR) -> [B, C, 2h, 2w]."""
    b, n, c, h, w = tiles.shape
    if n != TILES:
        raise ValueError(f"expected {TILES} tiles, got {n}")
    return tiles.reshape(b, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


def from_canvas(canvas: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, 4, C, h, w] (TL, TR, BL, BR); the inverse of `to_canvas`."""
    b, c, hh, ww = canvas.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"a canvas of {hh} x {ww} does not split into 2 x 2 equal tiles")
    h, w = hh // 2, ww // 2
    return canvas.reshape(b, c, 2, h, 2, w).permute(0, 2, 4, 1, 3, 5).reshape(b, TILES, c, h, w)


def pad_tiles(tiles: torch.Tensor, height: int, width: int, value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """[..., h, w] -> [..., height, width], right and bottom filled with `value` (a number, or a
    tensor broadcast to the padded part)."""
    h, w = tiles.shape[-2:]
    if (h, w) == (height, width):
        return tiles
    out = torch.empty((*tiles.shape[:-2], height, width), dtype=tiles.dtype, device=tiles.device)
    out[...] = value
    out[..., :h, :w] = tiles
    return out


# ---- CVA ------------------------------------------------------------------------------------


def cva_targets(unet: UNet2DConditionModel) -> list[tuple[str, nn.Module]]:
    """The 21 UNet modules (SD-1.5) a CVA module follows, in MotionAdapter order: per down
    block, its spatial transformers if it has any, else its ResNets; the mid block's
    transformer; per up block likewise."""
    targets: list[tuple[str, nn.Module]] = []
    for kind, blocks in (("down", unet.down_blocks), ("mid", [unet.mid_block]), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            modules = block.attentions if getattr(block, "attentions", None) else block.resnets
            targets += [(f"{kind}.{i}.{j}", m) for j, m in enumerate(modules)]
    return targets


def cva_modules(adapter: MotionAdapter) -> list[nn.Module]:
    """The adapter's temporal transformers in the same order as `cva_targets`."""
    blocks = list(adapter.down_blocks) + ([adapter.mid_block] if adapter.mid_block is not None else []) + list(adapter.up_blocks)
    return [m for block in blocks for m in block.motion_modules]


def _cross_view(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook on a UNet module: its output canvas -> 4 tiles as frames -> the temporal
    transformer -> canvas again (the transformer adds its own residual)."""
    motion = module.__dict__.get("_imagpose_cva")  # kept out of the module tree (no duplicate weights)
    if motion is None or not module.__dict__.get("_imagpose_cva_on", True):
        return output
    hidden = output[0] if isinstance(output, tuple) else output
    mixed = to_canvas(across_tiles(motion, from_canvas(hidden)))
    return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


def across_tiles(motion: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """One `AnimateDiffTransformer3D` over tiles [B, F, C, h, w] as frames, run with its own
    layers (norm, proj_in, transformer blocks, proj_out) in the order of its forward, except
    that the GroupNorm normalises each tile on its own, as the official (and the original
    AnimateDiff) `TemporalTransformer3DModel` does (`(b f) c h w` before `self.norm`);
    diffusers' forward normalises over all frames together."""
    b, f, c, h, w = tiles.shape
    residual = tiles.reshape(b * f, c, h, w)
    x = motion.norm(residual)  # per tile
    x = x.reshape(b, f, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, f, c)  # each position: a sequence of tiles
    x = motion.proj_in(x)
    for block in motion.transformer_blocks:
        x = block(x)
    x = motion.proj_out(x)
    x = x.reshape(b, h * w, f, c).permute(0, 2, 3, 1).reshape(b * f, c, h, w)
    return (x + residual).reshape(b, f, c, h, w)


def attach_cva(unet: UNet2DConditionModel, adapter: MotionAdapter) -> None:
    """Run `adapter`'s modules after their UNet modules (forward hooks; the UNet stays a stock
    UNet2DConditionModel). The adapter must match the UNet's blocks (`motion_adapter_config`)."""
    targets, modules = cva_targets(unet), cva_modules(adapter)
    if len(targets) != len(modules):
        raise ValueError(f"the motion adapter has {len(modules)} modules, the UNet needs {len(targets)} (one per {', '.join(n for n, _ in targets)})")
    for (name, target), motion in zip(targets, modules):
        width = target.config.in_channels if hasattr(target, "config") else target.out_channels  # transformer / ResNet
        if motion.in_channels != width:
            raise ValueError(f"motion module for {name} is {motion.in_channels} wide, the UNet's features are {width}")
        target.__dict__["_imagpose_cva"] = motion
        if not target.__dict__.get("_imagpose_hooked"):
            target.register_forward_hook(_cross_view)
            target.__dict__["_imagpose_hooked"] = True


def motion_adapter_config(unet_config: dict[str, Any], heads: int = CVA_HEADS) -> dict[str, Any]:
    """A MotionAdapter config whose modules fit `unet_config`'s blocks (SD-1.5: the
    AnimateDiff v1-5 layout, 453.2 M parameters)."""
    layers = unet_config["layers_per_block"]
    return {
        "block_out_channels": list(unet_config["block_out_channels"]),
        "motion_layers_per_block": layers if isinstance(layers, int) else list(layers),
        "motion_transformer_layers_per_block": 1,
        "motion_mid_block_layers_per_block": 1,
        "motion_transformer_layers_per_mid_block": 1,
        "motion_num_attention_heads": heads,
        "motion_norm_num_groups": unet_config["norm_num_groups"],
        "motion_max_seq_length": CVA_MAX_FRAMES,
        "use_motion_mid_block": True,
    }


def motion_module_file(path: str, unet_config: dict[str, Any], heads: int = CVA_HEADS) -> MotionAdapter:
    """A motion-module checkpoint in the original AnimateDiff key names (`down_blocks.0.
    motion_modules.0.temporal_transformer...`: AnimateDiff's `mm_sd_v15_v2.ckpt`, or the
    `motion_module.pth` of Moore-AnimateAnyone that the official IMAGPose stage 2 starts
    from) as a `MotionAdapter` fitting `unet_config`: keys renamed by diffusers' own
    `convert_animatediff_checkpoint_to_diffusers` (the sinusoidal `pos_encoder.pe` buffers
    are dropped; diffusers computes the same table), loaded strictly. Offline: no hub config
    is fetched (`MotionAdapter.from_single_file` would)."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    adapter = MotionAdapter(**motion_adapter_config(unet_config, heads))
    missing, unexpected = adapter.load_state_dict(convert_animatediff_checkpoint_to_diffusers(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a motion module for this UNet: missing {sorted(missing)[:3]}..., unexpected {sorted(unexpected)[:3]}...")
    return adapter


def zero_cva_outputs(adapter: MotionAdapter) -> None:
    """AnimateDiff's `zero_initialize`: every module's proj_out starts at zero (identity)."""
    with torch.no_grad():
        for motion in cva_modules(adapter):
            motion.proj_out.weight.zero_()
            motion.proj_out.bias.zero_()


# ---- the model ------------------------------------------------------------------------------


class FlcTokenizer(nn.Module):
    """The FLC tokenizer: a VAE latent [B, 4, h, w] -> [B, (h // k) * (w // k), width] tokens
    (Conv2d(4, width, k, stride k), flattened row by row; official `train_stage1.py`)."""

    def __init__(self, width: int, kernel: int = TOKENIZER_KERNEL, latent_channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(latent_channels, width, kernel_size=kernel, stride=kernel)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.conv(latent).flatten(2).transpose(1, 2)


class ImagPoseModel(PluginModel):
    """UNet (9 input channels) + `pose_guider` (after conv_in) + FLC `tokenizer` (+ `image_proj`
    when the DINOv2 tokens are not the UNet's width) + `cva` (a `MotionAdapter`, stages 2-3).

    `forward(sample, timestep, image_tokens, reference_latent, pose)`: sample [B, 9, 2h, 2w]
    (noisy | mask | masked latents on the padded canvas), image_tokens [B, N, D] (DINOv2),
    reference_latent [B, 4, h0, w0] (the reference tile, scaled), pose [B, 3, 16h, 16w] in
    [0, 1]. Returns the UNet output. `objective` records the training recipe (official |
    paper: the noise schedule sampling must use)."""

    ignore_for_config: ClassVar[list[str]] = ["unet", "unets", "adapter"]

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        image_embed_dim: int = 768,
        pose_block_out_channels: tuple[int, ...] = PAPER_POSE_CHANNELS,
        tokenizer_kernel: int = TOKENIZER_KERNEL,
        use_cva: bool = False,
        cva_heads: int = CVA_HEADS,
        objective: str = "official",
        unet: UNet2DConditionModel | None = None,
        adapter: MotionAdapter | None = None,
    ):
        super().__init__()
        self.unet = self.make_unet(unet_config, unet)
        width = self.unet.config.cross_attention_dim
        self.pose_guider = pose_embedding(self.unet.config, tuple(pose_block_out_channels))
        self.tokenizer = FlcTokenizer(width, tokenizer_kernel)
        # dinov2:base is already 768 wide (official: no projection); giant (paper) is projected
        self.image_proj = TokenProjection(image_embed_dim, width, width) if image_embed_dim != width else None
        self.cva = None
        if use_cva:
            if adapter is None:
                adapter = MotionAdapter(**motion_adapter_config(dict(self.unet.config), cva_heads))
                zero_cva_outputs(adapter)
            self.cva = adapter
            attach_cva(self.unet, adapter)

    def context(self, image_tokens: torch.Tensor, reference_latent: torch.Tensor) -> torch.Tensor:
        """[DINOv2 tokens (projected if needed), VAE tokens]: the cross-attention context."""
        tokens = self.image_proj(image_tokens) if self.image_proj is not None else image_tokens
        return torch.cat([tokens, self.tokenizer(reference_latent)], dim=1)

    def denoise(self, sample: torch.Tensor, timestep: Any, context: torch.Tensor, pose_cond: torch.Tensor):
        with conv_in_residual(self.unet, pose_cond):
            return self.unet(sample, timestep, encoder_hidden_states=context)

    def forward(self, sample: torch.Tensor, timestep: Any, image_tokens: torch.Tensor, reference_latent: torch.Tensor, pose: torch.Tensor):
        return self.denoise(sample, timestep, self.context(image_tokens, reference_latent), self.pose_guider(pose))

    # ---- stages ---------------------------------------------------------------------------

    def parts(self) -> dict[str, nn.Module]:
        """The trainable groups the stages name (the official parameter counts are per group)."""
        parts: dict[str, nn.Module] = {"unet": self.unet, "pose_guider": self.pose_guider, "tokenizer": self.tokenizer}
        if self.image_proj is not None:
            parts["image_proj"] = self.image_proj
        if self.cva is not None:
            parts["cva"] = self.cva
        return parts

    def set_trainable(self, names: tuple[str, ...]) -> None:
        """requires_grad on the named parts only (stage 2 trains `cva` alone)."""
        parts = self.parts()
        unknown = set(names) - set(parts)
        if unknown:
            raise ValueError(f"no part(s) {sorted(unknown)} in this model; parts: {', '.join(parts)}")
        for name, part in parts.items():
            part.requires_grad_(name in names)

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in part.parameters()) for name, part in self.parts().items()}

    def with_cva(self, adapter: MotionAdapter | None = None) -> ImagPoseModel:
        """This model with CVA modules added (stage 1 -> 2): same weights, fresh (zero-output)
        or given `adapter`."""
        if self.cva is not None:
            return self
        config = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        model = type(self)(**{**config, "use_cva": True}, adapter=adapter)
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        if unexpected or any(not k.startswith("cva.") for k in missing):
            raise ValueError(f"stage-1 weights do not fit: unexpected {unexpected[:3]}, missing {[k for k in missing if not k.startswith('cva.')][:3]}")
        return model.to(self.device, self.dtype)
