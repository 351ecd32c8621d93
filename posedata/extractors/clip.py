"""CLIP ViT-H/14 image embeddings, preprocessed exactly as the official PCDMs code does.

PCDMs (tencent-ailab/PCDMs, `src/dataset/stage1_dataset.py` and `stage1_train_prior_model.py`)
feeds its prior the `image_embeds` [1024] of `CLIPVisionModelWithProjection` loaded from
OpenCLIP-ViT-H-14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Its preprocessing:

1. `Image.resize((img_width, img_height), Image.BICUBIC)` with 512 x 512 (the `--img_width` /
   `--img_height` defaults and the values in `run_stage1.sh`): the person is squashed to a
   square, not padded or cropped.
2. A default-constructed `CLIPImageProcessor()`: shortest side -> 224 (bicubic), centre crop
   224 x 224, rescale by 1/255, normalise with the OpenAI CLIP mean / std. Not the model
   repository's own preprocessor config.

PCDMs pins transformers 4.32.1, where `CLIPImageProcessor` is the PIL/NumPy implementation.
In transformers 5.x the name `CLIPImageProcessor` is the torchvision backend, whose bicubic
kernel (a = -0.75) differs from PIL's (a = -0.5) by up to one 8-bit level per pixel. We
therefore default to `CLIPImageProcessorPil`, the same pipeline as 4.32.1's, built with the
same default parameters (tests check that they equal what `CLIPImageProcessor()` constructs);
`processor_backend="torchvision"` selects the other one. The backend is in the fingerprint.

Condition dropout in PCDMs zeroes the *normalised* pixel tensor (`torch.zeros(clip_img.shape)`),
so the null embedding is the model's output for an all-zero [3, 224, 224] input: that is the
mean colour after de-normalisation, not a black image.

We see the image at the stored resolution (e.g. 512 x 352), not the original file, so step 1
resizes the stored image to the square; the official code resizes the original photo.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from posedata.extractors.base import (
    OutputSpec,
    Sample,
    checked_image,
    numpy_store_dtype,
    stored_dtype_label,
    torch_dtype,
)
from posedata.extractors.hf import COMPUTE_DTYPE_POLICY, HFEncoderExtractor

# Step 1 of the official preprocessing: (img_width, img_height) = (512, 512), PIL BICUBIC.
SQUARE_SIZE = 512
SQUARE_RESAMPLE = "PIL.Image.BICUBIC"

# Step 2: what `CLIPImageProcessor()` constructs with no arguments (verified against
# transformers 5.23.0 by tests/test_clip.py; identical to 4.32.1's defaults). Recorded here
# rather than read from the installed transformers so the fingerprint needs no import and a
# future change of defaults cannot silently change the features.
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PILImageResampling.BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OPENAI_CLIP_MEAN
    "image_std": [0.26862954, 0.26130258, 0.27577711],  # OPENAI_CLIP_STD
}
PROCESSOR_BACKENDS = ("pil", "torchvision")

# The vision tower of laion/CLIP-ViT-H-14-laion2B-s32B-b79K. From the repository's
# open_clip_config.json (embed_dim 1024; vision image_size 224, layers 32, width 1280,
# head_width 80 -> 16 heads, patch_size 14; open_clip's default mlp_ratio 4 -> 5120) and the
# transformers configs converted from it (hidden_act "gelu", not CLIPVisionConfig's default
# "quick_gelu" which is OpenAI's; layer_norm_eps 1e-5).
VIT_H_14_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
# Same architecture class, small enough for CPU tests (the input is still 224 x 224 / 14).
TINY_CONFIG: dict[str, Any] = {
    **VIT_H_14_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
}

class ClipStyleEncoder(HFEncoderExtractor):
    """An image encoder fed as PCDMs feeds CLIP and DINOv2: square resize to 512 x 512, the
    default `CLIPImageProcessor`, one output of the model stored per image (`model_output`
    as `output_suffix`); the null embedding is the output for all-zero normalised pixels."""

    model_output: str
    output_suffix: str

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
        revision: str | None = None,
        square_size: int = SQUARE_SIZE,
        processor_backend: str = "pil",
    ) -> None:
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed, revision=revision)
        if processor_backend not in PROCESSOR_BACKENDS:
            raise ValueError(f"processor_backend must be one of {PROCESSOR_BACKENDS}, got {processor_backend!r}")
        self.square_size = int(square_size)
        self.processor_backend = processor_backend

    def preprocessing(self) -> dict[str, Any]:
        return {
            "square_resize": [self.square_size, self.square_size],
            "square_resample": SQUARE_RESAMPLE,
            "processor": "CLIPImageProcessor (default-constructed)",
            "processor_backend": self.processor_backend,
            "processor_params": PROCESSOR_DEFAULTS,
        }

    def build_processor(self):
        from transformers import CLIPImageProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        cls = CLIPImageProcessorPil if self.processor_backend == "pil" else CLIPImageProcessor
        # Explicit parameters equal to the defaults, so the recorded facts are what runs.
        return cls(**PROCESSOR_DEFAULTS)

    def square_resize(self, image: np.ndarray):
        from PIL import Image

        return Image.fromarray(image).resize((self.square_size, self.square_size), Image.BICUBIC)

    def preprocess(self, images: list[np.ndarray]):
        """uint8 [H, W, 3] images -> normalised float32 pixel tensor [N, 3, 224, 224]."""
        if self._processor is None:
            self._processor = self.build_processor()
        squares = [self.square_resize(image) for image in images]
        return self._processor(images=squares, return_tensors="pt").pixel_values

    def encode_pixels(self, pixel_values) -> np.ndarray:
        """Normalised pixels [N, 3, 224, 224] -> the model's `model_output` in the stored dtype."""
        import torch

        if self._model is None:
            raise RuntimeError(f"{type(self).__name__}.setup(device) must be called before encoding")
        with torch.inference_mode():
            pixels = pixel_values.to(device=self.device, dtype=self._compute_dtype)
            values = getattr(self._model(pixel_values=pixels), self.model_output)
            # Round to the dataset dtype first (bf16 is then stored as float32).
            values = values.to(torch_dtype(self.dtype)).float().cpu().numpy()
        return values.astype(numpy_store_dtype(self.dtype))

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        if not batch:
            return []
        images = [checked_image(sample, self.name) for sample in batch]
        return [{self.output_suffix: row} for row in self.encode_pixels(self.preprocess(images))]

    def null_embedding(self) -> dict[str, np.ndarray]:
        import torch

        crop = PROCESSOR_DEFAULTS["crop_size"]
        zeros = torch.zeros(1, 3, crop["height"], crop["width"])
        return {self.output_suffix: self.encode_pixels(zeros)[0]}


