"""Stable Diffusion VAE posterior of the OpenPose skeleton render (RePoseDM's pose input).

RePoseDM (Khandelwal, "RePoseDM: Recurrent Pose Alignment and Gradient Guidance for Pose
Guided Image Synthesis", sec. 3.1) feeds its UNet "the representation of [the noise and the
target pose P] obtained from VAE encoder", concatenated, and its Recurrent Pose Alignment
(sec. 3.2) maps "the source image I_S and the target pose image P ... to their respective
latent representations using VAE encoder". The pose image is the OpenPose skeleton (sec. 4:
"Pose skeletons were extracted using OpenPose"). Encoding it once here means a training step
never runs the VAE encoder on a pose.

What is stored, per image: the posterior `mean.npy` / `std.npy` [4, H/8, W/8] of the
`openpose` feature's `skeleton.png` (`posedata.render.draw_openpose` at the stored
resolution), encoded by exactly the `vae` feature's pipeline: this extractor composes a
`VaeExtractor` with the same weights / model / preset / seed / dtype (its preprocessing,
compute-dtype policy and fp32 fallback, not a copy), so `pose_latent:sd15` and `vae:sd15`
are the same autoencoder. A plugin samples `(mean + std * eps) * scaling_factor`, as for
`vae`.

Presets are the `vae` feature's (`sd15`: stabilityai/sd-vae-ft-mse, `sd21`: SD-2.1-base);
the default is `sd15`, the autoencoder of the one model that reads this feature.

Null embedding: the posterior of the ALL-BLACK render, i.e. the skeleton of "no person"
(what `openpose` draws when it finds nobody), stored as `black_mean.npy` / `black_std.npy`
(read as `pose_latent.black_mean` / `pose_latent.black_std`): RePoseDM's unconditional branch
sets the pose to "null" (sec. 3.4), and an empty skeleton is the null pose image.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from posedata.extractors.base import Extractor, ExtractorError, OutputSpec, Sample
from posedata.extractors.vae import AUTO, VaeExtractor

POSE_FEATURE = "openpose"
POSE_OUTPUT = "skeleton.png"


class PoseLatentExtractor(Extractor):
    name = "pose_latent"
    version = "1"
    default_model = VaeExtractor.PRESETS["sd15"]["model"]
    requires = (POSE_FEATURE,)
    batch_size = VaeExtractor.batch_size

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        name: {**spec, "consumers": ["RePoseDM"]} for name, spec in VaeExtractor.PRESETS.items()
    }
    DEFAULT_PRESET: ClassVar[str] = "sd15"

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
        preset: str | None = None,
        subfolder: str | None = AUTO,
        revision: str | None = None,
        compute_dtype: str = "fp16",
    ) -> None:
        # The vae feature's extractor: its presets, preprocessing and encoder, not a copy.
        self.vae = VaeExtractor(
            weights=weights,
            model=model,
            resolution=resolution,
            dtype=dtype,
            seed=seed,
            preset=preset or (None if any(spec["model"] == model for spec in self.PRESETS.values()) else self.DEFAULT_PRESET),
            subfolder=subfolder,
            revision=revision,
            compute_dtype=compute_dtype,
        )
        self.preset = self.vae.preset
        super().__init__(weights=weights, model=self.vae.model_id, resolution=resolution, dtype=dtype, seed=seed)

    # ---- description ------------------------------------------------------------------------

    def scaling_factor(self) -> float | None:
        return self.vae.scaling_factor()

    def outputs(self) -> dict[str, OutputSpec]:
        shape = self.vae.latent_shape()
        vae = self.vae.outputs()
        return {
            "mean": OutputSpec("mean.npy", vae["mean"].dtype, shape, "VAE posterior mean of the openpose skeleton.png, unscaled"),
            "std": OutputSpec("std.npy", vae["std"].dtype, shape, "VAE posterior std of the skeleton render; sample = (mean + std * eps) * scaling_factor"),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update(
            {
                "input": f"{POSE_FEATURE} {POSE_OUTPUT} (posedata.render.draw_openpose at the stored resolution)",
                "preset": self.preset,
                "vae": self.vae.fingerprint_inputs(),
                "null_embedding": "posterior of an all-black render (no person) at the stored resolution",
            }
        )
        return inputs

    def card(self) -> dict[str, Any]:
        card = super().card()
        vae_card = self.vae.card()
        card["scaling_factor"] = vae_card["scaling_factor"]
        card["preset"] = self.preset
        card["consumers"] = list(self.PRESETS[self.preset]["consumers"])
        card["sampling"] = vae_card["sampling"]
        return card

    # ---- model ------------------------------------------------------------------------------

    def setup(self, device: str) -> None:
        super().setup(device)
        self.vae.setup(device)

    # ---- extraction -------------------------------------------------------------------------

    def pose_image(self, sample: Sample) -> np.ndarray:
        """The sample's skeleton render, checked: uint8 [H, W, 3] at the stored resolution."""
        key = sample.get("key", "?")
        pose = sample.get(POSE_FEATURE)
        if not pose or POSE_OUTPUT not in pose:
            raise ExtractorError(f"{self.name}: {key}: no {POSE_FEATURE} {POSE_OUTPUT} in the sample")
        render = np.asarray(pose[POSE_OUTPUT])
        if render.ndim == 2:
            render = np.repeat(render[..., None], 3, axis=2)
        expected = (*(int(side) for side in self.resolution), 3)
        if render.dtype != np.uint8 or render.shape != expected:
            raise ExtractorError(
                f"{self.name}: {key}: {POSE_OUTPUT} is {render.dtype} {render.shape}, expected uint8 {expected}"
            )
        return render

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        if not batch:
            return []
        renders = [self.pose_image(sample) for sample in batch]
        mean, std = self.vae.encode_pixels(self.vae.preprocess(renders))
        return [{"mean.npy": mean[i], "std.npy": std[i]} for i in range(len(batch))]

    def null_embedding(self) -> dict[str, np.ndarray]:
        return self.vae.null_embedding()
