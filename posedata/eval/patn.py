"""PATN: tengteng95/Pose-Transfer `tool/getMetrics_fashion.py`, `tool/getMetrics_market.py`.

DeepFashion images are 256x176, padded with 40 white columns on each side (`addBounding`)
to 256x256 before anything is measured; Market-1501's 128x64 are used as they are. SSIM on
the uint8 images (sigma 1.5, population covariance, `data_range = gen.max() - gen.min()`).
On Market-1501 also mask-SSIM: both images multiplied by the target's body mask
(`produce_ma_mask`) first. PATN's other number, the Inception Score (and mask-IS), is not
computed by posedata.
"""

from __future__ import annotations

from posedata.eval.protocol import Protocol, pad_white, pil_bicubic

FRAME = (256, 176)
PAD = 40


class PatnProtocol(Protocol):
    name = "patn"
    papers = "PATN (and the early GAN baselines)"
    script = "tengteng95/Pose-Transfer tool/getMetrics_fashion.py, tool/getMetrics_market.py"
    metrics = ("ssim",)
    market_metrics = ("mask_ssim",)
    ssim_sigma = 1.5

    def _file(self, image):
        return pad_white(pil_bicubic(image, FRAME), PAD) if self.deepfashion else image

    def truth_file(self, stored_image):
        return self._file(stored_image)

    def generated_file(self, image, truth_size):
        return self._file(image)

    def ssim_inputs(self, generated, truth):
        return generated, truth  # uint8, as skimage.io.imread gives them

    def rules(self):
        if not self.deepfashion:
            return {"size": f"as stored ({self.stored[0]}x{self.stored[1]}), uint8"}
        return {"size": "256x176 (PIL bicubic where the stored size differs), padded with 40 white columns each side to 256x256, uint8"}
