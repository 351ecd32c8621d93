"""Human parsing with the SCHP / ATR label set, through a transformers SegFormer parser.

TruePose (arXiv 2502.03426) parses the source person with SCHP and uses the rectangle around
each parsing class; `clip_regions` embeds those rectangles. We run the parser that the hub
offers for the same label set: `mattmdjaga/segformer_b2_clothes`, a SegFormer-B2
(`SegformerForSemanticSegmentation`) fine-tuned on ATR.

Label set (our ids; SCHP's `simple_extractor.py`, `dataset_settings["atr"]["label"]`, the same
order as the checkpoint's `config.id2label`):

    0 background    1 hat          2 hair         3 sunglasses   4 upper-clothes  5 skirt
    6 pants         7 dress        8 belt         9 left-shoe   10 right-shoe    11 face
   12 left-leg     13 right-leg   14 left-arm    15 right-arm   16 bag           17 scarf

A model's `id2label` is mapped onto these ids by name (case, "_" and " " are normalised to
"-"), so a checkpoint that lists the same classes in another order still writes our ids; a
checkpoint whose labels are not exactly these 18 names is refused (`LabelMappingError`).

Preprocessing (the checkpoint's `preprocessor_config.json`, which equals what
`SegformerImageProcessor()` constructs): resize to 512 x 512 with bilinear resampling (the
stored image is squashed, not padded), rescale by 1/255, normalise with the ImageNet mean /
std. As in clip.py we default to the PIL backend (`SegformerImageProcessorPil`), the pipeline
transformers 4.x ran when the checkpoint was trained; `processor_backend="torchvision"`
selects the 5.x default. Postprocessing as the model card: logits [18, 128, 128] are upsampled
to the stored resolution (bilinear, align_corners=False), then argmax.

Outputs per image: `labels.png` (uint8 [H, W] label map at the stored resolution) and, from
`regions_from_labels`, the classes present (background excluded, ascending), their pixel
counts and boxes (x0, y0, x1, y1), x1 / y1 exclusive, in stored pixels. A map with nothing but
background gives M = 0 arrays ([0] and [0, 4]).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from posedata.extractors.base import NOTES, OutputSpec, Sample, checked_image
from posedata.extractors.hf import HFEncoderExtractor

# Our label ids (index) and names: SCHP's ATR list, lower-cased.
ATR_LABELS: tuple[str, ...] = (
    "background",
    "hat",
    "hair",
    "sunglasses",
    "upper-clothes",
    "skirt",
    "pants",
    "dress",
    "belt",
    "left-shoe",
    "right-shoe",
    "face",
    "left-leg",
    "right-leg",
    "left-arm",
    "right-arm",
    "bag",
    "scarf",
)
NUM_LABELS = len(ATR_LABELS)
BACKGROUND = 0
# id2label as the checkpoint spells it (mattmdjaga/segformer_b2_clothes config.json).
ATR_ID2LABEL: dict[int, str] = {
    i: "-".join(part.capitalize() if j == 0 else part for j, part in enumerate(name.split("-")))
    for i, name in enumerate(ATR_LABELS)
}

# What `SegformerImageProcessor()` constructs (transformers 5.23.0; tests check it) and what
# the checkpoint's preprocessor_config.json holds: 512 x 512, BILINEAR, ImageNet mean / std,
# no label reduction.
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"height": 512, "width": 512},
    "resample": 2,  # PILImageResampling.BILINEAR
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],  # IMAGENET_DEFAULT_MEAN
    "image_std": [0.229, 0.224, 0.225],  # IMAGENET_DEFAULT_STD
    "do_reduce_labels": False,
}
PROCESSOR_BACKENDS = ("pil", "torchvision")
POSTPROCESS = "logits -> bilinear(align_corners=False) to stored [H, W] in fp32 -> argmax -> ATR ids"

# SegFormer-B2 (MiT-B2 encoder + all-MLP decoder), the architecture of
# mattmdjaga/segformer_b2_clothes (its config.json: hidden_sizes, depths, decoder_hidden_size,
# num_attention_heads, mlp_ratios, layer_norm_eps; the remaining entries are SegformerConfig's
# defaults, which are MiT's: patch 7/3/3/3, strides 4/2/2/2, sr_ratios 8/4/2/1).
SEGFORMER_B2_CONFIG: dict[str, Any] = {
    "num_channels": 3,
    "num_encoder_blocks": 4,
    "depths": [3, 4, 6, 3],
    "sr_ratios": [8, 4, 2, 1],
    "hidden_sizes": [64, 128, 320, 512],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "mlp_ratios": [4, 4, 4, 4],
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "decoder_hidden_size": 768,
    "num_labels": NUM_LABELS,
}
# Same architecture class, tiny (tests, CPU smoke runs); the input is still 512 x 512.
TINY_CONFIG: dict[str, Any] = {
    **SEGFORMER_B2_CONFIG,
    "depths": [1, 1, 1, 1],
    "hidden_sizes": [8, 16, 32, 64],
    "num_attention_heads": [1, 1, 2, 2],
    "decoder_hidden_size": 32,
}

COMPUTE_DTYPE_POLICY = "cpu:fp32,cuda:dataset-dtype"


class LabelMappingError(ValueError):
    """The model's id2label is not the ATR label set."""


