"""reposedm --rpa-warp pixels: eq. 9 as the paper writes it, F_S^n = Encoder(W(I_S; F^n)),
the source IMAGE warped with the accumulated flow (upsampled to the image) and re-encoded by
the dataset's frozen VAE encoder every RPA iteration. The warp itself, the encoder being
the dataset's own, gradients reaching the flow through it, the choice recorded in the
model config, and train -> sample end to end on a tiny dataset of the real fixture photos."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_reposedm import H, W, cli, h, make_plugin, w  # the same fixture size and helpers

from posedata.reader import Dataset, PairStream
from posedata.train.reposedm import SOURCE_PIXELS, RePoseDMModel, RePoseDMPlugin, source_pixels
from posedata.train.reposedm_rpa import RecurrentPoseAlignment, upsample_flow, warp


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(res=(H, W), preset="reposedm")


@pytest.fixture(scope="module")
def data(dataset):
    ds = Dataset(str(dataset))
    return ds, list(PairStream(ds, "train", RePoseDMPlugin.needs, pixels=True, seed=0, epochs=1))


def test_identity_flow_reproduces_the_reencoding_of_the_unwarped_image(data):
    """Zero flow: the warped image is the image, and RPA's re-encoding (the untrained flow
    head is zero) is the frozen encoder's latent of the unwarped image, which is the
    dataset's stored source latent (same VAE; fp16 storage)."""
    ds, pairs = data
    plugin = make_plugin(ds, rpa_warp="pixels")
    encoder = plugin.source_encoder(torch.device("cpu"))
    sources = [p["source"] for p in pairs[:2]]
    pixels = source_pixels(sources, "test")
    assert pixels.shape == (2, 3, H, W) and pixels.min() >= -1.0 and pixels.max() <= 1.0
    zero = torch.zeros(2, 2, h, w)
    torch.testing.assert_close(warp(pixels, upsample_flow(zero, (H, W))), pixels)
    with torch.no_grad():
        unwarped = encoder(pixels)
        stored = torch.stack([torch.as_tensor(s["vae.mean"]).float() for s in sources])
        torch.testing.assert_close(unwarped / plugin.scaling_factor, stored, atol=2e-3, rtol=0)  # fp16 storage
        model = plugin.build_model().eval()
        pose = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(0))
        features, warped, flow = model.rpa(stored * plugin.scaling_factor, pose, pixels, encoder)
    assert torch.count_nonzero(flow) == 0
    torch.testing.assert_close(warped, unwarped)  # the last re-encoding, bit for bit
    torch.testing.assert_close(features, model.rpa.source_encoder(unwarped))


def test_a_known_flow_moves_pixels_by_the_latent_stride():
    """One latent pixel of flow is H/h image pixels: a uniform flow of (1, 0.5) latent pixels
    samples every image pixel 8 to the right and 4 down (border padding at the edge)."""
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    flow = torch.zeros(1, 2, h, w)
    flow[:, 0], flow[:, 1] = 1.0, 0.5
    up = upsample_flow(flow, (H, W))
    assert up.shape == (1, 2, H, W)
    torch.testing.assert_close(up[:, 0], torch.full((1, H, W), W / w))
    torch.testing.assert_close(up[:, 1], torch.full((1, H, W), 0.5 * H / h))
    moved = warp(image, up)
    torch.testing.assert_close(moved[..., : H - 4, : W - 8], image[..., 4:, 8:])
    torch.testing.assert_close(moved[..., H - 1, W - 1], image[..., H - 1, W - 1])  # border padding
    # a flow that varies over the latent grid is interpolated, not copied per 8x8 block
    ramp = torch.zeros(1, 2, h, w)
    ramp[:, 0] = torch.linspace(0, 1, w)
    assert upsample_flow(ramp, (H, W))[0, 0, 0].unique().numel() == W


