"""The body mask of the Market-1501 masked metrics (PATN's mask-SSIM, GFLA's mask-LPIPS).

As `produce_ma_mask` in PATN's `tool/pose_utils.py` (copied into GFLA's and PIDM's
metrics): a quadrilateral of half-width 4 px along each of 23 limbs (the COCO-18 limbs plus
shoulder-hip, hip-hip and ear-ear cross links), a disc of radius 4 on each joint, then a
5 x 5 dilation followed by a 5 x 5 erosion (a closing). Joints missing from the annotation
(the CSVs write -1; posedata stores score 0) are left out, with their limbs.
"""

from __future__ import annotations

import numpy as np
from skimage.draw import disk, polygon
from skimage.morphology import dilation, erosion, footprint_rectangle

RADIUS = 4
# 1-based COCO-18 joint pairs, as the official list writes them
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
    (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (2, 17), (2, 18), (9, 12), (12, 6), (9, 3), (17, 18),
)  # fmt: skip


def body_mask(keypoints: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W] from COCO-18 keypoints [18, 3] (x, y, score) in the image's pixels."""
    keypoints = np.asarray(keypoints, np.float64)
    present = keypoints[:, 2] > 0
    yx = keypoints[:, [1, 0]]
    mask = np.zeros(size, dtype=bool)
    for a, b in LIMBS:
        a, b = a - 1, b - 1
        if not (present[a] and present[b]):
            continue
        along = yx[a] - yx[b]
        length = np.linalg.norm(along)
        if length == 0:
            continue  # the official code divides by zero here and draws nothing
        normal = RADIUS * np.array([-along[1], along[0]]) / length
        corners = np.array([yx[a] + normal, yx[a] - normal, yx[b] - normal, yx[b] + normal])
        rr, cc = polygon(corners[:, 0], corners[:, 1], shape=size)
        mask[rr, cc] = True
    for joint in np.flatnonzero(present):
        rr, cc = disk((yx[joint, 0], yx[joint, 1]), RADIUS, shape=size)
        mask[rr, cc] = True
    square = footprint_rectangle((5, 5))
    return erosion(dilation(mask, square), square)