def normalise_label(name: str) -> str:
    return "-".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def atr_lookup(id2label: dict[Any, str]) -> np.ndarray:
    """Model class index -> our ATR id, from the model's `id2label`. Raises LabelMappingError
    unless the labels are exactly the 18 ATR classes (any order, any of the spellings
    "Upper-clothes", "upper_clothes", "Upper clothes")."""
    ours = {name: i for i, name in enumerate(ATR_LABELS)}
    items = sorted((int(k), v) for k, v in id2label.items())
    if [k for k, _ in items] != list(range(len(items))):
        raise LabelMappingError(f"id2label keys must be 0..N-1, got {[k for k, _ in items]}")
    unknown = [v for _, v in items if normalise_label(v) not in ours]
    if unknown:
        raise LabelMappingError(
            f"model labels {unknown} are not in the ATR label set {list(ATR_LABELS)}; "
            "the parsing feature needs an ATR-trained parser (e.g. mattmdjaga/segformer_b2_clothes)"
        )
    lookup = np.array([ours[normalise_label(v)] for _, v in items], dtype=np.int64)
    if len(set(lookup.tolist())) != len(lookup) or len(lookup) != NUM_LABELS:
        missing = sorted(set(ATR_LABELS) - {ATR_LABELS[i] for i in lookup})
        raise LabelMappingError(
            f"model labels must be the {NUM_LABELS} ATR classes exactly once each; "
            f"got {len(lookup)} labels, missing {missing}"
        )
    return lookup


def regions_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label map [H, W] -> (classes int32 [M], pixels int32 [M], boxes int32 [M, 4]).

    classes: the labels present other than background (0), ascending. pixels: how many pixels
    carry each. boxes: (x0, y0, x1, y1) of the rectangle that wraps each class, x1 and y1
    exclusive, so `labels[y0:y1, x0:x1]` holds every pixel of the class."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be [H, W], got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("label map has negative labels")
    flat = labels.reshape(-1).astype(np.int64)
    counts = np.bincount(flat) if flat.size else np.zeros(1, dtype=np.int64)
    classes = np.flatnonzero(counts)
    classes = classes[classes != BACKGROUND]
    boxes = np.zeros((len(classes), 4), dtype=np.int32)
    for row, c in enumerate(classes):
        mask = labels == c
        xs = np.flatnonzero(mask.any(axis=0))
        ys = np.flatnonzero(mask.any(axis=1))
        boxes[row] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return classes.astype(np.int32), counts[classes].astype(np.int32), boxes


