"""Skeleton renders from COCO-18 keypoints, cheap enough for training plugins to call at load
time on CPU.

Two styles:

- `draw_openpose`: the ControlNet / PCDMs render (controlnet-aux `draw_bodypose`): limbs as
  filled ellipses (stick width 4) in the 18-colour OpenPose palette, the whole limb canvas
  dimmed to 60 %, then filled joint circles of radius 4 at full colour on top. uint8 RGB.
- `draw_cfld`: what CFLD's data loader feeds its pose encoder: a thin anti-aliased skeleton
  (3 RGB channels in [0, 1]) followed by one Gaussian heatmap per joint (18 channels, peak 1),
  float32 [21, H, W].

Keypoints are float arrays [18, 3] of (x, y, score) in pixels of the image they belong to, in
the OpenPose COCO-18 order (`COCO18_NAMES`); a joint is drawn only when its score is above
`score_threshold` (a missing joint is stored as (0, 0, 0)).

Facts taken from controlnet-aux 0.0.10 (controlnet_aux/dwpose/util.py and
controlnet_aux/open_pose/util.py, identical to tencent-ailab/PCDMs src/controlnet_aux) and
from YanzuoLu/CFLD pose_utils.py + datasets/deepfashion.py.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

# OpenPose COCO-18 body order (the order of the body_pose_model heatmap channels). docs/design.md §4
# lists the eyes/ears as "Leye, Reye, Lear, Rear"; OpenPose's own order is right-before-left
# (14 Reye, 15 Leye, 16 Rear, 17 Lear): the limb list below links nose->14->16 on one side and
# shoulder 2 (Rsho) <-> 16 (Rear) in the association-only limbs, which fixes 16 as the right ear.
COCO18_NAMES: tuple[str, ...] = (
    "nose",
    "neck",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "r_hip",
    "r_knee",
    "r_ankle",
    "l_hip",
    "l_knee",
    "l_ankle",
    "r_eye",
    "l_eye",
    "r_ear",
    "l_ear",
)
NUM_JOINTS = len(COCO18_NAMES)

# The 17 drawn limbs, 0-based joint indices, in drawing order (controlnet-aux `limbSeq` minus 1;
# limb i is drawn in OPENPOSE_COLORS[i]).
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9),
    (9, 10), (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16),
    (0, 15), (15, 17),
)
# OpenPose's PAF association uses two more limbs (Rsho-Rear, Lsho-Lear) that are never drawn.
OPENPOSE_PAF_LIMBS: tuple[tuple[int, int], ...] = OPENPOSE_LIMBS + ((2, 16), (5, 17))

# One RGB colour per joint; limb i uses colour i too.
OPENPOSE_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
STICK_WIDTH = 4  # ellipse semi-minor axis of a limb, pixels
LIMB_DIM = 0.6  # the limb canvas is multiplied by this before the joints are drawn
JOINT_RADIUS = 4

# Hands (`openpose:full`): 21 joints per hand in the OpenPose hand order (wrist, then four
# joints per finger from thumb to little finger), stored [2, 21, 3] (left, right). Drawn as
# controlnet-aux / DWPose `draw_handpose` does, after the dimmed body: each of the 20 edges a
# cv2.line of thickness 2 in HSV colour (edge / 20, 1, 1) x 255, then every joint a filled
# circle of radius 4 in (0, 0, 255); joints within 0.01 of the image's top or left edge (the
# "missing" (0, 0) of those functions) are skipped.
NUM_HAND_JOINTS = 21
HAND_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
HAND_LINE_THICKNESS = 2
HAND_JOINT_RADIUS = 4
HAND_JOINT_COLOR = (0, 0, 255)
HAND_EPS = 0.01  # controlnet-aux's `eps`, on coordinates normalised by the image size
# float colours as matplotlib's hsv_to_rgb * 255 gives them (cv2 rounds them when drawing)
HAND_EDGE_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    tuple(c * 255 for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)) for i in range(len(HAND_EDGES))
)

# CFLD (pose_utils.py): bones are cv2.line(thickness=2, LINE_AA) in the dimmed palette
# (BONE_COLORS there == int(0.6 * colour)), joints cv2.circle(radius 3, filled, LINE_AA).
CFLD_LINE_THICKNESS = 2
CFLD_JOINT_RADIUS = 3
CFLD_SIGMA = 6.0
CFLD_CHANNELS = 3 + NUM_JOINTS  # == CFLD's POSE_GUIDANCE_CONFIG.POSE_CHANNELS (21)
CFLD_BONE_COLORS: tuple[tuple[int, int, int], ...] = tuple(
    tuple(int(c * LIMB_DIM) for c in color) for color in OPENPOSE_COLORS[: len(OPENPOSE_LIMBS)]
)


def _as_people(keypoints: np.ndarray) -> np.ndarray:
    """[18, 3] or [P, 18, 3] -> float64 [P, 18, 3]."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim == 2:
        kp = kp[None]
    if kp.ndim != 3 or kp.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"keypoints must be [18, 3] or [P, 18, 3] (x, y, score), got {kp.shape}")
    return kp


