"""Hands for IMAGPose's joint pose: the `openpose:full` preset (controlnet-aux's hand model
through its own `detect_hands`) and the DWPose-style hand render."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.extractors import create_extractor
from posedata.extractors.base import Sample
from posedata.extractors.openpose import (
    BODY_WEIGHTS_FILE,
    HAND_WEIGHTS_FILE,
    OpenPoseExtractor,
    detect_hands,
    original_key_names,
)
from posedata.render import HAND_EDGE_COLORS, HAND_JOINT_COLOR, draw_hands, draw_openpose

HEIGHT, WIDTH = 256, 176


@pytest.fixture(scope="module")
def photos(fixtures_dir):
    paths = sorted((fixtures_dir / "deepfashion").glob("*.png"))[:2]
    return [np.asarray(Image.open(p).convert("RGB").resize((WIDTH, HEIGHT), Image.BICUBIC)) for p in paths]


def arms() -> np.ndarray:
    """Body keypoints with both arms (shoulder, elbow, wrist) so handDetect finds two boxes."""
    kp = np.zeros((18, 3), dtype=np.float32)
    kp[2], kp[3], kp[4] = (60, 60, 1), (50, 100, 1), (45, 140, 1)  # right
    kp[5], kp[6], kp[7] = (110, 60, 1), (120, 100, 1), (125, 140, 1)  # left
    return kp


def test_hand_render_lines_and_joints_as_dwpose():
    hands = np.zeros((2, 21, 3), dtype=np.float32)
    hands[0, 0], hands[0, 1] = (40, 100, 1), (80, 100, 1)  # left wrist + thumb joint 1: edge 0
    canvas = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)

    draw_hands(canvas, hands)

    assert tuple(canvas[100, 60]) == tuple(round(c) for c in HAND_EDGE_COLORS[0]) == (255, 0, 0)  # edge 0 is red
    assert tuple(canvas[100, 40]) == tuple(canvas[100, 80]) == HAND_JOINT_COLOR  # joints on top
    assert tuple(canvas[100, 44]) == HAND_JOINT_COLOR and tuple(canvas[100, 45]) != HAND_JOINT_COLOR  # radius 4
    assert canvas[:95].sum() == 0 and canvas[106:].sum() == 0  # thickness 2 line, radius 4 discs: nothing else
    # (0, 0, 0) joints and the right hand (all missing) draw nothing; hands=None is the body render
    body = draw_openpose(arms(), HEIGHT, WIDTH)
    assert np.array_equal(draw_openpose(arms(), HEIGHT, WIDTH, hands=np.zeros((2, 21, 3))), body)
    with_hands = draw_openpose(arms(), HEIGHT, WIDTH, hands=hands)
    assert np.array_equal(with_hands, draw_hands(body.copy(), hands))


def test_full_preset_stores_hands_and_draws_them(photos):
    body = OpenPoseExtractor(weights="tiny", resolution=(HEIGHT, WIDTH))
    full = create_extractor("openpose:full", weights="tiny", resolution=(HEIGHT, WIDTH))
    assert full.hands and full.preset == "full" and full.card()["preset"] == "full"
    assert "hands" not in body.fingerprint_inputs() and body.card()["preset"] is None
    assert full.fingerprint() != body.fingerprint()
    assert set(full.outputs()) == {"keypoints.npy", "skeleton.png", "hands.npy"} and "hands.npy" not in body.outputs()
    with pytest.raises(KeyError, match="no preset 'hand'"):
        create_extractor("openpose:hand", weights="tiny")

    full.setup("cpu")
    out = full([Sample(key=f"img{i}", image=im, annotations={}) for i, im in enumerate(photos)])

    for result in out:
        hands = result["hands.npy"]
        assert hands.shape == (2, 21, 3) and hands.dtype == np.float32
        assert np.array_equal(result["skeleton.png"], draw_openpose(result["keypoints.npy"], HEIGHT, WIDTH, hands=hands))


def test_detect_hands_finds_joints_inside_the_controlnet_aux_boxes(photos):
    from controlnet_aux.open_pose import util
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    extractor = create_extractor("openpose:full", weights="tiny")
    extractor.setup("cpu")
    image = np.ascontiguousarray(photos[0][:, :, ::-1])
    kp = arms()
    boxes = util.handDetect(BodyResult([Keypoint(x, y) if s > 0 else None for x, y, s in kp], 0, 0), image)
    assert len(boxes) == 2

    hands = detect_hands(extractor.hand_net, kp, image)

    found = hands[..., 2] > 0
    assert found.any()
    for x, y, w, is_left in boxes:
        side = hands[0 if is_left else 1]
        seen = side[side[:, 2] > 0]
        assert ((seen[:, 0] >= x) & (seen[:, 0] <= x + w) & (seen[:, 1] >= y) & (seen[:, 1] <= y + w)).all()
    assert (hands[~found] == 0).all()


def test_pretrained_full_loads_the_hand_checkpoint_beside_the_body_one(tmp_path):
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(0)
    hand_state = original_key_names(handpose_model().state_dict())
    torch.save(original_key_names(bodypose_model().state_dict()), tmp_path / BODY_WEIGHTS_FILE)
    torch.save(hand_state, tmp_path / HAND_WEIGHTS_FILE)

    extractor = create_extractor("openpose:full", weights="pretrained", model=str(tmp_path))
    extractor.setup("cpu")

    loaded = original_key_names(extractor.hand_net.state_dict())
    assert loaded.keys() == hand_state.keys() and all(torch.equal(loaded[k], v) for k, v in hand_state.items())
    assert extractor.fingerprint_inputs()["hands"]["weights_digest"] is not None
    (tmp_path / HAND_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no hand_pose_model.pth"):
        create_extractor("openpose:full", weights="pretrained", model=str(tmp_path)).fingerprint_inputs()


def test_pcdm_inpaint_pose_images_gain_the_hands_when_stored():
    from posedata.train.pcdm_inpaint import PcdmInpaintPlugin

    assert PcdmInpaintPlugin.needs[-1][0] == "openpose:full"  # preferred when the dataset has it
    plugin = PcdmInpaintPlugin.__new__(PcdmInpaintPlugin)  # pose_image needs only the stored size
    plugin.height, plugin.width = HEIGHT, WIDTH
    hands = np.zeros((2, 21, 3), dtype=np.float32)
    hands[1, 0], hands[1, 5] = (60, 150, 1), (70, 170, 1)
    body = {"openpose.keypoints": arms()}
    with_hands = {**body, "openpose.hands": hands}

    plain, drawn = plugin.pose_image(body, body), plugin.pose_image(with_hands, body)

    expected = draw_openpose(arms(), HEIGHT, WIDTH, hands=hands)
    assert torch.equal(drawn[:, :, :WIDTH], torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert not torch.equal(plain, drawn) and torch.equal(plain[:, :, WIDTH:], drawn[:, :, WIDTH:])


def test_a_bare_feature_name_means_the_one_without_a_preset():
    from posedata.reader import find_feature

    card = {"features": {"openpose@aaa": {"name": "openpose", "preset": None}, "openpose@bbb": {"name": "openpose", "preset": "full"},
                         "vae@c": {"name": "vae", "preset": "sd15"}, "vae@d": {"name": "vae", "preset": "sd21"}}}
    assert find_feature(card, "openpose")[0] == "openpose@aaa"  # extending with openpose:full keeps `openpose` usable
    assert find_feature(card, "openpose:full")[0] == "openpose@bbb"
    with pytest.raises(KeyError, match="several 'vae' features"):
        find_feature(card, "vae")
