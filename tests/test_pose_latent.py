"""PoseLatentExtractor: the vae feature's posterior of the openpose skeleton render."""

from __future__ import annotations

import numpy as np
import pytest

from posedata.extractors import MODEL_PRESETS, create_extractor, dependency_order
from posedata.extractors.base import ExtractorError
from posedata.extractors.pose_latent import PoseLatentExtractor
from posedata.extractors.vae import VaeExtractor
from posedata.render import draw_openpose

STORED = (64, 48)  # (H, W), divisible by 8

# A standing person in COCO-18 order (x, y, score), then one with the arms up; then nobody.
STANDING = np.array(
    [[24, 8, 1], [24, 14, 1], [18, 14, 1], [16, 24, 1], [15, 32, 1], [30, 14, 1], [32, 24, 1], [33, 32, 1],
     [20, 34, 1], [20, 46, 1], [20, 58, 1], [28, 34, 1], [28, 46, 1], [28, 58, 1], [23, 7, 1], [25, 7, 1], [21, 8, 1], [27, 8, 1]],
    dtype=np.float32,
)
ARMS_UP = STANDING.copy()
ARMS_UP[[3, 4, 6, 7], 1] = [8, 2, 8, 2]


def render(keypoints: np.ndarray) -> np.ndarray:
    return draw_openpose(keypoints, *STORED)


def samples() -> list[dict]:
    poses = [STANDING, ARMS_UP, np.zeros_like(STANDING)]
    return [
        {"key": f"img{i}", "image": np.full((*STORED, 3), 128, np.uint8), "annotations": {}, "openpose": {"skeleton.png": render(kp)}}
        for i, kp in enumerate(poses)
    ]


@pytest.fixture(scope="module")
def tiny() -> PoseLatentExtractor:
    extractor = create_extractor("pose_latent:sd15", upstream={"openpose": "openpose@abc"}, weights="tiny", resolution=STORED, dtype="fp32")
    extractor.setup("cpu")
    return extractor


@pytest.fixture(scope="module")
def vae() -> VaeExtractor:
    extractor = VaeExtractor(weights="tiny", preset="sd15", resolution=STORED, dtype="fp32")
    extractor.setup("cpu")
    return extractor


def test_is_the_vae_posterior_of_the_skeleton_render(tiny, vae):
    batch = samples()
    out = tiny(batch)
    assert len(out) == 3
    mean, std = vae.encode_pixels(vae.preprocess([s["openpose"]["skeleton.png"] for s in batch]))
    for i, item in enumerate(out):
        assert set(item) == {"mean.npy", "std.npy"}
        assert item["mean.npy"].shape == (4, STORED[0] // 8, STORED[1] // 8) == tuple(tiny.outputs()["mean"].shape)
        np.testing.assert_array_equal(item["mean.npy"], mean[i])
        np.testing.assert_array_equal(item["std.npy"], std[i])
    # the pose, not the photo, is what is encoded: two poses give two latents
    assert not np.allclose(out[0]["mean.npy"], out[1]["mean.npy"])


def test_null_is_the_empty_skeleton(tiny):
    null = tiny.null_embedding()
    nobody = tiny(samples()[2:])[0]  # draw_openpose of no joints is all black
    np.testing.assert_array_equal(null["black_mean.npy"], nobody["mean.npy"])
    np.testing.assert_array_equal(null["black_std.npy"], nobody["std.npy"])


def test_declares_openpose_and_is_in_the_reposedm_preset():
    assert PoseLatentExtractor.requires == ("openpose",)
    assert "pose_latent:sd15" in MODEL_PRESETS["reposedm"]
    order = dependency_order(["pose_latent:sd15"])
    assert order == ["openpose", "pose_latent:sd15"]


def test_presets_and_fingerprint(tiny):
    assert PoseLatentExtractor().model_id == "stabilityai/sd-vae-ft-mse"  # sd15 by default
    assert PoseLatentExtractor(preset="sd21").vae.subfolder == "vae"
    assert PoseLatentExtractor(model="stabilityai/stable-diffusion-2-1-base").preset == "sd21"
    assert tiny.card()["scaling_factor"] == pytest.approx(0.18215)
    assert tiny.card()["requires"] == ["openpose"]
    same_vae = VaeExtractor(weights="tiny", preset="sd15", resolution=STORED, dtype="fp32")
    assert tiny.folder.startswith("pose_latent@") and tiny.folder != same_vae.folder
    other_upstream = create_extractor("pose_latent:sd15", upstream={"openpose": "openpose@def"}, weights="tiny", resolution=STORED, dtype="fp32")
    assert other_upstream.fingerprint() != tiny.fingerprint()
    with pytest.raises(KeyError, match="no preset"):
        create_extractor("pose_latent:sd99")


def test_missing_or_wrong_render_is_a_clear_error(tiny):
    bad = samples()[:1]
    del bad[0]["openpose"]
    with pytest.raises(ExtractorError, match="img0: no openpose skeleton.png"):
        tiny(bad)
    small = samples()[:1]
    small[0]["openpose"]["skeleton.png"] = small[0]["openpose"]["skeleton.png"][:32]
    with pytest.raises(ExtractorError, match=r"img0: skeleton.png is uint8 \(32, 48, 3\)"):
        tiny(small)


def test_pretrained_loads_a_saved_autoencoder(tmp_path, tiny):
    """The real loading path (from_pretrained on a local VAE-only directory) with the tiny
    autoencoder saved to disk gives the same latents as the tiny mode."""
    tiny.vae._model.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = PoseLatentExtractor(weights="pretrained", model=str(tmp_path / "vae"), resolution=STORED, dtype="fp32")
    assert loaded.vae.subfolder is None and loaded.card()["fingerprint_inputs"]["weights_digest"]
    loaded.setup("cpu")
    batch = samples()
    np.testing.assert_array_equal(loaded(batch)[0]["mean.npy"], tiny(batch)[0]["mean.npy"])