class ParsingExtractor(HFEncoderExtractor):
    name = "parsing"
    version = "1"
    default_model = "mattmdjaga/segformer_b2_clothes"
    batch_size = 32

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
        revision: str | None = None,
        processor_backend: str = "pil",
    ) -> None:
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed, revision=revision)
        if processor_backend not in PROCESSOR_BACKENDS:
            raise ValueError(f"processor_backend must be one of {PROCESSOR_BACKENDS}, got {processor_backend!r}")
        self.processor_backend = processor_backend
        self._lookup = None

    # ---- description ------------------------------------------------------------------------

    def architecture_config(self) -> dict[str, Any] | None:
        """The config random/tiny modes build; None for pretrained (the checkpoint's own)."""
        return {"random": SEGFORMER_B2_CONFIG, "tiny": TINY_CONFIG}.get(self.weights)

    def outputs(self) -> dict[str, OutputSpec]:
        return {
            "labels": OutputSpec("labels.png", "uint8", ("H", "W"), "ATR label map (ids in the card's labels) at the stored resolution"),
            "classes": OutputSpec("classes.npy", "int32", ("M",), "ATR ids present, background excluded, ascending"),
            "pixels": OutputSpec("pixels.npy", "int32", ("M",), "pixel count of each class in classes.npy"),
            "boxes": OutputSpec("boxes.npy", "int32", ("M", 4), "x0, y0, x1, y1 (x1, y1 exclusive) of each class, stored pixels"),
        }

    def preprocessing(self) -> dict[str, Any]:
        return {
            "processor": "SegformerImageProcessor (checkpoint preprocessor_config = defaults)",
            "processor_backend": self.processor_backend,
            "processor_params": PROCESSOR_DEFAULTS,
            "postprocess": POSTPROCESS,
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update(
            {
                "architecture": "SegformerForSemanticSegmentation",
                "revision": self.revision,
                "config": self.architecture_config(),
                "labels": list(ATR_LABELS),
                "preprocessing": self.preprocessing(),
                "compute_dtype": COMPUTE_DTYPE_POLICY,
            }
        )
        return inputs

    def card(self) -> dict[str, Any]:
        card = super().card()
        card["labels"] = list(ATR_LABELS)
        return card

    # ---- model ------------------------------------------------------------------------------

    def build_processor(self):
        from transformers import SegformerImageProcessor
        from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

        cls = SegformerImageProcessorPil if self.processor_backend == "pil" else SegformerImageProcessor
        return cls(**PROCESSOR_DEFAULTS)

    def model_class(self) -> type:
        from transformers import SegformerForSemanticSegmentation

        return SegformerForSemanticSegmentation

    def make_config(self, config: dict[str, Any]):
        from transformers import SegformerConfig

        return SegformerConfig(**config, id2label=dict(ATR_ID2LABEL), label2id={v: k for k, v in ATR_ID2LABEL.items()})

    def prepare(self, model) -> None:
        import torch

        # Refuse a checkpoint with another label set before any image is processed.
        self._lookup = torch.from_numpy(atr_lookup(model.config.id2label))

    # ---- extraction -------------------------------------------------------------------------

    def preprocess(self, images: list[np.ndarray]):
        """uint8 [H, W, 3] images -> normalised float32 pixel tensor [N, 3, 512, 512]."""
        if self._processor is None:
            self._processor = self.build_processor()
        return self._processor(images=list(images), return_tensors="pt").pixel_values

    def label_maps(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [H, W, 3] images -> uint8 [H, W] ATR label maps at each image's resolution."""
        import torch
        import torch.nn.functional as F

        if self._model is None:
            raise RuntimeError("ParsingExtractor.setup(device) must be called before extraction")
        pixels = self.preprocess(images)
        with torch.inference_mode():
            logits = self._model(pixel_values=pixels.to(device=self.device, dtype=self._compute_dtype)).logits
            lookup = self._lookup.to(logits.device)
            maps = []
            for row, image in zip(logits, images):
                up = F.interpolate(row[None].float(), size=image.shape[:2], mode="bilinear", align_corners=False)
                maps.append(lookup[up[0].argmax(dim=0)].to(torch.uint8).cpu().numpy())
        return maps

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        if not batch:
            return []
        images = [checked_image(sample, self.name) for sample in batch]
        out = []
        for labels in self.label_maps(images):
            classes, pixels, boxes = regions_from_labels(labels)
            out.append({"labels.png": labels, "classes.npy": classes, "pixels.npy": pixels, "boxes.npy": boxes, NOTES: [] if len(classes) else ["only background"]})
        return out


def label_names(ids) -> list[str]:
    """ATR ids -> names (for display and cards)."""
    return [ATR_LABELS[int(i)] for i in ids]

