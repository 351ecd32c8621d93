"""DINOv2 patch tokens (`last_hidden_state` [257, C]), preprocessed as the official PCDMs code.

PCDMs (tencent-ailab/PCDMs) conditions its inpaint and refine stages on
`Dinov2Model.from_pretrained('facebook/dinov2-giant')(...).last_hidden_state`
(`stage2_train_inpaint_model.py`: `image_encoder_p(batch["source_image"]).last_hidden_state`;
run_stage2.sh / run_stage3.sh pass `facebook/dinov2-giant`). IMAGPose uses dinov2-base.

Preprocessing (`src/dataset/stage2_dataset.py` and `stage3_dataset.py`): the photo is resized
to a 512 x 512 square with PIL BICUBIC (`size=(args.img_width, args.img_height)`, 512 / 512 in
stage2_config.py and run_stage2.sh; `size=(512,512)` hard-coded for stage 3), then fed to a
default-constructed `CLIPImageProcessor()`: the same two steps as PCDMs' CLIP prior, so this
module reuses `posedata.extractors.clip`'s preprocessing (same constants, same functions, same
`processor_backend` choice; see that module for the PIL-vs-torchvision bicubic note). 224 x 224
with patch 14 gives 16 x 16 = 256 patch tokens + CLS = 257.

Position embeddings. The checkpoints are trained at 518 (37 x 37 patches); at 224 transformers
interpolates them to 16 x 16. PCDMs pins transformers 4.32.1, whose
`Dinov2Embeddings.interpolate_pos_encoding` calls `F.interpolate(..., scale_factor=(16.1 / 37,
16.1 / 37), mode="bicubic")` (the DINO "+ 0.1" trick), which samples the grid at slightly
different points than the installed transformers (5.x: `size=(16, 16)`). The default
`pos_interpolation="legacy"` replays the 4.32.1 arithmetic (in float32, as later 4.x releases
do; on CPU identical); "transformers" keeps the installed one. Recorded in the fingerprint.

Condition dropout in PCDMs zeroes the normalised pixel tensor (`clip_s_img =
torch.zeros(clip_s_img.shape)`, "dropout s_img for dinov2"), so the null embedding is the
model's output for an all-zero [3, 224, 224] input, not for a black image.
"""

from __future__ import annotations

import json
import math
import os
import types
from typing import Any, ClassVar

from posedata.extractors.base import (
    OutputSpec,
    resolve_preset,
    stored_dtype_label,
)
from posedata.extractors.clip import (
    PROCESSOR_DEFAULTS,
    SQUARE_SIZE,
    ClipStyleEncoder,
)
from posedata.extractors.hf import COMPUTE_DTYPE_POLICY

# facebook/dinov2-giant config.json: ViT-g/14 with SwiGLU FFN (hidden 1536, 40 layers,
# 24 heads, mlp_ratio 4 -> SwiGLU hidden (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096).
DINOV2_GIANT_CONFIG: dict[str, Any] = {
    "hidden_size": 1536,
    "num_hidden_layers": 40,
    "num_attention_heads": 24,
    "mlp_ratio": 4,
    "use_swiglu_ffn": True,
    "hidden_act": "gelu",
    "image_size": 518,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
}
# facebook/dinov2-base config.json: ViT-B/14, plain GELU MLP.
DINOV2_BASE_CONFIG: dict[str, Any] = {
    **DINOV2_GIANT_CONFIG,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "use_swiglu_ffn": False,
}
# Tiny: same class and patch grid (518 / 14 -> 37 x 37 position embeddings, interpolated to
# 16 x 16 as for the real checkpoints); the FFN kind follows the preset.
TINY_OVERRIDES: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

