"""Regional CLIP ViT-H/14 embeddings, one per parsing class present (TruePose's CAA).

TruePose (Xu et al., "Human-Parsing-guided Attention Diffusion for Full-ID Preserving Pose
Transfer", arXiv 2502.03426) aligns attention with the CLIP image embeddings of the source
person's parsing regions: for each class of the human-parsing map, the rectangle that wraps
it. We store, for every class in the `parsing` feature's `classes.npy` (background excluded,
same order), the `image_embeds` of the stored image cropped to that class's box from
`boxes.npy` (x0, y0, x1, y1, exclusive ends).

The crop then goes through exactly the `clip` feature's pipeline (clip.py: PIL-bicubic resize
to a 512 x 512 square, then the default CLIP processor), by composing a `ClipExtractor` built
with the same weights / model / seed / dtype. No TruePose code was available to us, and the
paper text we could reach does not say whether a crop is padded to a square first, so the
default `crop_rule="resize"` resizes the rectangle directly (as the clip pipeline does with
the whole image); `crop_rule="pad"` first pads it to a centred square with the CLIP mean
colour (LLaVA's `expand2square` fill, which normalises to ~0). The rule is in the fingerprint.

All crops of a batch go through one CLIP forward. The null embedding is the clip feature's
(encoder output for an all-zero normalised input), stored as `embeds` [D].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from posedata.extractors.base import (
    NOTES,
    Extractor,
    ExtractorError,
    OutputSpec,
    Sample,
    checked_image,
    numpy_store_dtype,
    stored_dtype_label,
)
from posedata.extractors.clip import PROCESSOR_DEFAULTS, SQUARE_SIZE, ClipExtractor

CROP_RULES = ("resize", "pad")
# The pad colour of crop_rule="pad": the OpenAI CLIP mean as uint8 (LLaVA's expand2square).
PAD_FILL: tuple[int, ...] = tuple(int(round(255 * m)) for m in PROCESSOR_DEFAULTS["image_mean"])


def crop_region(image: np.ndarray, box, crop_rule: str = "resize") -> np.ndarray:
    """The rectangle `box` = (x0, y0, x1, y1) (exclusive ends) of a uint8 [H, W, 3] image;
    with crop_rule="pad", padded to a centred square filled with PAD_FILL."""
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = image[y0:y1, x0:x1]
    if crop_rule == "resize":
        return np.ascontiguousarray(crop)
    if crop_rule != "pad":
        raise ValueError(f"crop_rule must be one of {CROP_RULES}, got {crop_rule!r}")
    h, w = crop.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[...] = np.asarray(PAD_FILL, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = crop
    return out


class ClipRegionsExtractor(Extractor):
    name = "clip_regions"
    version = "1"
    default_model = ClipExtractor.default_model
    requires = ("parsing",)
    # Up to 17 crops per image: 16 images make one CLIP forward of ~100-270 crops.
    batch_size = 16

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
        crop_rule: str = "resize",
    ) -> None:
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed)
        if crop_rule not in CROP_RULES:
            raise ValueError(f"crop_rule must be one of {CROP_RULES}, got {crop_rule!r}")
        self.crop_rule = crop_rule
        # The clip feature's extractor, same weights: its preprocessing and encoder, not a copy.
        self.clip = ClipExtractor(
            weights=weights,
            model=model,
            resolution=resolution,
            dtype=dtype,
            seed=seed,
            revision=revision,
            square_size=square_size,
            processor_backend=processor_backend,
        )

    # ---- description ------------------------------------------------------------------------

    def embed_dim(self) -> int | str:
        return self.clip.embed_dim()

    def outputs(self) -> dict[str, OutputSpec]:
        return {
            "embeds": OutputSpec(
                "embeds.npy",
                stored_dtype_label(self.dtype),
                ("M", self.embed_dim()),
                "CLIP image_embeds of the box around each parsing class (clip feature's preprocessing)",
            ),
            "classes": OutputSpec("classes.npy", "int32", ("M",), "ATR id of each row (parsing classes.npy order)"),
        }

    def crop_description(self) -> dict[str, Any]:
        return {
            "regions": "parsing boxes.npy (x0, y0, x1, y1, exclusive), one per classes.npy entry",
            "crop_rule": self.crop_rule,
            "pad_fill": list(PAD_FILL) if self.crop_rule == "pad" else None,
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update({"clip": self.clip.fingerprint_inputs(), "crop": self.crop_description()})
        return inputs

    # ---- model ------------------------------------------------------------------------------

    def setup(self, device: str) -> None:
        super().setup(device)
        self.clip.setup(device)

    # ---- extraction -------------------------------------------------------------------------

    def regions(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(classes int32 [M], boxes int32 [M, 4]) from the sample's parsing outputs, checked
        against the image."""
        key = sample.get("key", "?")
        image = checked_image(sample, self.name)
        parsing = sample.get("parsing")
        if not parsing or "classes.npy" not in parsing or "boxes.npy" not in parsing:
            raise ExtractorError(f"clip_regions: {key}: no parsing classes.npy / boxes.npy in the sample")
        classes = np.asarray(parsing["classes.npy"]).astype(np.int32).reshape(-1)
        boxes = np.asarray(parsing["boxes.npy"]).astype(np.int64).reshape(-1, 4)
        if len(classes) != len(boxes):
            raise ExtractorError(f"clip_regions: {key}: {len(classes)} parsing classes but {len(boxes)} boxes")
        height, width = image.shape[:2]
        for c, (x0, y0, x1, y1) in zip(classes, boxes):
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise ExtractorError(
                    f"clip_regions: {key}: box {[int(x0), int(y0), int(x1), int(y1)]} of class {int(c)} "
                    f"is empty or outside the {width} x {height} image"
                )
        return classes, boxes

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        if not batch:
            return []
        regions = [self.regions(sample) for sample in batch]
        crops = [
            crop_region(sample["image"], box, self.crop_rule)
            for sample, (_, boxes) in zip(batch, regions)
            for box in boxes
        ]
        if crops:
            embeds = self.clip.encode_pixels(self.clip.preprocess(crops))
        else:
            embeds = np.zeros((0, int(self.embed_dim())), dtype=numpy_store_dtype(self.dtype))
        out, start = [], 0
        for classes, _ in regions:
            stop = start + len(classes)
            out.append({"embeds.npy": embeds[start:stop], "classes.npy": classes, NOTES: [] if len(classes) else ["no regions"]})
            start = stop
        return out

    def null_embedding(self) -> dict[str, np.ndarray]:
        return self.clip.null_embedding()
