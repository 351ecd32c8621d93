"""Each protocol's size and scaling rules, pinned against reference computations written
here from the official scripts (not from posedata's helpers), on a real fixture photo."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from posedata.eval import metrics as M
from posedata.eval.masks import body_mask
from posedata.eval.protocol import REGISTRY, create_protocol
from posedata.extractors import create_extractor


@pytest.fixture(scope="module")
def photo(fixtures_dir) -> np.ndarray:
    """A real DeepFashion photo at 512x352 (the high-res stored size)."""
    image = Image.open(fixtures_dir / "deepfashion" / "pcdms_img6_750x1101.png").convert("RGB")
    return np.asarray(image.resize((352, 512), Image.Resampling.BICUBIC))


def small(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((176, 256), Image.Resampling.BICUBIC))


def test_pcdms_resizes_every_image_with_cv2_bicubic_and_keeps_the_overshoot(photo):
    p = create_protocol("pcdms", (256, 176))
    expected = cv2.resize(photo.astype(np.float32), (176, 256), interpolation=cv2.INTER_CUBIC) / 255.0
    gen, truth = p.ssim_inputs(photo, small(photo))
    np.testing.assert_allclose(gen, expected * 255.0, atol=1e-3)
    assert gen.dtype == np.float32
    assert gen.min() < 0 or gen.max() > 255  # bicubic overshoot is not clipped
    np.testing.assert_allclose(p.psnr_inputs(photo, photo)[0], expected, atol=1e-6)
    np.testing.assert_allclose(p.fid_input(photo), expected, atol=1e-6)
    lpips_in = p.lpips_inputs(photo, photo)[0]
    np.testing.assert_allclose(lpips_in, expected, atol=1e-6)  # [0, 1], NOT rescaled to [-1, 1]
    assert lpips_in.min() > -0.2 and lpips_in.max() < 1.2
    assert (p.ssim_sigma, p.lpips_batch, p.fid_batch) == (1.2, 64, 128)
    # the 512 script for 512x352 datasets: same size in, same pixels out
    big = create_protocol("pcdms", (512, 352))
    np.testing.assert_array_equal(big.psnr_inputs(photo, photo)[0], photo.astype(np.float32) / 255.0)


def test_cfld_resizes_samples_with_torch_bicubic_and_truncates_to_uint8(photo):
    p = create_protocol("cfld", (256, 176))
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255.0
    y = F.interpolate(x, size=(256, 176), mode="bicubic", antialias=True) * 255.0
    truncated = y.clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    rounded = y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    generated = p.generated_file(photo, (256, 176))
    np.testing.assert_array_equal(generated, truncated)
    assert (generated != rounded).mean() > 0.2  # truncation, not rounding: about half the values
    np.testing.assert_array_equal(p.generated_file(small(photo), (256, 176)), small(photo))
    # ground truth: PIL bicubic (antialiased) to the test size
    np.testing.assert_array_equal(p.truth_file(photo), np.asarray(Image.fromarray(photo).resize((176, 256), Image.Resampling.BICUBIC)))
    a, _ = p.lpips_inputs(small(photo), small(photo))
    np.testing.assert_allclose(a, 2 * (small(photo) / 255.0) - 1, atol=1e-6)  # lpips(normalize=True)
    np.testing.assert_allclose(p.fid_input(small(photo)), small(photo) / 255.0, atol=1e-7)
    assert (p.ssim_sigma, p.lpips_batch, p.fid_batch) == (1.5, None, None)


def test_pidm_stretches_files_to_256_square_and_measures_lpips_fid_at_256x176(photo):
    p = create_protocol("pidm", (256, 176))
    stored = small(photo)
    truth = p.truth_file(stored)
    np.testing.assert_array_equal(truth, np.asarray(Image.fromarray(stored).resize((256, 256), Image.Resampling.BICUBIC)))
    np.testing.assert_allclose(p.psnr_inputs(truth, truth)[0], truth / 255.0, atol=1e-7)
    linear = cv2.resize(truth.astype(np.float32), (176, 256))  # cv2's default: INTER_LINEAR
    np.testing.assert_allclose(p.lpips_inputs(truth, truth)[0], linear / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(p.fid_input(truth), linear / 255.0, atol=1e-6)
    assert p.fid_input(truth).shape == (256, 176, 3)
    assert (p.ssim_sigma, p.lpips_batch, p.fid_batch) == (1.2, 64, 64)


def test_gfla_uses_256_square_files_as_they_are(photo):
    p = create_protocol("gfla", (256, 176))
    truth = p.truth_file(small(photo))
    assert truth.shape == (256, 256, 3)
    np.testing.assert_allclose(p.lpips_inputs(truth, truth)[0], truth.astype(np.float32) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(p.fid_input(truth), truth / 255.0, atol=1e-7)
    assert (p.ssim_sigma, p.lpips_batch, p.fid_batch) == (1.5, 64, 64)


def test_patn_pads_40_white_columns_each_side_and_measures_uint8(photo):
    p = create_protocol("patn", (256, 176))
    stored = small(photo)
    truth = p.truth_file(stored)
    assert truth.shape == (256, 256, 3) and truth.dtype == np.uint8
    assert (truth[:, :40] == 255).all() and (truth[:, 216:] == 255).all()
    np.testing.assert_array_equal(truth[:, 40:216], stored)
    assert p.generated_file(photo, truth.shape[:2]).shape == (256, 256, 3)  # 512x352 -> 256x176 -> padded
    gen, tru = p.ssim_inputs(truth, truth)
    assert gen.dtype == np.uint8
    assert p.metrics == ("is", "ssim") and p.ssim_sigma == 1.5


@pytest.mark.parametrize("name", list(REGISTRY))
def test_market_images_are_measured_at_128x64_without_padding(name, photo):
    p = create_protocol(name, (128, 64))
    stored = np.asarray(Image.fromarray(photo).resize((64, 128)))
    truth = p.truth_file(stored)
    np.testing.assert_array_equal(truth, stored)
    assert p.generated_file(stored, truth.shape[:2]).shape == (128, 64, 3)
    assert p.fid_input(truth).shape == (128, 64, 3)
    assert p.ssim_inputs(truth, truth)[0].shape == (128, 64, 3)


def test_ssim_is_the_scripts_call():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 48, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.float32)
    from skimage.metrics import structural_similarity

    expected = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2, data_range=b.max() - b.min())
    assert M.ssim(b, a, sigma=1.5) == pytest.approx(expected, abs=1e-7)


def test_partial_batches_are_dropped_as_the_scripts_do():
    assert M.counted(8570, 128) == 8448  # PCDMs' DeepFashion test set: 122 pairs never count
    assert M.counted(8570, 64) == 8512
    assert M.counted(100, 128) == 100  # fewer than a batch: the batch becomes the set
    assert M.counted(130, None) == 130
    assert M.counted(0, 64) == 0


def test_fid_with_few_samples_equals_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for n1, n2 in ((10, 40), (40, 10), (30, 200), (100, 200)):  # the last: both sides full rank
        a, b = rng.normal(size=(n1, 64)), rng.normal(size=(n2, 64)) * 1.3 + 0.2
        expected = calculate_frechet_distance(*M.statistics(a), *M.statistics(b))
        assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    a = rng.normal(size=(6, 2048))
    assert abs(M.frechet_distance(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))


def test_fid_networks_apply_gfla_affine_or_tf_scaling_after_the_299_resize():
    from posedata.eval.networks import FidNetwork

    x = torch.rand(2, 3, 64, 44)
    resized = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    std, mean = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    for kind, scaled in (("torchvision", resized * (std / 0.5) + (mean - 0.5) / 0.5), ("tf", 2 * resized - 1)):
        net = FidNetwork(kind, "random", seed=3)
        y = scaled
        with torch.no_grad():
            for block in net.inception.blocks:
                y = block(y)
            out = net(x)
        assert out.shape == (2, 2048) and torch.isfinite(out).all()
        torch.testing.assert_close(out, y.flatten(1), rtol=1e-4, atol=1e-5)
    a, b = FidNetwork("torchvision", "random", seed=3), FidNetwork("torchvision", "random", seed=3)
    assert torch.equal(a.inception.blocks[3][1].branch1x1.conv.weight, b.inception.blocks[3][1].branch1x1.conv.weight)


def test_body_mask_covers_limbs_and_joints_and_leaves_out_missing_joints():
    ys = [15, 28, 28, 45, 60, 28, 45, 60, 65, 90, 115, 65, 90, 115, 12, 12, 14, 14]
    xs = [32, 32, 22, 18, 16, 42, 46, 48, 26, 26, 26, 38, 38, 38, 29, 35, 26, 38]
    keypoints = np.array([[x, y, 1.0] for x, y in zip(xs, ys)])
    mask = body_mask(keypoints, (128, 64))
    assert mask.dtype == bool and mask.shape == (128, 64)
    for x, y in zip(xs, ys):
        assert mask[y, x]
    assert mask[(45 + 60) // 2, (18 + 16) // 2]  # on the right forearm
    assert mask[(65 + 90) // 2, 26 - 3] and not mask[(65 + 90) // 2, 26 - 7]  # a limb is 4 px each side
    assert mask[(65 + 90) // 2, 32]  # the 3 px gap between the thighs is closed (5 x 5 dilation, then erosion)
    assert not mask[5, 2] and not mask[125, 60]
    keypoints[4, 2] = 0  # right wrist missing: no disc there, no forearm
    without = body_mask(keypoints, (128, 64))
    assert not without[60, 16] and not without[55, 17]


def test_fid_reference_fingerprint_follows_protocol_network_weights_and_resolution():
    def folder(spec, **options):
        return create_extractor(spec, **{"weights": "random", "resolution": (256, 176), **options}).folder

    assert folder("fid_ref:pcdms") == folder("fid_ref:pcdms", weights="tiny")  # tiny: the random full Inception
    variants = {folder("fid_ref:pcdms"), folder("fid_ref:cfld"), folder("fid_ref:pcdms-tf"), folder("fid_ref:pcdms", resolution=(512, 352)), folder("fid_ref:pcdms", seed=1)}
    assert len(variants) == 5
    card = create_extractor("fid_ref:pidm", weights="random", resolution=(256, 176)).card()
    assert card["outputs"] == {"pool.npy": {"dtype": "float32", "shape": [2048], "description": card["outputs"]["pool.npy"]["description"]}}
    assert card["fingerprint_inputs"]["protocol"]["fid_batch"] == 64


def reference_inception_score(preds: np.ndarray, splits: int) -> tuple[float, float]:
    """Written from OpenAI's `inception_score.py` (PATN's tool/inception_score.py), on softmax
    predictions."""
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits) : ((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_of_known_predictions():
    # uniform predictions: no information, IS 1
    assert M.inception_score(np.zeros((20, 1008)), splits=10) == pytest.approx((1.0, 0.0))
    # confident predictions of distinct classes: IS = the number of classes in each split
    one_hot = np.full((40, 1008), -1e4)
    one_hot[np.arange(40), np.arange(40)] = 0.0
    assert M.inception_score(one_hot, splits=10) == pytest.approx((4.0, 0.0))
    assert M.inception_score(one_hot, splits=1) == pytest.approx((40.0, 0.0))
    # any logits: the script's numbers, splits cut at i * N // splits (N = 23 is uneven)
    logits = np.random.default_rng(0).normal(0, 3, (23, 1008))
    preds = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(M.inception_score(logits, splits=10), reference_inception_score(preds, 10), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 10 images"):
        M.inception_score(logits[:9], splits=10)


def test_inception_score_logits_are_the_tf_inceptions_classifier_without_bias():
    from posedata.eval.networks import FidNetwork

    net = FidNetwork("tf", "random", seed=3)
    assert net.classifier.out_features == 1008
    x = torch.rand(2, 3, 64, 44)
    with torch.no_grad():
        pool = net(x)
    expected = pool.double() @ net.classifier.weight.double().T
    np.testing.assert_allclose(net.class_logits(pool.numpy()), expected.numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="TF Inception"):
        FidNetwork("torchvision", "random", seed=3).class_logits(pool.numpy())


def test_inception_score_classifier_loads_from_the_tf_weight_file(tmp_path, monkeypatch):
    """The pretrained path: pytorch-fid's TF Inception weight file (saved here with random
    weights under its real name) gives both FID's pool features and IS's 1008-way weights."""
    from pytorch_fid.inception import fid_inception_v3

    from posedata.eval.networks import WEIGHT_FILES, FidNetwork, _no_download  # the architecture, no weights

    with _no_download():
        torch.manual_seed(5)
        full = fid_inception_v3()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(full.state_dict(), checkpoints / WEIGHT_FILES["tf_inception"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = FidNetwork("tf", "pretrained")
    assert torch.equal(net.classifier.weight, full.fc.weight)
    assert torch.equal(net.inception.blocks[0][0].conv.weight, full.Conv2d_1a_3x3.conv.weight)
