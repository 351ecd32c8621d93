"""The one small interface every evaluation protocol follows, and the registry of them.

A protocol is what one family of papers did to turn generated images and ground truths into
SSIM, PSNR, LPIPS and FID, read from its official metric script. It has two halves:

- **the files the script reads**: `truth_file` turns a dataset's stored image into the
  ground truth as the paper's test files were made (PIDM: stretched to 256 x 256; PATN:
  padded with 40 white columns each side), `generated_file` turns a generated PNG into what
  the script received (CFLD: resized to the ground truth's size and truncated to uint8);
- **what each metric does with those files**: `ssim_inputs`, `psnr_inputs`, `lpips_inputs`
  and `fid_input` return exactly the arrays the script handed to scikit-image, `lpips` and
  the Inception network (size, interpolation, scale, dtype), plus the class constants for
  the SSIM window (`ssim_sigma`) and the batches whose last partial one the script drops
  (`lpips_batch`, `fid_batch`).

The metric libraries themselves (scikit-image, lpips, pytorch-fid) are called in one place,
`posedata.eval.metrics`; a protocol never computes a number.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

# protocol name -> "module:Class"
REGISTRY: dict[str, str] = {
    "pcdms": "posedata.eval.pcdms:PcdmsProtocol",
    "cfld": "posedata.eval.cfld:CfldProtocol",
    "pidm": "posedata.eval.pidm:PidmProtocol",
    "gfla": "posedata.eval.gfla:GflaProtocol",
    "patn": "posedata.eval.patn:PatnProtocol",
}

# Numbers a protocol can define. fid_tf is the standard TF-Inception FID (pytorch-fid's
# default network) on the protocol's FID images: the number many newer papers report.
# is / mask_is: the Inception Score (TF Inception's 1008-class softmax) of the generated
# images, and of them masked by the target's body as for mask_ssim (PATN).
METRICS = ("ssim", "psnr", "lpips", "fid", "fid_tf", "mask_ssim", "mask_lpips", "is", "mask_is")


class Protocol:
    name: ClassVar[str]
    # Bump when the code changes a number; it is part of the FID reference's fingerprint.
    version: ClassVar[str] = "1"
    papers: ClassVar[str]  # who reports numbers under this protocol
    script: ClassVar[str]  # the official file it follows
    metrics: ClassVar[tuple[str, ...]]  # what it defines, in table order
    market_metrics: ClassVar[tuple[str, ...]] = ()  # added on Market-1501 (masked by the target pose)
    ssim_sigma: ClassVar[float]
    # The scripts average LPIPS / compute FID over whole batches only: the last partial
    # batch of this size is dropped (None: every image counts).
    lpips_batch: ClassVar[int | None] = None
    fid_batch: ClassVar[int | None] = None
    fid_reference: ClassVar[str] = ""  # what the paper's FID reference set was
    inception_splits: ClassVar[int] = 10  # the Inception Score's splits (OpenAI's default)

    def __init__(self, stored: tuple[int, int]):
        self.stored = (int(stored[0]), int(stored[1]))
        # DeepFashion's frame is 16:11 (256x176, 512x352); the papers' size rules are for it.
        # Anything else (Market-1501's 128x64) is evaluated at the stored size, as every
        # paper evaluates Market-1501 at its 128x64.
        self.deepfashion = self.stored[0] * 11 == self.stored[1] * 16

    # ---- the files the official script reads -------------------------------------------------

    def truth_file(self, stored_image: np.ndarray) -> np.ndarray:
        """The ground truth as the paper's test files were made from the photo (uint8 HxWx3)."""
        return stored_image

    def generated_file(self, image: np.ndarray, truth_size: tuple[int, int]) -> np.ndarray:
        """A generated image as the script received it (uint8 HxWx3)."""
        return image

    # ---- what each metric does with them -----------------------------------------------------

    def ssim_inputs(self, generated: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the script handed to skimage's SSIM: 0..255 scale, in the script's dtype."""
        return scaled(generated, 255.0), scaled(truth, 255.0)

    def psnr_inputs(self, generated: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the script handed to skimage's PSNR with data_range=1: [0, 1] float32."""
        return scaled(generated, 1.0), scaled(truth, 1.0)

    def lpips_inputs(self, generated: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the `lpips` network received (it expects [-1, 1]), float32 HxWx3."""
        return to_minus_one_one(generated), to_minus_one_one(truth)

    def fid_input(self, file: np.ndarray) -> np.ndarray:
        """One image as the script fed the Inception network, [0, 1] float32 HxWx3 (the
        network then resizes to 299 x 299 bilinearly and applies its own scaling)."""
        return scaled(file, 1.0)

    def inception_score_input(self, file: np.ndarray) -> np.ndarray:
        """One generated file as the Inception Score script fed the TF Inception, [0, 1]
        float32 HxWx3 (the network resizes to 299 x 299 bilinearly and scales to [-1, 1])."""
        return scaled(file, 1.0)

    def masked(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """An image (a file, or a metric input) with everything off the body zeroed."""
        return image * mask[..., None].astype(image.dtype)

    # ---- what the protocol is ----------------------------------------------------------------

    def default_metrics(self, market: bool) -> tuple[str, ...]:
        return self.metrics + (self.market_metrics if market else ())

    def describe(self) -> dict[str, Any]:
        """Every rule that changes a number, for metrics.json and fingerprints."""
        return {
            "protocol": self.name,
            "code_version": self.version,
            "papers": self.papers,
            "script": self.script,
            "stored_resolution": list(self.stored),
            "ssim_sigma": self.ssim_sigma,
            "lpips_batch": self.lpips_batch,
            "fid_batch": self.fid_batch,
            "fid_reference": self.fid_reference,
            **self.rules(),
        }

    def rules(self) -> dict[str, str]:
        """The size and scaling rules in words (subclasses say theirs)."""
        return {}


def create_protocol(name: str, stored: tuple[int, int]) -> Protocol:
    if name not in REGISTRY:
        raise KeyError(f"unknown protocol {name!r}; known: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(stored)


# ---- the resize and scaling rules the scripts use, once ----------------------------------------


def scaled(image: np.ndarray, top: float) -> np.ndarray:
    """uint8 (or float on the 0..255 scale) -> float32 on 0..top, as `x.astype(float32) / 255 * top`."""
    out = np.asarray(image).astype(np.float32) / np.float32(255.0)
    return out if top == 1.0 else out * np.float32(top)


def to_minus_one_one(image: np.ndarray) -> np.ndarray:
    """`x.astype(float32) / 127.5 - 1` (GFLA's and PIDM's LPIPS input)."""
    return np.asarray(image).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def cv2_resize(image: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """`cv2.resize(imread(f).astype(np.float32), (W, H), interpolation)`: float32 on the
    0..255 scale, NOT clipped (bicubic overshoots past 0 and 255, and the scripts keep it)."""
    return cv2.resize(np.asarray(image).astype(np.float32), (size[1], size[0]), interpolation=interpolation)


def pil_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic (antialiased when shrinking) to H x W, uint8: how PIDM, GFLA and CFLD
    made their image files from the photos."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def torch_bicubic_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CFLD's generated images: `F.interpolate(x, size, mode="bicubic", antialias=True)` on
    [0, 1], then `(x * 255).clamp(0, 255).to(torch.uint8)`, which truncates (no rounding)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True)
    return (x * 255.0).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def pad_white(image: np.ndarray, columns: int) -> np.ndarray:
    """PATN's `addBounding`: `columns` white columns on each side."""
    return np.pad(image, ((0, 0), (columns, columns), (0, 0)), constant_values=255)


def deepfashion_size(stored: tuple[int, int]) -> tuple[int, int]:
    """The papers' DeepFashion test size nearest the stored one: 256x176 or 512x352."""
    return (512, 352) if stored[0] >= 384 else (256, 176)


INTER_CUBIC, INTER_LINEAR = cv2.INTER_CUBIC, cv2.INTER_LINEAR
