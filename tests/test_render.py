"""Pixel-level checks of posedata.render against hand-computed values, controlnet-aux's own
draw_bodypose, and the PCDMs skeleton renders in the fixtures."""

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from posedata.render import (
    CFLD_BONE_COLORS,
    CFLD_CHANNELS,
    COCO18_NAMES,
    OPENPOSE_COLORS,
    OPENPOSE_LIMBS,
    cfld_heatmaps,
    draw_cfld,
    draw_openpose,
    draw_openpose_batch,
)

NECK, R_SHOULDER, R_ELBOW = 1, 2, 3


def pose(**joints) -> np.ndarray:
    """[18, 3] with the named joints present (score 1) and all others missing."""
    kp = np.zeros((18, 3))
    for name, (x, y) in joints.items():
        kp[COCO18_NAMES.index(name)] = (x, y, 1.0)
    return kp


# A plausible standing person in a 256 x 176 frame, off-integer so int() truncation is stable
# under the normalise / de-normalise round trip controlnet-aux's API needs.
STANDING = np.array(
    [
        (88.3, 40.4), (88.6, 62.2), (68.1, 64.7), (62.4, 96.3), (60.2, 126.6), (108.7, 64.1),
        (114.3, 96.8), (116.2, 126.4), (76.6, 130.3), (74.4, 178.2), (72.3, 226.7), (100.2, 130.6),
        (102.8, 178.3), (104.6, 226.1), (84.2, 36.3), (92.7, 36.2), (78.4, 40.8), (98.3, 40.6),
    ]
)


def standing(score=1.0) -> np.ndarray:
    return np.concatenate([STANDING, np.full((18, 1), score)], axis=1)


def test_names_limbs_and_palette_follow_openpose():
    assert COCO18_NAMES[:2] == ("nose", "neck")
    assert COCO18_NAMES[14:] == ("r_eye", "l_eye", "r_ear", "l_ear")
    assert len(OPENPOSE_LIMBS) == 17 and len(OPENPOSE_COLORS) == 18
    assert OPENPOSE_LIMBS[0] == (NECK, R_SHOULDER) and OPENPOSE_LIMBS[12] == (1, 0)
    assert OPENPOSE_COLORS[0] == (255, 0, 0) and OPENPOSE_COLORS[12] == (0, 0, 255)
    assert CFLD_BONE_COLORS[0] == (153, 0, 0) and CFLD_BONE_COLORS[2] == (153, 102, 0)


def test_single_joint_is_a_radius_4_disc_in_full_colour():
    canvas = draw_openpose(pose(r_elbow=(10, 20)), 40, 30)
    assert canvas.shape == (40, 30, 3) and canvas.dtype == np.uint8
    color = OPENPOSE_COLORS[R_ELBOW]  # (255, 255, 0)
    assert tuple(canvas[20, 10]) == color
    for x, y in [(14, 20), (6, 20), (10, 16), (10, 24), (12, 22)]:  # inside radius 4
        assert tuple(canvas[y, x]) == color, (x, y)
    for x, y in [(15, 20), (5, 20), (10, 25), (13, 23)]:  # outside
        assert tuple(canvas[y, x]) == (0, 0, 0), (x, y)
    ys, xs = np.nonzero(canvas.any(axis=-1))
    assert np.hypot(xs - 10, ys - 20).max() <= 4.0
    assert len(xs) == 49  # cv2's filled radius-4 circle
    assert {tuple(canvas[y, x]) for y, x in zip(ys, xs)} == {color}


def test_single_limb_is_dimmed_by_0_6_and_joints_are_drawn_on_top():
    canvas = draw_openpose(pose(neck=(20, 50), r_shoulder=(80, 50)), 100, 100)
    limb = (153, 0, 0)  # 0.6 * (255, 0, 0): limb 0 neck -> r_shoulder
    assert tuple(canvas[50, 50]) == limb  # midpoint
    assert tuple(canvas[46, 50]) == limb and tuple(canvas[54, 50]) == limb  # stick width 4
    assert tuple(canvas[45, 50]) == (0, 0, 0) and tuple(canvas[55, 50]) == (0, 0, 0)
    assert tuple(canvas[50, 25]) == limb
    # joint circles are not dimmed and cover the limb ends
    assert tuple(canvas[50, 20]) == OPENPOSE_COLORS[NECK]
    assert tuple(canvas[50, 23]) == OPENPOSE_COLORS[NECK]
    assert tuple(canvas[50, 80]) == OPENPOSE_COLORS[R_SHOULDER]