def _visible(person: np.ndarray, score_threshold: float) -> np.ndarray:
    scores = person[:, 2]
    return np.isfinite(person).all(axis=1) & (scores > score_threshold)


def draw_openpose(
    keypoints: np.ndarray,
    height: int,
    width: int,
    score_threshold: float = 0.0,
    hands: np.ndarray | None = None,
) -> np.ndarray:
    """The ControlNet / PCDMs OpenPose body render on black: uint8 RGB [height, width, 3].

    `keypoints`: [18, 3] (x, y, score) in pixels of a `height` x `width` image, or
    [P, 18, 3] for several people on one canvas. Joints with score <= `score_threshold` are
    skipped together with every limb that touches them.

    Order as controlnet-aux draws it: all limbs of all people at full colour, then the whole
    canvas times 0.6 (truncated to uint8), then every joint circle at full colour on top.

    `hands` (the `openpose:full` feature's [2, 21, 3], or [P, 2, 21, 3]): drawn on top with
    `draw_hands`, as DWPose's `draw_pose` does after the body.
    """
    people = _as_people(keypoints)
    canvas = np.zeros((int(height), int(width), 3), dtype=np.uint8)
    visible = [_visible(person, score_threshold) for person in people]

    for limb_index, (a, b) in enumerate(OPENPOSE_LIMBS):
        color = OPENPOSE_COLORS[limb_index]
        for person, seen in zip(people, visible):
            if not (seen[a] and seen[b]):
                continue
            (xa, ya), (xb, yb) = person[a, :2], person[b, :2]
            length = ((ya - yb) ** 2 + (xa - xb) ** 2) ** 0.5  # as controlnet-aux computes it
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            polygon = cv2.ellipse2Poly(
                (int((xa + xb) / 2), int((ya + yb) / 2)),
                (int(length / 2), STICK_WIDTH),
                int(angle),
                0,
                360,
                1,
            )
            cv2.fillConvexPoly(canvas, polygon, color)

    canvas = (canvas * LIMB_DIM).astype(np.uint8)

    for joint in range(NUM_JOINTS):
        for person, seen in zip(people, visible):
            if seen[joint]:
                x, y = person[joint, :2]
                cv2.circle(canvas, (int(x), int(y)), JOINT_RADIUS, OPENPOSE_COLORS[joint], thickness=-1)
    if hands is not None:
        draw_hands(canvas, hands, score_threshold)
    return canvas


def draw_hands(canvas: np.ndarray, hands: np.ndarray, score_threshold: float = 0.0) -> np.ndarray:
    """Draw hands ([21, 3], [H, 21, 3] or [P, H, 21, 3] (x, y, score) in canvas pixels) onto
    `canvas` in place, as controlnet-aux / DWPose `draw_handpose`; returns it. A joint is
    drawn when its score is above `score_threshold` and it lies more than 0.01 of the image
    size from the top and left edges (where those functions keep their "missing" joints)."""
    height, width = canvas.shape[:2]
    joints = np.asarray(hands, dtype=np.float64).reshape(-1, NUM_HAND_JOINTS, 3)
    for hand in joints:
        seen = np.isfinite(hand).all(axis=1) & (hand[:, 2] > score_threshold)
        seen &= (hand[:, 0] / width > HAND_EPS) & (hand[:, 1] / height > HAND_EPS)
        for edge, (a, b) in enumerate(HAND_EDGES):
            if seen[a] and seen[b]:
                cv2.line(canvas, (int(hand[a, 0]), int(hand[a, 1])), (int(hand[b, 0]), int(hand[b, 1])), HAND_EDGE_COLORS[edge], thickness=HAND_LINE_THICKNESS)
        for joint in np.flatnonzero(seen):
            cv2.circle(canvas, (int(hand[joint, 0]), int(hand[joint, 1])), HAND_JOINT_RADIUS, HAND_JOINT_COLOR, thickness=-1)
    return canvas


def draw_openpose_batch(
    keypoints: np.ndarray, height: int, width: int, score_threshold: float = 0.0
) -> np.ndarray:
    """`draw_openpose` over a batch of single people [B, 18, 3] -> uint8 [B, H, W, 3]."""
    batch = np.asarray(keypoints)
    out = np.zeros((len(batch), int(height), int(width), 3), dtype=np.uint8)
    for i, person in enumerate(batch):
        out[i] = draw_openpose(person, height, width, score_threshold)
    return out


