"""OpenPoseExtractor: shapes on real photos (tiny weights), fingerprints, the real weights
loading path, and keypoint decoding from synthetic network outputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.extractors import create_extractor
from posedata.extractors.base import NOTES, Sample
from posedata.extractors.openpose import (
    BODY_WEIGHTS_FILE,
    PAF_CHANNELS,
    STRIDE,
    OpenPoseExtractor,
    decode_network_outputs,
    network_input_shape,
    original_key_names,
    select_person,
)
from posedata.render import OPENPOSE_PAF_LIMBS, draw_openpose

HEIGHT, WIDTH = 256, 176


@pytest.fixture(scope="module")
def photos(fixtures_dir):
    """The DeepFashion fixture photos at the 256 x 176 stored resolution, RGB uint8."""
    paths = sorted((fixtures_dir / "deepfashion").glob("*.png")) + sorted((fixtures_dir / "deepfashion").glob("*.jpg"))
    assert len(paths) >= 3
    return [np.asarray(Image.open(p).convert("RGB").resize((WIDTH, HEIGHT), Image.BICUBIC)) for p in paths]


@pytest.fixture(scope="module")
def tiny(photos):
    extractor = OpenPoseExtractor(weights="tiny", resolution=(HEIGHT, WIDTH))
    extractor.setup("cpu")
    return extractor


def samples(images):
    return [Sample(key=f"img{i}", image=image, annotations={}) for i, image in enumerate(images)]


def test_tiny_on_real_photos(tiny, photos):
    out = tiny(samples(photos))
    assert len(out) == len(photos)
    assert set(tiny.outputs()) == {"keypoints.npy", "skeleton.png"}
    for result in out:
        assert set(result) == set(tiny.outputs()) | {NOTES}
        kp, skeleton = result["keypoints.npy"], result["skeleton.png"]
        assert kp.shape == (18, 3) and kp.dtype == np.float32
        assert skeleton.shape == (HEIGHT, WIDTH, 3) and skeleton.dtype == np.uint8
        assert np.array_equal(skeleton, draw_openpose(kp, HEIGHT, WIDTH))
        present = kp[:, 2] > 0
        assert np.all(kp[~present] == 0)
        assert np.all((kp[present, 0] >= 0) & (kp[present, 0] < WIDTH) & (kp[present, 1] >= 0) & (kp[present, 1] < HEIGHT))
    # deterministic, and the batched forward gives what one-image batches give
    again = tiny(samples(photos[:1]))
    assert np.array_equal(again[0]["keypoints.npy"], out[0]["keypoints.npy"])
    assert tiny.null_embedding() is None


def test_batched_forward_equals_single_forward(tiny, photos):
    from posedata.extractors.openpose import preprocess_for_body

    inputs = np.stack([preprocess_for_body(np.ascontiguousarray(p[:, :, ::-1])) for p in photos])
    paf_batch, heat_batch = tiny.forward(inputs)
    paf_one, heat_one = tiny.forward(inputs[1:2])
    assert paf_batch.shape == (len(photos), 38, *(s // STRIDE for s in network_input_shape(HEIGHT, WIDTH)))
    assert heat_batch.shape[1] == 19
    assert np.allclose(paf_batch[1], paf_one[0], atol=1e-5) and np.allclose(heat_batch[1], heat_one[0], atol=1e-5)


def test_network_sees_bgr_like_controlnet_aux(tiny):
    """Body expects BGR: a pure red RGB image must reach the network with red in channel 2."""
    seen = []
    real_net = tiny.net

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return real_net(x)

    red = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    red[..., 0] = 255
    tiny.net = Recorder()
    try:
        tiny(samples([red]))
    finally:
        tiny.net = real_net
    x = seen[0][0]
    assert torch.allclose(x[0, :100, :100], torch.tensor(-0.5))  # blue (right columns are padding)
    assert torch.allclose(x[2, :100, :100], torch.tensor(255 / 256 - 0.5))  # red


def test_fingerprints():
    fp = {w: OpenPoseExtractor(weights=w).fingerprint() for w in ("pretrained", "random", "tiny")}
    assert len(set(fp.values())) == 3
    assert OpenPoseExtractor(weights="tiny").fingerprint() == fp["tiny"]
    assert OpenPoseExtractor(weights="tiny", seed=1).fingerprint() != fp["tiny"]
    assert OpenPoseExtractor(weights="tiny", resolution=(256, 176)).fingerprint() != fp["tiny"]
    # dtype is fixed: keypoints are float32 whatever the build asks for
    assert OpenPoseExtractor(weights="tiny", dtype="fp16").fingerprint() == fp["tiny"]
    inputs = OpenPoseExtractor().fingerprint_inputs()
    assert inputs["preprocessing"]["boxsize"] == 368 and inputs["preprocessing"]["stride"] == 8
    assert inputs["postprocessing"]["peak_threshold"] == 0.1
    assert create_extractor("openpose", weights="tiny").folder.startswith("openpose@")


@pytest.fixture(scope="module")
def saved_body_weights(tmp_path_factory):
    """A full-size bodypose_model with random weights, saved the way lllyasviel's
    body_pose_model.pth is keyed (no `model0.` / `model1_1.` block prefixes)."""
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(1234)
    net = bodypose_model()
    state = original_key_names(net.state_dict())
    assert "conv1_1.weight" in state and "Mconv7_stage6_L2.bias" in state
    folder = tmp_path_factory.mktemp("annotators")
    torch.save(state, folder / BODY_WEIGHTS_FILE)
    return folder, state


def assert_loaded(extractor, state):
    loaded = original_key_names(extractor.net.state_dict())
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not extractor.net.training
    assert not any(p.requires_grad for p in extractor.net.parameters())


def test_pretrained_loads_original_checkpoint_from_a_folder(saved_body_weights):
    folder, state = saved_body_weights
    extractor = OpenPoseExtractor(weights="pretrained", model=str(folder))
    extractor.setup("cpu")
    assert_loaded(extractor, state)
    # a local folder's fingerprint carries a digest of its files
    assert extractor.fingerprint_inputs()["weights_digest"] is not None
    # ...and a direct path to the .pth file works too
    direct = OpenPoseExtractor(weights="pretrained", model=str(folder / BODY_WEIGHTS_FILE))
    direct.setup("cpu")
    assert_loaded(direct, state)
    assert direct.fingerprint_inputs()["weights_digest"] is not None


def test_pretrained_hub_id_goes_through_hf_hub_download(saved_body_weights, monkeypatch):
    import huggingface_hub

    folder, state = saved_body_weights
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(folder / BODY_WEIGHTS_FILE)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    extractor = OpenPoseExtractor(weights="pretrained")
    extractor.setup("cpu")
    assert calls == [("lllyasviel/Annotators", "body_pose_model.pth")]
    assert_loaded(extractor, state)


def test_random_weights_are_seeded():
    a, b = OpenPoseExtractor(weights="tiny", seed=3), OpenPoseExtractor(weights="tiny", seed=3)
    a.setup("cpu")
    b.setup("cpu")
    for (name, pa), pb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(pa, pb), name
    full = OpenPoseExtractor(weights="random").build_net()
    assert sum(p.numel() for p in full.parameters()) > 50_000_000  # the full bodypose_model


# ---- decoding -----------------------------------------------------------------------------

# One person in a 256 x 176 image, (x, y) per COCO-18 joint.
PERSON = np.array(
    [
        (88, 40), (88, 62), (66, 64), (60, 96), (58, 126), (110, 64), (116, 96), (118, 126),
        (76, 130), (74, 178), (72, 226), (100, 130), (102, 178), (104, 226), (82, 34), (94, 34),
        (74, 40), (102, 40),
    ],
    dtype=float,
)


def synthetic_outputs(people, height=HEIGHT, width=WIDTH):
    """Network outputs at stride 8 for `people` ([P, 18, 2] image pixels): a Gaussian peak per
    joint in its heatmap channel and, for each PAF limb, its unit vector in a band along it."""
    grid_h, grid_w = (s // STRIDE for s in network_input_shape(height, width))
    # image pixel -> output cell (pixel-centre mapping through Body's two resizes)
    resized_h, resized_w = int(height * 0.5 * 368 / height), int(width * 0.5 * 368 / height)

    def to_grid(x, y):
        return (x + 0.5) * resized_w / width / STRIDE - 0.5, (y + 0.5) * resized_h / height / STRIDE - 0.5

    gy, gx = np.mgrid[0:grid_h, 0:grid_w].astype(float)
    heatmap = np.zeros((19, grid_h, grid_w), np.float32)
    paf = np.zeros((38, grid_h, grid_w), np.float32)
    for person in people:
        for j, (x, y) in enumerate(person):
            cx, cy = to_grid(x, y)
            heatmap[j] = np.maximum(heatmap[j], np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * 0.8**2)))
        for (a, b), (ch_x, ch_y) in zip(OPENPOSE_PAF_LIMBS, PAF_CHANNELS):
            direction = person[b] - person[a]
            direction /= np.linalg.norm(direction)
            (ax, ay), (bx, by) = to_grid(*person[a]), to_grid(*person[b])
            seg = np.array([bx - ax, by - ay])
            t = np.clip(((gx - ax) * seg[0] + (gy - ay) * seg[1]) / max(seg @ seg, 1e-9), 0, 1)
            near = np.hypot(gx - (ax + t * seg[0]), gy - (ay + t * seg[1])) <= 1.0
            paf[ch_x][near], paf[ch_y][near] = direction
    heatmap[18] = 1 - heatmap[:18].max(axis=0)
    return paf, heatmap


def test_decoding_recovers_joints_in_image_pixels():
    paf, heatmap = synthetic_outputs([PERSON])
    candidate, subset = decode_network_outputs(paf, heatmap, HEIGHT, WIDTH)
    assert len(subset) == 1
    kp = select_person(candidate, subset)
    assert kp.dtype == np.float32 and kp.shape == (18, 3)
    assert np.all(kp[:, 2] > 0.5)
    error = np.abs(kp[:, :2] - PERSON)
    assert error.max() <= 1.0, error


def test_decoding_through_the_extractor(tiny, monkeypatch):
    """The same synthetic outputs fed through __call__ (network replaced) land in keypoints.npy."""
    paf, heatmap = synthetic_outputs([PERSON])
    monkeypatch.setattr(tiny, "forward", lambda inputs: (np.stack([paf] * len(inputs)), np.stack([heatmap] * len(inputs))))
    out = tiny(samples([np.zeros((HEIGHT, WIDTH, 3), np.uint8)] * 2))
    for result in out:
        assert np.abs(result["keypoints.npy"][:, :2] - PERSON).max() <= 1.0
        assert result["skeleton.png"].any()


def test_no_person_is_all_zeros(tiny, monkeypatch):
    paf, heatmap = synthetic_outputs([])
    candidate, subset = decode_network_outputs(paf, heatmap, HEIGHT, WIDTH)
    assert len(subset) == 0
    assert not select_person(candidate, subset).any()
    monkeypatch.setattr(tiny, "forward", lambda inputs: (paf[None], heatmap[None]))
    (result,) = tiny(samples([np.zeros((HEIGHT, WIDTH, 3), np.uint8)]))
    assert not result["keypoints.npy"].any() and not result["skeleton.png"].any()


def test_select_person_keeps_highest_total_score():
    candidate = np.array([[10, 20, 0.9, 0], [30, 40, 0.8, 1], [50, 60, 0.7, 2], [70, 80, 0.6, 3]], float)
    subset = -np.ones((2, 20))
    subset[0, [0, 1]] = [0, 1]
    subset[0, 18:] = [3.0, 2]
    subset[1, [0, 1, 2]] = [2, 3, 1]
    subset[1, 18:] = [5.0, 3]
    kp = select_person(candidate, subset)
    assert np.allclose(kp[:3], [[50, 60, 0.7], [70, 80, 0.6], [30, 40, 0.8]])
    assert not kp[3:].any()


def test_pose_notes_name_what_inspect_counts():
    from posedata.extractors.openpose import pose_notes

    nobody = np.zeros((18, 3), np.float32)
    assert pose_notes(nobody, people=0) == ["no person"]
    whole = np.ones((18, 3), np.float32)
    assert pose_notes(whole, people=1) == []
    assert pose_notes(whole, people=2) == ["several people (kept the highest-scoring)"]
    cut_off = whole.copy()
    cut_off[5:, 2] = 0  # only 5 joints
    assert pose_notes(cut_off, people=1) == ["fewer than 8 joints (cut off or occluded)"]
