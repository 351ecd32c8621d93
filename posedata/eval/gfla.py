"""GFLA: RenYurui/Global-Flow-Local-Attention `script/metrics.py`.

Image files at 256x256 for DeepFashion (128x64 for Market-1501), read as they are. SSIM
(sigma 1.5, x 255, population covariance, `data_range = gen.max() - gen.min()`), PSNR
(data_range 1), LPIPS (PerceptualSimilarity AlexNet, the model `lpips` packages, on
`/ 127.5 - 1`, batches of 64, last partial batch dropped), FID (torchvision Inception on
`/ 255`, batches of 64, last partial batch dropped, against the whole training set). On
Market-1501 also mask-LPIPS: both images `/ 127.5 - 1`, then multiplied by the target's body
mask (`produce_ma_mask`), then LPIPS.
"""

from __future__ import annotations

from posedata.eval.protocol import Protocol, pil_bicubic

DEEPFASHION_SIZE = (256, 256)


class GflaProtocol(Protocol):
    name = "gfla"
    papers = "GFLA (and the GAN-era baselines the diffusion papers copy from its tables)"
    script = "RenYurui/Global-Flow-Local-Attention script/metrics.py"
    metrics = ("ssim", "psnr", "lpips", "fid")
    market_metrics = ("mask_lpips",)
    ssim_sigma = 1.5
    lpips_batch = 64
    fid_batch = 64
    fid_reference = "the whole training set, as image files of the same size"

    @property
    def size(self):
        return DEEPFASHION_SIZE if self.deepfashion else self.stored

    def truth_file(self, stored_image):
        return pil_bicubic(stored_image, self.size)

    def generated_file(self, image, truth_size):
        return pil_bicubic(image, truth_size)

    def rules(self):
        h, w = self.size
        return {
            "size": f"files at {h}x{w} (PIL bicubic from the stored image where it differs)",
            "lpips_input": "/ 127.5 - 1 (mask-LPIPS: then times the target's body mask)",
            "fid_input": f"/ 255 at {h}x{w}; torchvision Inception, bilinear to 299, GFLA's affine",
        }
