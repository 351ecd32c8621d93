"""CFLD: YanzuoLu/CFLD `pose_transfer_test.py`, `models/metrics.py`, `datasets/deepfashion.py`.

Ground truths are the photos resized with torchvision's PIL `Resize(test size, BICUBIC,
antialias=True)` (256x176, `TEST.IMG_SIZE`), as [0, 1] tensors. Samples are resized to the
ground truth's size with `F.interpolate(bicubic, antialias=True)`, then `* 255`, clamped and
cast to uint8, which truncates, and divided by 255 again. SSIM: `ssim_256` (x 255, sigma 1.5,
population covariance, `data_range = gen.max() - gen.min()`). PSNR: data_range 1. LPIPS:
AlexNet with `normalize=True` ([0, 1] -> [-1, 1]). FID: torchvision Inception on [0, 1],
against every training image (`train_highres`) resized like the ground truths; every image
counts (no batch is dropped).
"""

from __future__ import annotations

from posedata.eval.protocol import Protocol, deepfashion_size, pil_bicubic, scaled, torch_bicubic_uint8


class CfldProtocol(Protocol):
    name = "cfld"
    papers = "CFLD"
    script = "YanzuoLu/CFLD pose_transfer_test.py, models/metrics.py, datasets/deepfashion.py"
    metrics = ("ssim", "psnr", "lpips", "fid")
    ssim_sigma = 1.5
    fid_reference = "every training image (train_highres), PIL bicubic to the test size"

    @property
    def size(self):
        return deepfashion_size(self.stored) if self.deepfashion else self.stored

    def truth_file(self, stored_image):
        return pil_bicubic(stored_image, self.size)

    def generated_file(self, image, truth_size):
        if image.shape[:2] == tuple(truth_size):
            return image  # already uint8 at the size: interpolate + truncate would only lose a level to rounding
        return torch_bicubic_uint8(image, truth_size)

    def lpips_inputs(self, generated, truth):
        # lpips(pred, gt, normalize=True) computes 2 * x - 1 on the [0, 1] tensors
        return scaled(generated, 2.0) - 1.0, scaled(truth, 2.0) - 1.0

    def rules(self):
        h, w = self.size
        return {
            "size": f"ground truth PIL bicubic to {h}x{w}; samples torch bicubic antialias to it, truncated to uint8",
            "lpips_input": "[0, 1] with normalize=True (-> [-1, 1])",
            "fid_input": "[0, 1] at the ground truth's size; torchvision Inception, bilinear to 299, GFLA's affine",
        }