def test_second_limb_uses_its_own_dimmed_colour():
    canvas = draw_openpose(pose(neck=(20, 20), r_shoulder=(20, 60), r_elbow=(20, 100)), 120, 40)
    assert tuple(canvas[80, 20]) == (153, 102, 0)  # 0.6 * (255, 170, 0): limb 2 r_shoulder -> r_elbow
    assert tuple(canvas[40, 20]) == (153, 0, 0)


def test_missing_joint_draws_nothing_of_its_own():
    kp = pose(neck=(20, 50), r_shoulder=(80, 50))
    kp[R_SHOULDER, 2] = 0.0
    canvas = draw_openpose(kp, 100, 100)
    assert tuple(canvas[50, 50]) == (0, 0, 0)  # no limb
    assert tuple(canvas[50, 80]) == (0, 0, 0)  # no joint
    ys, xs = np.nonzero(canvas.any(axis=-1))
    assert np.hypot(xs - 20, ys - 50).max() <= 4.0  # only the neck disc
    assert not draw_openpose(np.zeros((18, 3)), 32, 32).any()


def test_score_threshold():
    kp = pose(neck=(20, 50), r_shoulder=(80, 50))
    kp[R_SHOULDER, 2] = 0.2
    assert tuple(draw_openpose(kp, 100, 100, score_threshold=0.1)[50, 50]) == (153, 0, 0)
    assert tuple(draw_openpose(kp, 100, 100, score_threshold=0.3)[50, 50]) == (0, 0, 0)


def test_several_people_and_batch():
    one, two = standing(), standing()
    two[:, 0] += 40
    both = draw_openpose(np.stack([one, two]), 256, 256)
    alone_one, alone_two = draw_openpose(one, 256, 256), draw_openpose(two, 256, 256)
    only_one = alone_one.any(axis=-1) & ~alone_two.any(axis=-1)
    only_two = alone_two.any(axis=-1) & ~alone_one.any(axis=-1)
    assert only_one.sum() > 500 and only_two.sum() > 500
    assert np.array_equal(both[only_one], alone_one[only_one])
    assert np.array_equal(both[only_two], alone_two[only_two])
    batch = draw_openpose_batch(np.stack([one, two]), 256, 176)
    assert batch.shape == (2, 256, 176, 3)
    assert np.array_equal(batch[1], draw_openpose(two, 256, 176))
    with pytest.raises(ValueError):
        draw_openpose(np.zeros((17, 3)), 10, 10)


def test_identical_to_controlnet_aux_draw_bodypose():
    from controlnet_aux.dwpose import util as dwpose_util
    from controlnet_aux.open_pose import util as openpose_util
    from controlnet_aux.open_pose.body import Keypoint

    height, width = 256, 176
    kp = standing()
    kp[9, 2] = 0.0  # a missing knee drops two limbs

    # DWPose / PCDMs API: normalised candidate + subset, whole canvas dimmed after the limbs
    candidate = np.stack([kp[:, 0] / width, kp[:, 1] / height], axis=1)
    subset = np.where(kp[:, 2] > 0, np.arange(18), -1)[None].astype(float)
    expected = dwpose_util.draw_bodypose(np.zeros((height, width, 3), np.uint8), candidate, subset)
    assert np.array_equal(draw_openpose(kp, height, width), expected)

    # controlnet-aux OpenposeDetector API: dimmed colours per limb; same pixels on black
    keypoints = [Keypoint(x / width, y / height) if s > 0 else None for x, y, s in kp]
    expected = openpose_util.draw_bodypose(np.zeros((height, width, 3), np.uint8), keypoints)
    assert np.array_equal(draw_openpose(kp, height, width), expected)


def fixture_joints(render: np.ndarray) -> np.ndarray:
    """Joint centres in a PCDMs render: each joint is a disc in its full palette colour (limbs
    are dimmed, so full colours only occur in joints and the thin hand lines)."""
    kp = np.zeros((18, 3))
    for j, color in enumerate(OPENPOSE_COLORS):
        mask = np.all(render == color, axis=-1).astype(np.uint8)
        n, _, stats, centres = cv2.connectedComponentsWithStats(mask)
        discs = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= 100]
        if discs:
            kp[j] = (*centres[discs[0]], 1.0)
    return kp