def cfld_heatmaps(
    keypoints: np.ndarray,
    height: int,
    width: int,
    sigma: float = CFLD_SIGMA,
    source_size: tuple[int, int] | None = None,
    score_threshold: float = 0.0,
) -> np.ndarray:
    """CFLD `cords_to_map`: float32 [18, height, width], channel j = exp(-d^2 / (2 sigma^2))
    around joint j (peak exactly 1 at the joint's integer pixel), all zeros for a missing joint.

    `source_size` = (H0, W0) of the frame the keypoints are in (CFLD: the 256x176 annotation
    frame); coordinates are scaled as CFLD does (y / H0 * height, x / W0 * width) and truncated
    to int. Default (None): the keypoints are already in `height` x `width` pixels and are only
    truncated.
    """
    people = _as_people(keypoints)
    if len(people) != 1:
        raise ValueError("cfld_heatmaps draws one person ([18, 3])")
    person = people[0]
    src_h, src_w = source_size or (height, width)
    seen = _visible(person, score_threshold)
    maps = np.zeros((NUM_JOINTS, int(height), int(width)), dtype=np.float32)
    rows = np.arange(int(height), dtype=np.float64)
    cols = np.arange(int(width), dtype=np.float64)
    for j in np.flatnonzero(seen):
        x, y = person[j, :2]
        if source_size is None:
            cy, cx = int(y), int(x)
        else:
            # CFLD's exact arithmetic (point / old_size * img_size, then int), kept even though
            # it can land one pixel low at equal sizes (30 / 176 * 176 = 29.999...).
            cy, cx = int(y / src_h * height), int(x / src_w * width)
        # exp(-(dy^2 + dx^2) / 2s^2) factorises: two 1-D exps and an outer product instead of
        # H*W exps per joint (same values to float32 precision).
        gy = np.exp(-((rows - cy) ** 2) / (2 * sigma**2))
        gx = np.exp(-((cols - cx) ** 2) / (2 * sigma**2))
        maps[j] = np.outer(gy, gx)
    return maps


def cfld_skeleton(
    keypoints: np.ndarray,
    height: int,
    width: int,
    source_size: tuple[int, int] | None = None,
    score_threshold: float = 0.0,
) -> np.ndarray:
    """CFLD `draw_pose_from_cords`: uint8 RGB [height, width, 3], anti-aliased bones of
    thickness 2 in the dimmed palette, then joint discs of radius 3 in full colour."""
    people = _as_people(keypoints)
    if len(people) != 1:
        raise ValueError("cfld_skeleton draws one person ([18, 3])")
    person = people[0]
    src_h, src_w = source_size or (height, width)
    scale_y, scale_x = height / src_h, width / src_w
    seen = _visible(person, score_threshold)
    canvas = np.zeros((int(height), int(width), 3), dtype=np.uint8)

    def point(j: int) -> tuple[int, int]:
        return int(person[j, 0] * scale_x), int(person[j, 1] * scale_y)

    for limb_index, (a, b) in enumerate(OPENPOSE_LIMBS):
        if seen[a] and seen[b]:
            cv2.line(canvas, point(a), point(b), CFLD_BONE_COLORS[limb_index], CFLD_LINE_THICKNESS, cv2.LINE_AA)
    for j in np.flatnonzero(seen):
        cv2.circle(canvas, point(int(j)), CFLD_JOINT_RADIUS, OPENPOSE_COLORS[j], -1, cv2.LINE_AA)
    return canvas


def draw_cfld(
    keypoints: np.ndarray,
    height: int,
    width: int,
    sigma: float = CFLD_SIGMA,
    source_size: tuple[int, int] | None = None,
    score_threshold: float = 0.0,
) -> np.ndarray:
    """The pose tensor CFLD's PoseEncoder consumes (`build_pose_img`): float32 [21, H, W].

    Channels 0-2: `cfld_skeleton` as R, G, B divided by 255 (values in [0, 1]).
    Channels 3-20: `cfld_heatmaps`, one per joint in COCO18_NAMES order (values in [0, 1],
    exactly 1 at each present joint, all zeros for a missing joint).
    """
    skeleton = cfld_skeleton(keypoints, height, width, source_size, score_threshold)
    heatmaps = cfld_heatmaps(keypoints, height, width, sigma, source_size, score_threshold)
    # divide in float64 then cast, as CFLD does (torch.tensor(img / 255., dtype=float32))
    skeleton_chw = (skeleton.transpose(2, 0, 1) / 255.0).astype(np.float32)
    return np.concatenate([skeleton_chw, heatmaps], axis=0)
