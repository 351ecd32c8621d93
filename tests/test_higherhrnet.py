"""HigherHRNetExtractor and posedata.models.higherhrnet: the official checkpoint's key names and
shapes, the real weights loading path, shapes on real photos (tiny weights), decoding on
synthetic heatmaps and tags, and gradients from the pose features to the input pose map."""

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.extractors.base import NOTES, Sample
from posedata.extractors.higherhrnet import (
    COCO17_NAMES,
    RENDER_SCORE_THRESHOLD,
    WEIGHTS_FILE,
    HigherHRNetExtractor,
    coco17_to_coco18,
    render_pose_map,
)
from posedata.models import higherhrnet as hh
from posedata.render import COCO18_NAMES, draw_openpose

HEIGHT, WIDTH = 256, 176

# sha256 over the sorted "key:shape" lines of the official network's state dict, computed from
# HRNet/HigherHRNet-Human-Pose-Estimation lib/models/pose_higher_hrnet.py (commit aa23881)
# built with experiments/coco/higher_hrnet/w32_512_adam_lr1e-3.yaml: 1810 entries, 28,645,331
# parameters (the README's "28.6M"). The same build, loaded with our mapped weights, gives
# outputs identical to ours (checked once by hand; the official code is not a test dependency).
OFFICIAL_KEYS_DIGEST = "bae16e2981b1bb98ac11e40c65c1607e970ccc31b1e13993fcd363bb3df6003a"
OFFICIAL_NUM_KEYS = 1810
OFFICIAL_NUM_PARAMS = 28_645_331


def key_shape_digest(state_dict):
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state_dict.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def w32():
    return hh.build_higherhrnet(hh.W32_CONFIG, seed=3, zero_init_last=True).eval()


@pytest.fixture(scope="module")
def photos(fixtures_dir):
    """The DeepFashion fixture photos at the 256 x 176 stored resolution, RGB uint8."""
    folder = fixtures_dir / "deepfashion"
    paths = sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg"))
    assert len(paths) >= 3
    return [np.asarray(Image.open(p).convert("RGB").resize((WIDTH, HEIGHT), Image.BICUBIC)) for p in paths]


@pytest.fixture(scope="module")
def tiny():
    extractor = HigherHRNetExtractor(weights="tiny", resolution=(HEIGHT, WIDTH))
    extractor.setup("cpu")
    return extractor


def samples(images):
    return [Sample(key=f"img{i}", image=image, annotations={}) for i, image in enumerate(images)]


# ---- architecture and official keys ------------------------------------------------------------


def test_official_key_names_and_shapes(w32):
    official = hh.official_state_dict(w32)
    assert len(official) == OFFICIAL_NUM_KEYS
    assert sum(p.numel() for p in w32.parameters()) == OFFICIAL_NUM_PARAMS
    assert key_shape_digest(official) == OFFICIAL_KEYS_DIGEST
    # spot checks against pose_higher_hrnet.py
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "transition1.1.0.0.weight": (64, 256, 3, 3),
        "stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
        "final_layers.0.weight": (34, 32, 1, 1),
        "final_layers.1.weight": (17, 32, 1, 1),
        "deconv_layers.0.0.0.weight": (66, 32, 4, 4),
        "deconv_layers.0.4.0.conv2.weight": (32, 32, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(official[key].shape) == shape, key
    # stage 4 fuses to the highest-resolution branch only (multi_scale_output=False)
    assert not any(k.startswith("stage4.2.fuse_layers.1.") for k in official)


def test_timm_w32_config_is_the_official_one():
    from timm.models.hrnet import cfg_cls

    timm_cfg = cfg_cls["hrnet_w32"]
    for key, value in hh.W32_BACKBONE.items():
        if isinstance(value, dict):
            assert {k: timm_cfg[key][k] for k in value} == value, key
        else:
            assert timm_cfg[key] == value, key


def test_forward_shapes_and_feature_is_head_input(w32):
    x = torch.randn(1, 3, 32, 64)
    seen = {}
    handle = w32.head.final_layers[0].register_forward_hook(lambda m, i, o: seen.update(head_input=i[0]))
    with torch.no_grad():
        out = w32(x)
    handle.remove()
    assert out.features.shape == (1, 32, 8, 16)
    assert out.heatmaps_quarter.shape == out.tags.shape == (1, 17, 8, 16)
    assert out.heatmaps_half.shape == (1, 17, 16, 32)
    assert torch.equal(seen["head_input"], out.features)


def test_random_w32_stays_finite_in_fp16(w32):
    """Random weights (benchmarks) must not overflow the fp16 features: zero_init_last."""
    images = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32), torch.rand(3, 32, 32)])
    with torch.no_grad():
        out = w32(hh.prepare_input(images))
    assert out.features.abs().max() < 1e4 and out.heatmaps_half.abs().max() < 1e4 and out.tags.abs().max() < 1e4
    assert torch.isfinite(out.features.half()).all()


