"""PATN: tengteng95/Pose-Transfer `tool/getMetrics_fashion.py`, `tool/getMetrics_market.py`.

DeepFashion images are 256x176, padded with 40 white columns on each side (`addBounding`)
to 256x256 before anything is measured; Market-1501's 128x64 are used as they are. SSIM on
the uint8 images (sigma 1.5, population covariance, `data_range = gen.max() - gen.min()`).
On Market-1501 also mask-SSIM: both images multiplied by the target's body mask
(`produce_ma_mask`) first.

The Inception Score (`tool/inception_score.py`, OpenAI's): every generated file (padded, on
DeepFashion) fed to the TF Inception (`classify_image_graph_def.pb`, which resizes to 299
bilinearly and scales `(x - 128) / 128`), softmax of `pool_3 @ W` (the logits MatMul's
weight, no bias) over its 1008 classes, in 10 splits. posedata uses pytorch-fid's port of
that network and its weights (`pt_inception-2015-12-05-6726825d.pth`), which scales
`x / 127.5 - 1` and resizes with PyTorch's bilinear: close to, not bit-equal with, the TF
graph. On Market-1501 also mask-IS: the generated images masked as for mask-SSIM.
"""

from __future__ import annotations

from posedata.eval.protocol import Protocol, pad_white, pil_bicubic

FRAME = (256, 176)
PAD = 40


class PatnProtocol(Protocol):
    name = "patn"
    papers = "PATN (and the early GAN baselines)"
    script = "tengteng95/Pose-Transfer tool/getMetrics_fashion.py, tool/getMetrics_market.py"
    metrics = ("is", "ssim")  # PATN's tables: IS, SSIM (Market-1501: + mask-IS, mask-SSIM)
    market_metrics = ("mask_is", "mask_ssim")
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
        inception_score = f"TF Inception (pytorch-fid port) 1008-class softmax of pool_3 @ W (no bias), {self.inception_splits} splits, generated files in sorted order"
        if not self.deepfashion:
            return {"size": f"as stored ({self.stored[0]}x{self.stored[1]}), uint8", "inception_score": inception_score}
        return {"size": "256x176 (PIL bicubic where the stored size differs), padded with 40 white columns each side to 256x256, uint8", "inception_score": inception_score}