POS_INTERPOLATIONS = ("legacy", "transformers")
LEGACY_POS_INTERPOLATION = {
    "transformers": "4.32.1 (PCDMs' pin)",
    "interpolate": "bicubic, align_corners=False, scale_factor=((h // p + 0.1) / sqrt(N), (w // p + 0.1) / sqrt(N))",
    "computed_in": "float32",
}
class Dinov2Extractor(ClipStyleEncoder):
    name = "dinov2"
    version = "1"
    default_model = "facebook/dinov2-giant"
    batch_size = 64

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "giant": {"model": "facebook/dinov2-giant", "config": DINOV2_GIANT_CONFIG, "consumers": ["PCDMs inpaint", "PCDMs refine"]},
        "base": {"model": "facebook/dinov2-base", "config": DINOV2_BASE_CONFIG, "consumers": ["IMAGPose"]},
    }
    DEFAULT_PRESET: ClassVar[str] = "giant"

    # PCDMs feeds DINOv2 as CLIP (ClipStyleEncoder), storing last_hidden_state.
    model_output = "last_hidden_state"
    output_suffix = "tokens.npy"

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
        preset: str | None = None,
        revision: str | None = None,
        square_size: int = SQUARE_SIZE,
        processor_backend: str = "pil",
        pos_interpolation: str = "legacy",
    ) -> None:
        self.preset = resolve_preset(self.PRESETS, self.DEFAULT_PRESET, preset, model)
        super().__init__(
            weights=weights,
            model=model or self.PRESETS[self.preset]["model"],
            resolution=resolution,
            dtype=dtype,
            seed=seed,
            revision=revision,
            square_size=square_size,
            processor_backend=processor_backend,
        )
        if pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {pos_interpolation!r}")
        self.pos_interpolation = pos_interpolation

    # ---- description ------------------------------------------------------------------------

    def architecture_config(self) -> dict[str, Any] | None:
        """The config random/tiny modes build; None for pretrained (the checkpoint's own)."""
        full = self.PRESETS[self.preset]["config"]
        if self.weights == "random":
            return full
        if self.weights == "tiny":
            return {**full, **TINY_OVERRIDES}
        return None

    def known_config(self) -> dict[str, Any] | None:
        if self._model is not None:
            return self._model.config.to_dict()
        config = self.architecture_config()
        if config is not None:
            return config
        local_config = os.path.join(self.model_id, "config.json")
        if os.path.isfile(local_config):
            with open(local_config) as fh:
                return json.load(fh)
        for spec in self.PRESETS.values():
            if spec["model"] == self.model_id:
                return spec["config"]
        return None  # another hub id: known only once loaded

    def token_count(self) -> int:
        config = self.known_config()
        patch = int(config["patch_size"]) if config else 14
        crop = PROCESSOR_DEFAULTS["crop_size"]
        return (crop["height"] // patch) * (crop["width"] // patch) + 1

    def hidden_size(self) -> int | str:
        config = self.known_config()
        return int(config["hidden_size"]) if config else "C"

    def outputs(self) -> dict[str, OutputSpec]:
        return {
            "tokens": OutputSpec(
                "tokens.npy",
                stored_dtype_label(self.dtype),
                (self.token_count(), self.hidden_size()),
                "Dinov2Model last_hidden_state, CLS first (PCDMs preprocessing: square resize, CLIP processor)",
            )
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update(
            {
                "architecture": "Dinov2Model",
                "output": "last_hidden_state",
                "preset": self.preset,
                "revision": self.revision,
                "config": self.architecture_config(),
                "preprocessing": self.preprocessing(),
                "pos_interpolation": LEGACY_POS_INTERPOLATION if self.pos_interpolation == "legacy" else "installed transformers",
                "compute_dtype": COMPUTE_DTYPE_POLICY,
                "null_embedding": "encoder(zeros[3,224,224] after normalisation)",
            }
        )
        return inputs

    def card(self) -> dict[str, Any]:
        card = super().card()
        card["preset"] = self.preset
        card["consumers"] = list(self.PRESETS[self.preset]["consumers"])
        return card

    # ---- model ------------------------------------------------------------------------------

    def model_class(self) -> type:
        from transformers import Dinov2Model

        return Dinov2Model

    def prepare(self, model) -> None:
        if self.pos_interpolation == "legacy":
            use_legacy_pos_interpolation(model)

def legacy_interpolate_pos_encoding(self, embeddings, height: int, width: int):
    """transformers 4.32.1's `Dinov2Embeddings.interpolate_pos_encoding` arithmetic (bound to a
    5.x `Dinov2Embeddings`): bicubic with `scale_factor = (h // p + 0.1) / sqrt(N)`, computed in
    float32 and cast back."""
    import torch
    from torch import nn

    num_patches = embeddings.shape[1] - 1
    num_positions = self.position_embeddings.shape[1] - 1
    if num_patches == num_positions and height == width:
        return self.position_embeddings
    class_pos_embed = self.position_embeddings[:, :1]
    patch_pos_embed = self.position_embeddings[:, 1:]
    dim = embeddings.shape[-1]
    patch_height, patch_width = legacy_patch_size(self)
    new_height = height // patch_height + 0.1
    new_width = width // patch_width + 0.1
    side = int(math.sqrt(num_positions))
    patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    target_dtype = patch_pos_embed.dtype
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.to(torch.float32),
        scale_factor=(float(new_height / side), float(new_width / side)),
        mode="bicubic",
        align_corners=False,
    ).to(dtype=target_dtype)
    if int(new_height) != patch_pos_embed.shape[-2] or int(new_width) != patch_pos_embed.shape[-1]:
        raise ValueError("Width or height does not match with the interpolated position embeddings")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed, patch_pos_embed), dim=1)


def legacy_patch_size(embeddings_module) -> tuple[int, int]:
    patch = embeddings_module.patch_embeddings.patch_size
    if isinstance(patch, int):
        return patch, patch
    return int(patch[0]), int(patch[1])


def use_legacy_pos_interpolation(model) -> None:
    """Make `model` (a transformers Dinov2Model) interpolate its position embeddings as 4.32.1."""
    model.embeddings.interpolate_pos_encoding = types.MethodType(legacy_interpolate_pos_encoding, model.embeddings)