def test_the_flow_learns_through_the_frozen_encoder(data):
    """With pixels the only way from a loss on F_S^N to the flow is the warp of the image and
    the frozen VAE encoder: the flow head gets a gradient, the VAE none."""
    ds, pairs = data
    plugin = make_plugin(ds, rpa_warp="pixels")
    encoder = plugin.source_encoder(torch.device("cpu"))
    torch.manual_seed(0)
    rpa = RecurrentPoseAlignment(dim=8, radius=2, iterations=2)
    pixels = source_pixels([p["source"] for p in pairs[:2]], "test")
    with torch.no_grad():
        latent = encoder(pixels)
    features, warped, _ = rpa(latent, torch.randn_like(latent), pixels, encoder)
    (features.pow(2).mean() + warped.pow(2).mean()).backward()
    assert rpa.aggregator.flow_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.vae.parameters())
    with pytest.raises(ValueError, match="both"):
        rpa(latent, latent, pixels, None)


def test_option_is_checked_recorded_and_followed(data, tmp_path):
    ds, pairs = data
    latent = make_plugin(ds)
    assert latent.options["rpa_warp"] == "latent" and not latent.needs_pixels
    assert latent.build_model().config.rpa_warp == "latent"
    assert SOURCE_PIXELS not in latent.collate(pairs[:2], torch.Generator().manual_seed(0))
    plugin = make_plugin(ds, rpa_warp="pixels")
    assert plugin.needs_pixels
    batch = plugin.collate(pairs[:2], torch.Generator().manual_seed(0))
    assert batch[SOURCE_PIXELS].shape == (2, 3, H, W)
    model = plugin.build_model()
    assert model.config.rpa_warp == "pixels"
    with pytest.raises(ValueError, match="alignment"):
        RePoseDMPlugin(ds.card, weights="tiny", rpa_warp="pixels", alignment="none")
    with pytest.raises(ValueError, match="rpa_warp"):
        RePoseDMPlugin(ds.card, weights="tiny", rpa_warp="flow")
    # the model without the images: a clear error, not a silent latent warp
    with pytest.raises(ValueError, match="source pixels"):
        model.context(torch.randn(1, 4, h, w), torch.randn(1, 4, h, w))
    no_images = [{"source": {k: v for k, v in p["source"].items() if k != "image"}, "target": p["target"]} for p in pairs[:1]]
    with pytest.raises(ValueError, match="no image"):
        plugin.sample(model.eval(), no_images, num_inference_steps=1, pose_guidance=0.0)
    # a saved model keeps its variant; a plugin built with the default follows the model
    model.save_pretrained(tmp_path / "model")
    follower = RePoseDMPlugin(ds.card, weights="pretrained", model=str(tmp_path / "model"), preset="tiny")
    assert follower.build_model().config.rpa_warp == "pixels" and follower.needs_pixels


def test_train_pixels_then_sample_end_to_end(dataset, tmp_path):
    run = tmp_path / "run"
    cli("train", "reposedm", "--shards", str(dataset), "--out", str(run), "--weights", "tiny", "--rpa-warp", "pixels",
        "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "2", "--pose-guidance", "0")
    config = json.loads((run / "config.json").read_text())
    assert config["plugin_options"]["rpa_warp"] == "pixels" and config["data"]["pixels"] is True
    model_config = json.loads((run / "checkpoint-2" / "model" / "config.json").read_text())
    assert model_config["rpa_warp"] == "pixels"
    assert RePoseDMModel.from_pretrained(run / "checkpoint-2" / "model").config.rpa_warp == "pixels"
    out = tmp_path / "samples"
    cli("sample", "reposedm", "--shards", str(dataset), "--run", str(run), "--out", str(out), "--split", "train", "--limit", "2",
        "--steps", "2", "--pose-guidance", "0")
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(rows) == 2 and {"source_key", "target_key", "file"} <= set(rows[0])
    image = np.asarray(Image.open(out / rows[0]["file"]))
    assert image.shape == (H, W, 3)