class ClipExtractor(ClipStyleEncoder):
    name = "clip"
    version = "1"
    default_model = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    model_output = "image_embeds"  # the attribute of the model's output that is stored
    output_suffix = "embeds.npy"
    batch_size = 64

    def model_class(self) -> type:
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection

    # ---- description ------------------------------------------------------------------------

    def architecture_config(self) -> dict[str, Any] | None:
        """The config random/tiny modes build; None for pretrained (the checkpoint's own)."""
        return {"random": VIT_H_14_CONFIG, "tiny": TINY_CONFIG}.get(self.weights)

    def embed_dim(self) -> int | str:
        if self._model is not None:
            return int(self._model.config.projection_dim)
        config = self.architecture_config()
        if config is not None:
            return config["projection_dim"]
        local_config = os.path.join(self.model_id, "config.json")
        if os.path.isfile(local_config):
            with open(local_config) as fh:
                data = json.load(fh)
            return int(data.get("projection_dim") or data.get("vision_config", {}).get("projection_dim"))
        if self.model_id == self.default_model:
            return VIT_H_14_CONFIG["projection_dim"]
        return "D"  # another hub id: known only once loaded

    def outputs(self) -> dict[str, OutputSpec]:
        return {
            "embeds": OutputSpec(
                "embeds.npy",
                stored_dtype_label(self.dtype),
                (self.embed_dim(),),
                "CLIPVisionModelWithProjection image_embeds (PCDMs preprocessing: square resize, CLIP processor)",
            )
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update(
            {
                "architecture": "CLIPVisionModelWithProjection",
                "output": "image_embeds",
                "revision": self.revision,
                "config": self.architecture_config(),
                "preprocessing": self.preprocessing(),
                "compute_dtype": COMPUTE_DTYPE_POLICY,
                "null_embedding": "encoder(zeros[3,224,224] after normalisation)",
            }
        )
        return inputs