@pytest.mark.parametrize("index", [1, 2])
def test_matches_pcdms_render_fixture(fixtures_dir, index):
    """The fixtures are DWPose renders drawn at 512 x 512 and upscaled 2x (bilinear) to 1024:
    recover the joints, draw them at 512, upscale the same way, and compare the body."""
    render = np.asarray(Image.open(fixtures_dir / "poses" / f"pcdms_dwpose_render{index}.png").convert("RGB"))
    joints = fixture_joints(render)
    assert joints[:, 2].sum() >= 14
    at_512 = joints.copy()
    at_512[:, :2] = (joints[:, :2] + 0.5) / 2 - 0.5  # pixel-centre mapping of a 2x resize
    ours = cv2.resize(draw_openpose(at_512, 512, 512), (1024, 1024), interpolation=cv2.INTER_LINEAR)
    ours_on, theirs_on = ours.any(axis=-1), render.any(axis=-1)
    iou = (ours_on & theirs_on).sum() / (ours_on | theirs_on).sum()
    same_colour = np.all(ours == render, axis=-1)[ours_on].mean()
    assert iou > 0.8, iou  # the rest is the fixture's hands, which we do not draw
    assert same_colour > 0.75, same_colour
    # the limbs' dimmed colours appear in the fixture where we draw them
    for limb_index, (a, b) in enumerate(OPENPOSE_LIMBS):
        if joints[a, 2] and joints[b, 2]:
            mx, my = ((joints[a, :2] + joints[b, :2]) / 2).round().astype(int)
            if math.dist(joints[a, :2], joints[b, :2]) > 40:
                assert tuple(render[my, mx]) == tuple(int(c * 0.6) for c in OPENPOSE_COLORS[limb_index])


# ---- CFLD ------------------------------------------------------------------------------------


def test_cfld_heatmap_peak_and_falloff():
    sigma = 6.0
    maps = cfld_heatmaps(pose(r_elbow=(30, 40)), 256, 176, sigma=sigma)
    assert maps.shape == (18, 256, 176) and maps.dtype == np.float32
    channel = maps[R_ELBOW]
    assert channel[40, 30] == 1.0 and channel.max() == 1.0
    assert np.unravel_index(channel.argmax(), channel.shape) == (40, 30)
    assert channel[43, 34] == pytest.approx(math.exp(-(3**2 + 4**2) / (2 * sigma**2)), rel=1e-6)
    assert channel[40, 30 + 12] == pytest.approx(math.exp(-144 / 72), rel=1e-6)
    assert not maps[NECK].any()  # missing joint: zero channel
    assert maps.min() >= 0.0


def test_cfld_coordinates_truncate_and_rescale_like_cfld():
    maps = cfld_heatmaps(pose(neck=(30.9, 40.7)), 64, 64)
    assert maps[NECK][40, 30] == 1.0  # int(), not round()
    # keypoints in CFLD's 256 x 176 annotation frame drawn at 512 x 352
    maps = cfld_heatmaps(pose(neck=(88, 128)), 512, 352, source_size=(256, 176))
    assert maps[NECK][256, 176] == 1.0
    # bug-compatible with CFLD at equal sizes: 30 / 176 * 176 == 29.999... -> column 29
    maps = cfld_heatmaps(pose(neck=(30, 40)), 256, 176, source_size=(256, 176))
    assert maps[NECK][40, 29] == 1.0


def test_draw_cfld_layout():
    kp = pose(neck=(20, 50), r_shoulder=(80, 50))
    out = draw_cfld(kp, 100, 100)
    assert out.shape == (CFLD_CHANNELS, 100, 100) == (21, 100, 100) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    rgb = out[:3]
    assert np.allclose(rgb[:, 50, 50] * 255, (153, 0, 0))  # bone colour at the line's middle
    assert np.allclose(rgb[:, 50, 20] * 255, OPENPOSE_COLORS[NECK])  # joint disc
    assert not rgb[:, 60, 50].any()  # thin line: nothing 10 px off it
    assert out[3 + NECK][50, 20] == 1.0 and out[3 + R_SHOULDER][50, 80] == 1.0
    assert not out[3 + R_ELBOW].any()
    missing = kp.copy()
    missing[R_SHOULDER, 2] = 0
    assert not draw_cfld(missing, 100, 100)[:3, 50, 50].any()
