"""PIDM: ankanbhunia/PIDM `utils/metrics.py`, data from `data/prepare_data.py`.

Image files are the photos resized to 256x256 with PIL bicubic (stretched, not padded).
SSIM (sigma 1.2, x 255, population covariance, `data_range = gen.max() - gen.min()`) and
PSNR (data_range 1) on those 256x256 files. LPIPS: `cv2.resize` (default: bilinear) to
176x256, `/ 127.5 - 1`, AlexNet, batches of 64, last partial batch dropped. FID: the same
bilinear resize to 176x256, `/ 255`, torchvision Inception, batches of 64, last partial batch
dropped, against the training images (`train_256x256_pngs`).
"""

from __future__ import annotations

import numpy as np

from posedata.eval.protocol import INTER_LINEAR, Protocol, cv2_resize, pil_bicubic

FILE_SIZE = (256, 256)
METRIC_SIZE = (256, 176)


class PidmProtocol(Protocol):
    name = "pidm"
    papers = "PIDM (RePoseDM builds on PIDM's code)"
    script = "ankanbhunia/PIDM utils/metrics.py"
    metrics = ("ssim", "psnr", "lpips", "fid")
    ssim_sigma = 1.2
    lpips_batch = 64
    fid_batch = 64
    fid_reference = "the training images, PIL bicubic to 256x256 (train_256x256_pngs), then as the samples"

    def truth_file(self, stored_image):
        return pil_bicubic(stored_image, FILE_SIZE) if self.deepfashion else stored_image

    def generated_file(self, image, truth_size):
        return pil_bicubic(image, truth_size)

    def _linear(self, image: np.ndarray) -> np.ndarray:
        # cv2.resize(imread(f).astype(float32), (176, 256)): INTER_LINEAR, cv2's default
        return cv2_resize(image, METRIC_SIZE, INTER_LINEAR) if self.deepfashion else np.asarray(image).astype(np.float32)

    def lpips_inputs(self, generated, truth):
        return self._linear(generated) / np.float32(127.5) - np.float32(1.0), self._linear(truth) / np.float32(127.5) - np.float32(1.0)

    def fid_input(self, file):
        return self._linear(file) / np.float32(255.0)

    def rules(self):
        if not self.deepfashion:
            return {"size": f"files as stored ({self.stored[0]}x{self.stored[1]})"}
        return {
            "size": "files PIL bicubic to 256x256 (stretched); SSIM and PSNR on them",
            "lpips_input": "cv2 bilinear to 256x176, / 127.5 - 1",
            "fid_input": "cv2 bilinear to 256x176, / 255; torchvision Inception, bilinear to 299, GFLA's affine",
        }
