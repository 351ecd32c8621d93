"""pcdm-refine on a tiny dataset built from the real fixtures: collate (target and coarse
posteriors, the coarse image dropped to the zero latent), loss, the pretrained loading path
(conv_in widened to 8), the paper-size model on the meta device, and sampling from given coarse latents (training through run_training with resume:
tests/test_plugin_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from posedata.extractors.vae import TINY_CONFIG as TINY_VAE
from posedata.reader import Dataset, PairStream
from posedata.train import plugin_class
from posedata.train.pcdm_refine import PcdmRefineModel, PcdmRefinePlugin
from posedata.train.run import load_null_embeddings
from posedata.train.unet import BASE_MODELS, SD21_UNET_CONFIG

H, W, D = 64, 48, 32
h, w = H // 8, W // 8
SD21_UNET_PARAMS = 865_910_724


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(res=(H, W), features="openpose,clip,vae:sd21,dinov2:giant")


@pytest.fixture(scope="module")
def data(dataset):
    ds = Dataset(str(dataset))
    return ds, list(PairStream(ds, "train", PcdmRefinePlugin.needs, seed=0, epochs=1))


def make_plugin(data, drop_prob: float | None = None) -> PcdmRefinePlugin:
    plugin = PcdmRefinePlugin(data[0].card, weights="tiny")
    plugin.set_null_embeddings({})
    if drop_prob is not None:
        plugin.drop_prob = drop_prob
    return plugin


def f32(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def test_registry_and_declarations(data):
    ds, pairs = data
    assert plugin_class("pcdm-refine") is PcdmRefinePlugin
    assert PcdmRefinePlugin.needs == ("vae:sd21", "dinov2:giant") and PcdmRefinePlugin.needs_pixels is False
    d = PcdmRefinePlugin.presets["paper"].train
    assert (d.learning_rate, d.weight_decay, d.warmup_steps, d.batch_size, d.max_grad_norm) == (1e-5, 0.01, 5000, 16, 1.0)
    assert PcdmRefinePlugin.noise_offset == 0.1
    plugin = make_plugin(data)
    assert plugin.null_embeddings() == () and load_null_embeddings(ds, plugin) == {}
    assert set(pairs[0]["source"]) >= {"vae.mean", "vae.std", "dinov2.tokens"} and "clip.embeds" not in pairs[0]["source"]


def test_collate_target_coarse_and_source(data):
    _, pairs = data
    plugin = make_plugin(data, drop_prob=0.0)
    batch = plugin.collate(pairs[:3])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "target_mean": (3, 4, h, w), "target_std": (3, 4, h, w), "coarse_mean": (3, 4, h, w), "coarse_std": (3, 4, h, w),
        "source_tokens": (3, 257, D)}
    p = pairs[0]
    assert torch.equal(batch["target_mean"][0], f32(p["target"]["vae.mean"]))
    assert torch.equal(batch["coarse_mean"][0], f32(p["target"]["vae.mean"]))  # no stage-2 output: the target stands in
    assert torch.equal(batch["source_tokens"][0], f32(p["source"]["dinov2.tokens"]))

    coarse = {"vae.mean": np.full((4, h, w), 0.25, np.float16), "vae.std": np.full((4, h, w), 0.5, np.float16)}
    given = plugin.collate([{**p, "coarse": coarse}])
    assert (given["coarse_mean"] == 0.25).all() and (given["coarse_std"] == 0.5).all()
    plugin.coarse_from_target = False
    with pytest.raises(ValueError, match="coarse"):
        plugin.collate(pairs[:1])


def test_dropout_zeroes_the_coarse_latent_only(data):
    _, pairs = data
    plugin = make_plugin(data)
    many = pairs * 10
    a = plugin.collate(many, generator=torch.Generator().manual_seed(2))
    b = plugin.collate(many, generator=torch.Generator().manual_seed(2))
    for k in a:
        assert torch.equal(a[k], b[k])
    dropped = (a["coarse_mean"] == 0).flatten(1).all(1) & (a["coarse_std"] == 0).flatten(1).all(1)
    assert 4 <= int(dropped.sum()) <= 40
    raw = torch.stack([f32(p["target"]["vae.mean"]) for p in many])
    assert torch.equal(a["coarse_mean"][~dropped], raw[~dropped])
    assert torch.equal(a["source_tokens"], torch.stack([f32(p["source"]["dinov2.tokens"]) for p in many]))  # never dropped


def test_model_loss_and_save_load(data, tmp_path):
    _, pairs = data
    plugin = make_plugin(data)
    torch.manual_seed(0)
    model = plugin.build_model()
    assert isinstance(model, PcdmRefineModel) and model.unet.config.in_channels == 8 and model.unet.class_embedding is None
    batch = plugin.collate(pairs[:4], generator=torch.Generator().manual_seed(0))
    loss = plugin.loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(loss, plugin.loss(model, batch, generator=torch.Generator().manual_seed(0)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.image_proj_model_p.net[4].weight.grad.abs().sum() > 0
    assert model.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0  # the coarse latents reach conv_in

    model.save_pretrained(tmp_path / "saved")
    again = PcdmRefineModel.from_pretrained(tmp_path / "saved")
    x, t = torch.randn(2, 8, h, w), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x, t, batch["source_tokens"][:2]).sample, again.eval()(x, t, batch["source_tokens"][:2]).sample, atol=1e-6)


def test_pretrained_path_widens_conv_in(data, tmp_path):
    ds, _ = data
    torch.manual_seed(3)
    sd = UNet2DConditionModel(**BASE_MODELS["sd21"].tiny_unet_config)
    sd.save_pretrained(tmp_path / "sd" / "unet")
    model = PcdmRefinePlugin(ds.card, weights="pretrained", model=str(tmp_path / "sd")).build_model()
    conv = model.unet.conv_in
    assert conv.in_channels == 8 and model.unet.config.in_channels == 8
    assert torch.equal(conv.weight[:, :4], sd.conv_in.weight) and (conv.weight[:, 4:] == 0).all()
    assert torch.equal(conv.bias, sd.conv_in.bias)
    mine = model.unet.state_dict()
    for k, v in sd.state_dict().items():
        if not k.startswith("conv_in."):
            assert torch.equal(mine[k], v), k
    assert model.image_proj_model_p.net[0].in_features == D and model.image_proj_model_p.net[4].out_features == 32

    model.save_pretrained(tmp_path / "ckpt" / "model")
    back = PcdmRefinePlugin(ds.card, weights="pretrained", model=str(tmp_path / "ckpt")).build_model().state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_size_on_meta_device():
    card = {"resolution": [512, 352], "features": {
        "vae@a": {"name": "vae", "preset": "sd21", "scaling_factor": 0.18215, "outputs": {"mean.npy": {"shape": [4, 64, 44]}}},
        "dinov2@b": {"name": "dinov2", "preset": "giant", "outputs": {"tokens.npy": {"shape": [257, 1536]}}}}}
    with torch.device("meta"):
        model = PcdmRefinePlugin(card, weights="random").build_model()
    assert count(model.unet) == SD21_UNET_PARAMS + 4 * 320 * 3 * 3 == 865_922_244
    assert count(model) == 865_922_244 + 1_969_408 == 867_891_652
    assert model.unet.config.cross_attention_dim == SD21_UNET_CONFIG["cross_attention_dim"] == 1024


def test_sample_from_coarse_latents(data):
    _, pairs = data
    plugin = make_plugin(data)
    torch.manual_seed(0)
    model = plugin.build_model().eval()
    some = pairs[:3]
    coarse = torch.randn(3, 4, h, w)

    def run(items=some, **kw):
        return plugin.sample(model, items, num_inference_steps=2, scheduler="ddim", generator=torch.Generator().manual_seed(0), **kw)

    out = run(coarse=coarse)
    assert out.shape == (3, 4, h, w) and torch.isfinite(out).all() and torch.equal(out, run(coarse=coarse))
    assert not torch.equal(out, run(coarse=coarse, uncond="null"))  # official: zero context too; null: context kept
    assert not torch.equal(out, run(coarse=coarse, guidance_scale=1.0))
    assert run(coarse=coarse, guidance_rescale=2.0).shape == (3, 4, h, w)  # the official test's setting
    from_pairs = run([{**p, "coarse": p["target"]} for p in some])
    assert from_pairs.shape == (3, 4, h, w)
    with pytest.raises(ValueError, match="coarse"):
        run()
    assert plugin.sample(model, some, coarse=coarse, num_inference_steps=2).shape == (3, 4, h, w)  # UniPC (official)
    images = run(coarse=coarse, vae=AutoencoderKL(**TINY_VAE).eval())
    assert images.shape == (3, 3, H, W) and images.min() >= 0 and images.max() <= 1
