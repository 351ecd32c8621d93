"""Stable Diffusion VAE posteriors: the latent distribution's mean and std, not one sample.

Every SD-based pose-transfer trainer encodes its images with a frozen diffusers
`AutoencoderKL` and draws a fresh latent each step: PCDMs' `stage2_train_inpaint_model.py`
(tencent-ailab/PCDMs) does `vae.encode(x).latent_dist.sample() * vae.config.scaling_factor`.
We store the `DiagonalGaussianDistribution`'s `mean` and `std` (diffusers clamps `logvar` to
[-30, 20] before `std = exp(0.5 * logvar)`) so a training plugin samples
`(mean + std * eps) * scaling_factor` exactly as `latent_dist.sample()` would, without running
the encoder (PixArt stores the distribution the same way).

Presets, by consumer (`preset=` or `model=` selects one):

* `sd21`: `stabilityai/stable-diffusion-2-1-base`, subfolder `vae`: PCDMs (run_stage2.sh,
  run_stage3.sh). The default.
* `sd15`: `stabilityai/sd-vae-ft-mse`, no subfolder: the SD-1.5 family (IMAGPose, TruePose).

Both have `scaling_factor` 0.18215 (stated in the SD-2.1-base VAE config; sd-vae-ft-mse's
config.json predates the key, so diffusers' default 0.18215 applies). It is recorded in the
card and the fingerprint.

Preprocessing: uint8 RGB at the stored resolution -> `x / 127.5 - 1` (what PCDMs'
`ToTensor()` + `Normalize([0.5], [0.5])` computes), NCHW. No resize: the latent is
[4, H/8, W/8] of the stored image.

`flip=True` also stores the posterior of the horizontally flipped image (`mean_flip.npy`,
`std_flip.npy`; kohya-ss/sd-scripts caches flipped latents the same way): a conv encoder's
latent of a flipped image is not the flipped latent, so flip augmentation needs its own.

Null embedding: the posterior of an ALL-BLACK image at the stored resolution
(`black_mean.npy`, `black_std.npy`; the build writes `features/<folder>/null.black_mean.npy`
and `null.black_std.npy`, read as `vae.black_mean` / `vae.black_std`). PCDMs' inpaint stage
feeds `[source | black]` (side by side, one image) as its masked image. Note that their black
half is encoded next to the source, so its latent near the seam sees the source; the stored
black latent is that of a black image alone, exact away from the seam.

Compute dtype: fp32 on CPU. On CUDA the encoder runs under `torch.autocast(compute_dtype)`
(fp16 by default, as PCDMs' fp16 mixed-precision training ran the VAE; weights stay fp32 and
autocast keeps GroupNorm in fp32); a batch whose half-precision posterior is not finite (the SD
VAE can overflow in fp16) is re-encoded in plain fp32 with the same fp32 weights. The policy is
in the fingerprint.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np

from posedata.extractors.base import (
    Extractor,
    ExtractorError,
    OutputSpec,
    Sample,
    checked_image,
    numpy_store_dtype,
    resolve_preset,
    stored_dtype_label,
    torch_dtype,
)
from posedata.extractors.hf import seeded

# The SD VAE (both presets share the architecture): the configs of
# stabilityai/stable-diffusion-2-1-base/vae/config.json and stabilityai/sd-vae-ft-mse/config.json
# (block_out_channels 128/256/512/512, four DownEncoderBlock2D / UpDecoderBlock2D, two resnet
# layers per block, 32 norm groups, silu, 4 latent channels). They differ only in
# `sample_size` (768 vs 256), which matters to tiled encoding only (off here).
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

# Same class, small enough for CPU tests: still four blocks, so still downsamples by 8.
TINY_CONFIG: dict[str, Any] = {
    **SD_VAE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}

# The constructor's `subfolder` default: find it (local directory layout, preset, "vae").
AUTO = "auto"
PREPROCESSING: dict[str, Any] = {
    "input": "uint8 RGB at the stored resolution",
    "scale": "x / 127.5 - 1",
    "layout": "NCHW",
    "resize": None,
}
COMPUTE_DTYPES = ("fp16", "bf16", "fp32")


class VaeExtractor(Extractor):
    name = "vae"
    version = "1"
    default_model = "stabilityai/stable-diffusion-2-1-base"
    batch_size = 16
    build_options = ("flip",)  # --flip

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "sd21": {
            "model": "stabilityai/stable-diffusion-2-1-base",
            "subfolder": "vae",
            "config": {**SD_VAE_CONFIG, "sample_size": 768},
            "consumers": ["PCDMs"],
        },
        "sd15": {
            "model": "stabilityai/sd-vae-ft-mse",
            "subfolder": None,
            "config": {**SD_VAE_CONFIG, "sample_size": 256},
            "consumers": ["IMAGPose", "TruePose"],
        },
    }
    DEFAULT_PRESET: ClassVar[str] = "sd21"

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
        flip: bool = False,
        compute_dtype: str = "fp16",
    ) -> None:
        self.preset = resolve_preset(self.PRESETS, self.DEFAULT_PRESET, preset, model)
        super().__init__(
            weights=weights,
            model=model or self.PRESETS[self.preset]["model"],
            resolution=resolution,
            dtype=dtype,
            seed=seed,
        )
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
        self._model = None
        self._autocast_dtype = None
        self.subfolder = self._resolve_subfolder(subfolder)
        self.revision = revision
        self.flip = bool(flip)
        self.compute_dtype = compute_dtype
        factor = self.downsampling_factor()
        if any(int(side) % factor for side in self.resolution):
            raise ValueError(f"vae: resolution {self.resolution} must be divisible by {factor}")

    # ---- description ------------------------------------------------------------------------

    def _resolve_subfolder(self, subfolder: str | None) -> str | None:
        if subfolder != AUTO:
            return subfolder or None
        if self.weights != "pretrained":
            return None
        if os.path.isdir(self.model_id):
            # A pipeline directory (SD-2.1-base layout) has vae/config.json; a VAE-only
            # directory (sd-vae-ft-mse layout) has config.json at its root.
            if os.path.isfile(os.path.join(self.model_id, "vae", "config.json")):
                return "vae"
            return None
        for spec in self.PRESETS.values():
            if spec["model"] == self.model_id:
                return spec["subfolder"]
        # Another hub id: most are full pipelines; pass subfolder=None for a VAE-only repo.
        return "vae"

    def architecture_config(self) -> dict[str, Any] | None:
        """The config random/tiny modes build; None for pretrained (the checkpoint's own)."""
        if self.weights == "random":
            return self.PRESETS[self.preset]["config"]
        if self.weights == "tiny":
            return TINY_CONFIG
        return None

    def known_config(self) -> dict[str, Any] | None:
        """The VAE config as far as it is known without loading weights: the built config,
        a local directory's config.json, or the recorded facts of a preset's hub id. Never
        the loaded model's, so the fingerprint is the same before and after setup()."""
        config = self.architecture_config()
        if config is not None:
            return config
        if os.path.isdir(self.model_id):
            path = os.path.join(self.model_id, self.subfolder or "", "config.json")
            if os.path.isfile(path):
                with open(path) as fh:
                    return json.load(fh)
            return None
        for spec in self.PRESETS.values():
            if spec["model"] == self.model_id and spec["subfolder"] == self.subfolder:
                return spec["config"]
        return None

    def scaling_factor(self) -> float | None:
        """`vae.config.scaling_factor` (diffusers' default 0.18215 where a config omits it);
        None for a hub id whose config is not known before loading."""
        config = self.known_config()
        if config is None:
            return None
        return float(config.get("scaling_factor", 0.18215))

    def latent_channels(self) -> int:
        config = self.known_config()
        return int(config.get("latent_channels", 4)) if config else 4

    def downsampling_factor(self) -> int:
        config = self.known_config()
        blocks = len(config["block_out_channels"]) if config else 4
        return 2 ** (blocks - 1)

    def latent_shape(self) -> tuple[int, int, int]:
        height, width = (int(side) for side in self.resolution)
        factor = self.downsampling_factor()
        return (self.latent_channels(), height // factor, width // factor)

    def outputs(self) -> dict[str, OutputSpec]:
        dtype = stored_dtype_label(self.dtype)
        shape = self.latent_shape()
        specs = {
            "mean": OutputSpec("mean.npy", dtype, shape, "VAE posterior mean (latent_dist.mean), unscaled"),
            "std": OutputSpec("std.npy", dtype, shape, "VAE posterior std (latent_dist.std); sample = (mean + std * eps) * scaling_factor"),
        }
        if self.flip:
            specs["mean_flip"] = OutputSpec("mean_flip.npy", dtype, shape, "posterior mean of the horizontally flipped image")
            specs["std_flip"] = OutputSpec("std_flip.npy", dtype, shape, "posterior std of the horizontally flipped image")
        return specs

    def compute_dtype_policy(self) -> str:
        if self.compute_dtype == "fp32":
            return "cpu:fp32,cuda:fp32"
        return f"cpu:fp32,cuda:fp32-weights+{self.compute_dtype}-autocast(fp32 re-encode if not finite)"

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update(
            {
                "architecture": "diffusers.AutoencoderKL",
                "preset": self.preset,
                "subfolder": self.subfolder,
                "revision": self.revision,
                "config": self.architecture_config(),
                "scaling_factor": self.scaling_factor(),
                "output": "latent_dist mean/std (logvar clamped to [-30, 20])",
                "flip": self.flip,
                "preprocessing": PREPROCESSING,
                "compute_dtype": self.compute_dtype_policy(),
                "null_embedding": "posterior of an all-black image at the stored resolution",
            }
        )
        return inputs

    def card(self) -> dict[str, Any]:
        card = super().card()
        loaded = float(self._model.config.scaling_factor) if self._model is not None else None
        card["scaling_factor"] = loaded if loaded is not None else self.scaling_factor()
        card["preset"] = self.preset
        card["consumers"] = list(self.PRESETS[self.preset]["consumers"])
        card["sampling"] = "latent = (mean + std * randn_like(mean)) * scaling_factor"
        return card

    # ---- model ------------------------------------------------------------------------------

    def build_model(self):
        import torch
        from diffusers import AutoencoderKL

        if self.weights == "pretrained":
            kwargs: dict[str, Any] = {}
            if self.subfolder:
                kwargs["subfolder"] = self.subfolder
            if self.revision:
                kwargs["revision"] = self.revision
            if os.path.isdir(self.model_id) and self.subfolder:
                # diffusers silently falls back to the root when a local subfolder is missing.
                path = os.path.join(self.model_id, self.subfolder)
                if not os.path.isdir(path):
                    raise FileNotFoundError(f"vae: no subfolder {self.subfolder!r} in {self.model_id}")
            # A hub id or a local directory; HF_HUB_OFFLINE=1 keeps it to the local cache.
            return AutoencoderKL.from_pretrained(self.model_id, torch_dtype=torch.float32, **kwargs)
        with seeded(self.seed):
            return AutoencoderKL(**self.architecture_config())

    def setup(self, device: str) -> None:
        declared = self.scaling_factor()  # before loading: what the fingerprint recorded
        super().setup(device)
        on_cuda = str(device).startswith("cuda")
        half = on_cuda and self.compute_dtype != "fp32"
        self._autocast_dtype = torch_dtype(self.compute_dtype) if half else None
        model = self.build_model()
        model.requires_grad_(False)
        loaded = float(model.config.scaling_factor)
        if declared is not None and abs(loaded - declared) > 1e-9:
            raise RuntimeError(f"vae: {self.model_id} has scaling_factor {loaded}, but {declared} was fingerprinted")
        self._model = model.to(device).eval()

    # ---- preprocessing ----------------------------------------------------------------------

    @staticmethod
    def preprocess(images: list[np.ndarray]):
        """uint8 [H, W, 3] images -> float32 [N, 3, H, W] in [-1, 1]."""
        import torch

        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        return pixels / 127.5 - 1.0

    # ---- extraction -------------------------------------------------------------------------

    def encode_pixels(self, pixels) -> tuple[np.ndarray, np.ndarray]:
        """[-1, 1] pixels [N, 3, H, W] -> (mean, std), each [N, 4, H/8, W/8] in the stored dtype."""
        import torch

        if self._model is None:
            raise RuntimeError("VaeExtractor.setup(device) must be called before encoding")
        with torch.inference_mode():
            x = pixels.to(device=self.device, dtype=torch.float32)
            if self._autocast_dtype is None:
                mean, std = self._posterior(x)
            else:
                with torch.autocast(device_type=torch.device(self.device).type, dtype=self._autocast_dtype):
                    mean, std = self._posterior(x)
                if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                    mean, std = self._posterior(x)  # overflow in half precision: redo in fp32
            store = torch_dtype(self.dtype)
            # Round to the dataset dtype first (bf16 is then stored as float32).
            mean = mean.to(store).float().cpu().numpy().astype(numpy_store_dtype(self.dtype))
            std = std.to(store).float().cpu().numpy().astype(numpy_store_dtype(self.dtype))
        return mean, std

    def _posterior(self, x):
        dist = self._model.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()

    def _check(self, sample: Sample) -> np.ndarray:
        image = checked_image(sample, self.name)
        if tuple(image.shape[:2]) != tuple(int(side) for side in self.resolution):
            raise ExtractorError(
                f"vae: {sample.get('key', '?')}: image is {image.shape[0]}x{image.shape[1]}, "
                f"expected the stored resolution {self.resolution[0]}x{self.resolution[1]}"
            )
        return image

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        import torch

        if not batch:
            return []
        pixels = self.preprocess([self._check(sample) for sample in batch])
        n = len(batch)
        if self.flip:
            # One forward over [originals; flipped] (GroupNorm is per sample: no cross-talk).
            pixels = torch.cat([pixels, pixels.flip(-1)], dim=0)
        mean, std = self.encode_pixels(pixels)
        out = [{"mean.npy": mean[i], "std.npy": std[i]} for i in range(n)]
        if self.flip:
            for i, item in enumerate(out):
                item["mean_flip.npy"] = mean[n + i]
                item["std_flip.npy"] = std[n + i]
        return out

    def null_embedding(self) -> dict[str, np.ndarray]:
        height, width = (int(side) for side in self.resolution)
        black = np.zeros((height, width, 3), dtype=np.uint8)
        mean, std = self.encode_pixels(self.preprocess([black]))
        return {"black_mean.npy": mean[0], "black_std.npy": std[0]}