def test_key_mapping():
    assert hh.official_to_model_key("stage3.1.branches.0.0.conv1.weight") == "backbone.stage3.1.branches.0.0.conv1.weight"
    assert hh.official_to_model_key("module.final_layers.1.bias") == "head.final_layers.1.bias"
    assert hh.model_to_official_key("head.deconv_layers.0.0.1.running_var") == "deconv_layers.0.0.1.running_var"
    with pytest.raises(KeyError):
        hh.official_to_model_key("classifier.weight")

    source = hh.build_higherhrnet(hh.TINY_CONFIG, seed=1)
    generator = torch.Generator().manual_seed(0)
    synthetic = {
        "module." + k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 7)
        for k, v in hh.official_state_dict(source).items()
    }
    target = hh.load_official_state_dict(hh.build_higherhrnet(hh.TINY_CONFIG, seed=2), synthetic)
    for key, value in target.state_dict().items():
        assert torch.equal(value, synthetic["module." + hh.model_to_official_key(key)]), key

    # old checkpoints without BatchNorm counters load; anything else missing or extra does not
    no_counters = {k: v for k, v in synthetic.items() if not k.endswith("num_batches_tracked")}
    hh.load_official_state_dict(hh.build_higherhrnet(hh.TINY_CONFIG), no_counters)
    with pytest.raises(ValueError, match="missing"):
        hh.load_official_state_dict(hh.build_higherhrnet(hh.TINY_CONFIG), {k: v for k, v in synthetic.items() if "final_layers.1" not in k})
    with pytest.raises(ValueError, match="unexpected"):
        hh.load_official_state_dict(hh.build_higherhrnet(hh.TINY_CONFIG), {**synthetic, "stage4.0.fuse_layers.3.0.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="wrong shape"):
        hh.load_official_state_dict(hh.build_higherhrnet(hh.TINY_CONFIG), hh.official_state_dict(hh.build_higherhrnet(hh.W32_CONFIG)))


def test_pretrained_loading_path(w32, tmp_path):
    path = tmp_path / WEIGHTS_FILE
    torch.save(hh.official_state_dict(w32), path)
    extractor = HigherHRNetExtractor(weights="pretrained", model=str(tmp_path), resolution=(HEIGHT, WIDTH))
    assert extractor.weights_path() == str(path)
    extractor.setup("cpu")
    loaded = extractor.net.state_dict()
    for key, value in w32.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert all(not p.requires_grad for p in extractor.net.parameters()) and not extractor.net.training

    by_file = HigherHRNetExtractor(weights="pretrained", model=str(path))
    assert by_file.fingerprint_inputs()["weights_digest"] is not None
    assert by_file.fingerprint() != HigherHRNetExtractor(weights="random").fingerprint()
    with pytest.raises(FileNotFoundError, match="model zoo"):
        HigherHRNetExtractor(weights="pretrained", model=str(tmp_path / "nowhere" / WEIGHTS_FILE)).weights_path()


# ---- extractor on real photos ------------------------------------------------------------------


def test_tiny_on_real_photos(tiny, photos):
    out = tiny(samples(photos))
    assert len(out) == len(photos)
    specs = tiny.outputs()
    assert set(specs) == {"keypoints.npy", "pose_features.npy"}
    for result in out:
        assert set(result) == set(specs) | {NOTES}
        kp, features = result["keypoints.npy"], result["pose_features.npy"]
        assert kp.shape == (17, 3) and kp.dtype == np.float32
        assert features.shape == (32, HEIGHT // 4, WIDTH // 4) and features.dtype == np.float16
        assert str(features.dtype) == specs["pose_features.npy"].dtype
        present = kp[:, 2] > 0
        assert np.all(kp[~present] == 0)
        assert np.all((kp[present, 0] >= 0) & (kp[present, 0] <= WIDTH - 1))
        assert np.all((kp[present, 1] >= 0) & (kp[present, 1] <= HEIGHT - 1))
        # the stored features are those of the keypoints' own render
        expected = tiny.pose_features(render_pose_map(kp, HEIGHT, WIDTH)[None])[0]
        assert np.allclose(features.astype(np.float32), expected, atol=1e-2, rtol=1e-3)
    # deterministic, and batching does not change the results
    again = tiny(samples(photos[1:2]))[0]
    assert np.allclose(again["keypoints.npy"], out[1]["keypoints.npy"], atol=1e-4)
    assert np.allclose(again["pose_features.npy"].astype(np.float32), out[1]["pose_features.npy"].astype(np.float32), atol=1e-2)
    assert tiny.null_embedding() is None


def test_fingerprint_needs_no_torch_and_restates_the_model_constants():
    import subprocess
    import sys

    import posedata.extractors.higherhrnet as ex

    code = (
        "import sys; from posedata.extractors.higherhrnet import HigherHRNetExtractor as E; "
        "E(weights='tiny').card(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("IMAGENET_MEAN", "IMAGENET_STD", "NMS_KERNEL", "DETECTION_THRESHOLD", "TAG_THRESHOLD", "MAX_NUM_PEOPLE"):
        assert getattr(ex, name) == getattr(hh, name), name
    assert ex.WEIGHTS_FILE == hh.OFFICIAL_WEIGHTS_FILE
    assert ex.FEATURE_CHANNELS == hh.W32_CONFIG.feature_channels == hh.TINY_CONFIG.feature_channels
    assert ex.FEATURE_STRIDE == hh.FEATURE_STRIDE


def test_fingerprint_and_card():
    a = HigherHRNetExtractor(weights="tiny", resolution=(HEIGHT, WIDTH))
    assert a.fingerprint() == HigherHRNetExtractor(weights="tiny", resolution=(HEIGHT, WIDTH)).fingerprint()
    assert a.fingerprint() != HigherHRNetExtractor(weights="tiny", resolution=(HEIGHT, WIDTH), refine=False).fingerprint()
    assert a.fingerprint() != HigherHRNetExtractor(weights="tiny", resolution=(HEIGHT, WIDTH), dtype="fp32").fingerprint()
    assert a.fingerprint() != HigherHRNetExtractor(weights="random", resolution=(HEIGHT, WIDTH)).fingerprint()
    assert a.card()["outputs"]["pose_features.npy"]["shape"] == [32, "H/4", "W/4"]
    assert HigherHRNetExtractor().model_id == WEIGHTS_FILE


def test_coco17_to_coco18_and_render():
    assert COCO17_NAMES == hh.COCO17_NAMES
    kp17 = np.zeros((17, 3), dtype=np.float32)
    for j in range(17):
        kp17[j] = (10 + j, 20 + 2 * j, 0.5 + j / 100)
    kp18 = coco17_to_coco18(kp17)
    for j18, name in enumerate(COCO18_NAMES):
        if name == "neck":
            l, r = kp17[COCO17_NAMES.index("l_shoulder")], kp17[COCO17_NAMES.index("r_shoulder")]
            assert np.allclose(kp18[j18], [(l[0] + r[0]) / 2, (l[1] + r[1]) / 2, min(l[2], r[2])])
        else:
            assert np.array_equal(kp18[j18], kp17[COCO17_NAMES.index(name)]), name
    kp17[COCO17_NAMES.index("r_shoulder")] = 0
    assert np.all(coco17_to_coco18(kp17)[COCO18_NAMES.index("neck")] == 0)
    # joints at or below the detection threshold are not drawn
    weak = kp17.copy()
    weak[:, 2] = RENDER_SCORE_THRESHOLD * 0.99
    assert not render_pose_map(weak, 64, 48).any()
    assert np.array_equal(render_pose_map(kp17, 64, 48), draw_openpose(coco17_to_coco18(kp17), 64, 48, RENDER_SCORE_THRESHOLD))


# ---- preprocessing, gradients ------------------------------------------------------------------


def test_prepare_input_pads_with_black():
    images = torch.rand(2, 3, HEIGHT, WIDTH)
    x = hh.prepare_input(images)
    assert x.shape == (2, 3, 256, 192)
    mean = torch.tensor(hh.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(hh.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(x[..., :WIDTH], (images - mean) / std)
    assert torch.allclose(x[..., WIDTH:], (-mean / std).expand(2, 3, 256, 16))


def test_gradients_flow_from_features_to_pose_map():
    net = hh.build_higherhrnet(hh.TINY_CONFIG, seed=0).eval()
    pose_map = torch.from_numpy(render_pose_map(np.c_[np.random.default_rng(0).uniform(5, 40, (17, 2)), np.ones(17)], 64, 44))
    x = (pose_map.permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    target = torch.randn(1, 32, 16, 11)
    features = net.pose_features(x)
    assert features.shape == (1, 32, 16, 11)
    loss = torch.nn.functional.mse_loss(features, target)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert net.backbone.conv1.weight.grad is not None  # the network itself is trainable too


# ---- decoding ----------------------------------------------------------------------------------


def gaussian(height, width, x, y, peak, sigma=2.0):
    rows, cols = np.mgrid[0:height, 0:width]
    return peak * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))


def two_people(peak_a=0.9, peak_b=0.6, height=96, width=80):
    """Person A on the left (tag 0), person B on the right (tag 3): joint j of A at
    (8 + j % 3 * 8, 5 + j * 5), of B 40 pixels to the right."""
    rng = np.random.default_rng(0)
    heat = np.zeros((17, height, width), dtype=np.float32)
    tags = np.zeros((17, height, width), dtype=np.float32)
    a = np.array([(8 + j % 3 * 8, 5 + j * 5) for j in range(17)], dtype=np.float32)
    b = a + (40, 0)
    for j in range(17):
        heat[j] = np.maximum(gaussian(height, width, *a[j], peak_a), gaussian(height, width, *b[j], peak_b))
        tags[j, :, width // 2 :] = 3.0
    tags += rng.normal(0, 0.05, tags.shape).astype(np.float32)  # tags are never exact
    return heat, tags, a, b


def test_decode_keeps_the_strongest_person():
    heat, tags, a, b = two_people()
    kp, score = hh.decode_single_person(heat, tags)
    assert kp.dtype == np.float32 and kp.shape == (17, 3)
    assert np.allclose(kp[:, :2], a, atol=1e-6)
    assert np.allclose(kp[:, 2], 0.9, atol=1e-6) and score == pytest.approx(0.9, abs=1e-6)

    heat, tags, a, b = two_people(peak_a=0.5, peak_b=0.8)
    kp, score = hh.decode_single_person(heat, tags)
    assert np.allclose(kp[:, :2], b, atol=1e-6) and score == pytest.approx(0.8, abs=1e-6)


def test_decode_groups_by_tag_not_by_strength():
    """A's left wrist is weak (0.3) while B's is strong (0.95): A still gets its own wrist."""
    heat, tags, a, b = two_people()
    wrist = COCO17_NAMES.index("l_wrist")
    heat[wrist] = np.maximum(gaussian(96, 80, *a[wrist], 0.3), gaussian(96, 80, *b[wrist], 0.95))
    kp, score = hh.decode_single_person(heat, tags)
    assert np.allclose(kp[wrist], (*a[wrist], 0.3), atol=1e-6)
    assert score == pytest.approx((16 * 0.9 + 0.3) / 17, abs=1e-6)


def test_decode_adjust_refine_and_nobody():
    heat, tags, a, b = two_people()
    # quarter-pixel adjust towards the larger neighbour: a peak at x + 0.3 reads x + 0.25
    nose = COCO17_NAMES.index("nose")
    heat[nose] = gaussian(96, 80, a[nose][0] + 0.3, a[nose][1], 0.9)
    # a joint below the detection threshold is found by refine, with the person's tag
    ankle = COCO17_NAMES.index("r_ankle")
    heat[ankle] = np.maximum(gaussian(96, 80, *a[ankle], 0.05), gaussian(96, 80, *b[ankle], 0.08))
    kp, _ = hh.decode_single_person(heat, tags)
    assert np.allclose(kp[nose], (a[nose][0] + 0.25, a[nose][1], heat[nose].max()), atol=1e-6)
    assert np.allclose(kp[ankle], (*a[ankle], 0.05), atol=1e-6)
    kp, _ = hh.decode_single_person(heat, tags, refine=False)
    assert np.all(kp[ankle] == 0)

    kp, score = hh.decode_single_person(np.zeros((17, 32, 24)), np.zeros((17, 32, 24)))
    assert np.all(kp == 0) and score == 0.0


def test_aggregate_outputs():
    quarter = torch.full((1, 17, 8, 6), 0.2)
    half = torch.full((1, 17, 16, 12), 0.6)
    tags = torch.full((1, 17, 8, 6), 1.5)
    heat, tag = hh.aggregate_outputs(quarter, tags, half, (32, 24))
    assert heat.shape == tag.shape == (1, 17, 32, 24)
    assert torch.allclose(heat, torch.full_like(heat, 0.4)) and torch.allclose(tag, torch.full_like(tag, 1.5))


def test_end_to_end_decoding_on_synthetic_network_outputs(tiny):
    """predict() = aggregate + crop + decode: feed it a stand-in network with known outputs."""
    heat, tags, a, _ = two_people()  # a 96 x 80 image, padded to 96 x 96
    pool = torch.nn.functional.avg_pool2d
    pad = torch.nn.functional.pad
    half = pad(pool(torch.from_numpy(heat)[None], 2), (0, 8))
    quarter = pad(pool(torch.from_numpy(heat)[None], 4), (0, 4))
    tag_q = pad(pool(torch.from_numpy(tags)[None], 4), (0, 4))

    class StandIn(torch.nn.Module):
        def forward(self, x):
            assert x.shape[-2:] == (96, 96)
            return hh.HigherHRNetOutput(None, quarter, tag_q, half)

    real, tiny.net = tiny.net, StandIn()
    try:
        kp, scores = tiny.predict(np.zeros((1, 96, 80, 3), dtype=np.uint8))
    finally:
        tiny.net = real
    assert kp.shape == (1, 17, 3)
    # every joint of the stronger person survives the down- and up-sampling, within a pixel
    assert np.all(kp[0, :, 2] > 0.4)
    assert np.abs(kp[0, :, :2] - a).max() <= 1.0
    assert math.isfinite(float(scores[0])) and scores[0] > 0.4
