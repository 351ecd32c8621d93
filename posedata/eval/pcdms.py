"""PCDMs (and IMAGPose, whose maintainers point to it): tencent-ailab/PCDMs
`caculate_metrics_256.py` / `caculate_metrics_512.py` over `metrics.py`.

Every image, generated and ground truth alike, is read as float32 and resized with
`cv2.resize(..., INTER_CUBIC)` to 176x256 (or 352x512), then divided by 255, without
clipping the bicubic overshoot. SSIM is the script's `ssim_256`: that array times 255,
Gaussian window sigma 1.2, population covariance, `data_range = gen.max() - gen.min()`. PSNR:
data_range 1 on the [0, 1] array. LPIPS: `lpips` AlexNet fed the [0, 1] array as it is,
WITHOUT `normalize=True` (the network expects [-1, 1]: PCDMs' LPIPS is not CFLD's), in
batches of 64 with the last partial batch dropped. FID: the torchvision Inception on the
same [0, 1] arrays, batches of 128, last partial batch dropped, against the training list
(`train_lst_256_png`, 48,674 images) resized the same way.
"""

from __future__ import annotations

import numpy as np

from posedata.eval.protocol import INTER_CUBIC, Protocol, cv2_resize, deepfashion_size


class PcdmsProtocol(Protocol):
    name = "pcdms"
    papers = "PCDMs, IMAGPose (IMAGPose ships no metric code; its maintainers refer to PCDMs)"
    script = "tencent-ailab/PCDMs caculate_metrics_256.py, caculate_metrics_512.py, metrics.py"
    metrics = ("ssim", "psnr", "lpips", "fid")
    ssim_sigma = 1.2
    lpips_batch = 64
    fid_batch = 128
    fid_reference = "the training list (train_lst_256_png: 48,674 images), resized like the samples"

    @property
    def size(self) -> tuple[int, int]:
        return deepfashion_size(self.stored) if self.deepfashion else self.stored

    def _resized01(self, image: np.ndarray) -> np.ndarray:
        # cv2.resize(imread(f).astype(float32), (W, H), INTER_CUBIC) / 255.0, unclipped
        return cv2_resize(image, self.size, INTER_CUBIC) / np.float32(255.0)

    def ssim_inputs(self, generated, truth):
        return self._resized01(generated) * np.float32(255.0), self._resized01(truth) * np.float32(255.0)

    def psnr_inputs(self, generated, truth):
        return self._resized01(generated), self._resized01(truth)

    def lpips_inputs(self, generated, truth):
        return self._resized01(generated), self._resized01(truth)  # [0, 1], not rescaled: as the script

    def fid_input(self, file):
        return self._resized01(file)

    def rules(self):
        h, w = self.size
        return {
            "size": f"every image cv2.resize INTER_CUBIC (float32, unclipped) to {h}x{w}, / 255",
            "lpips_input": "[0, 1] fed as is (lpips expects [-1, 1]; normalize=False)",
            "fid_input": f"[0, 1] at {h}x{w}; torchvision Inception, bilinear to 299, GFLA's affine",
        }
