"""pcdm-inpaint on a tiny dataset built from the real fixtures: collate layout ([source |
target] latents, mask, masked latents, skeletons), condition dropout through the stored null
embeddings, the model (context, pose added after conv_in, save / load), loss, the pretrained
loading path (conv_in widened), the paper-size model on the meta device, and sampling (training through run_training with resume: tests/test_plugin_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from posedata.extractors.vae import TINY_CONFIG as TINY_VAE
from posedata.reader import Dataset, PairStream
from posedata.render import draw_openpose
from posedata.train import plugin_class
from posedata.train.pcdm_inpaint import PcdmInpaintModel, PcdmInpaintPlugin
from posedata.train.run import load_null_embeddings
from posedata.train.unet import BASE_MODELS, SD21_UNET_CONFIG

H, W, D = 64, 48, 32  # stored resolution; tiny CLIP / DINOv2 widths
h, w = H // 8, W // 8
SD21_UNET_PARAMS = 865_910_724  # stabilityai/stable-diffusion-2-1-base unet


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(res=(H, W), features="openpose,clip,vae:sd21,dinov2:giant")


@pytest.fixture(scope="module")
def data(dataset):
    ds = Dataset(str(dataset))
    probe = PcdmInpaintPlugin(ds.card, weights="tiny")
    nulls = load_null_embeddings(ds, probe)
    pairs = list(PairStream(ds, "train", probe.needs, seed=0, epochs=1))
    return ds, nulls, with_keypoints(pairs)


def with_keypoints(pairs: list[dict]) -> list[dict]:
    """The tiny (random-weight) OpenPose finds no joints: give every sample a drawable pose."""
    rng = np.random.default_rng(0)
    out = []
    for p in pairs:
        pair = {}
        for role in ("source", "target"):
            kp = np.stack([rng.uniform(4, W - 4, 18), rng.uniform(4, H - 4, 18), np.ones(18)], axis=1).astype(np.float32)
            kp[3, 2] = 0.0  # one missing joint
            pair[role] = {**p[role], "openpose.keypoints": kp}
        out.append(pair)
    return out


def make_plugin(data, drop_prob: float | None = None) -> PcdmInpaintPlugin:
    ds, nulls, _ = data
    plugin = PcdmInpaintPlugin(ds.card, weights="tiny")
    plugin.set_null_embeddings(nulls)
    if drop_prob is not None:
        plugin.drop_prob = drop_prob
    return plugin


def f32(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def test_registry_declarations_and_nulls(data):
    _, nulls, pairs = data
    assert plugin_class("pcdm-inpaint") is PcdmInpaintPlugin
    assert PcdmInpaintPlugin.needs == ("vae:sd21", "dinov2:giant", "clip", ("openpose:full", "openpose", "keypoints_annotated"))
    assert PcdmInpaintPlugin.needs_pixels is False
    d = PcdmInpaintPlugin.presets["paper"].train
    assert (d.learning_rate, d.weight_decay, d.warmup_steps, d.batch_size, d.max_grad_norm) == (1e-4, 0.01, 5000, 8, 1.0)
    assert PcdmInpaintPlugin.noise_offset == 0.1 and PcdmInpaintPlugin.base_model == "sd21"
    assert {k: v.shape for k, v in nulls.items()} == {
        "vae:sd21.black_mean": (4, h, w), "vae:sd21.black_std": (4, h, w), "dinov2:giant.tokens": (257, D), "clip.embeds": (D,)}
    assert len(pairs) == 20 and {"vae.mean", "vae.std", "dinov2.tokens", "clip.embeds", "openpose.keypoints"} <= set(pairs[0]["source"])


def test_collate_layout(data):
    _, nulls, pairs = data
    plugin = make_plugin(data, drop_prob=0.0)
    batch = plugin.collate(pairs[:3])
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == {"latent_mean": (3, 4, h, 2 * w), "latent_std": (3, 4, h, 2 * w), "masked_mean": (3, 4, h, 2 * w),
                      "masked_std": (3, 4, h, 2 * w), "mask": (3, 1, h, 2 * w), "pose": (3, 3, H, 2 * W),
                      "source_tokens": (3, 257, D), "target_embeds": (3, D)}
    assert all(v.dtype == torch.float32 for v in batch.values())
    src, tgt = pairs[0]["source"], pairs[0]["target"]
    assert torch.equal(batch["latent_mean"][0, ..., :w], f32(src["vae.mean"]))
    assert torch.equal(batch["latent_mean"][0, ..., w:], f32(tgt["vae.mean"]))
    assert torch.equal(batch["latent_std"][0, ..., w:], f32(tgt["vae.std"]))
    assert torch.equal(batch["masked_mean"][0, ..., :w], f32(src["vae.mean"]))
    assert torch.equal(batch["masked_mean"][0, ..., w:], f32(nulls["vae:sd21.black_mean"]))
    assert torch.equal(batch["masked_std"][0, ..., w:], f32(nulls["vae:sd21.black_std"]))
    assert (batch["mask"][..., :w] == 1).all() and (batch["mask"][..., w:] == 0).all()  # 1 = known source half
    left = torch.from_numpy(draw_openpose(src["openpose.keypoints"], H, W)).permute(2, 0, 1).float() / 127.5 - 1
    right = torch.from_numpy(draw_openpose(tgt["openpose.keypoints"], H, W)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(batch["pose"][0, :, :, :W], left) and torch.equal(batch["pose"][0, :, :, W:], right)
    assert batch["pose"].min() >= -1 and batch["pose"].max() <= 1 and (batch["pose"] > -1).any()
    assert torch.equal(batch["source_tokens"][0], f32(src["dinov2.tokens"]))
    assert torch.equal(batch["target_embeds"][0], f32(tgt["clip.embeds"]))


def test_condition_dropout_uses_the_null_embeddings(data):
    _, nulls, pairs = data
    plugin = make_plugin(data)
    many = pairs * 10
    a = plugin.collate(many, generator=torch.Generator().manual_seed(5))
    b = plugin.collate(many, generator=torch.Generator().manual_seed(5))
    for k in a:
        assert torch.equal(a[k], b[k]), "seeded collate must repeat"
    null_tokens, null_embeds = f32(nulls["dinov2:giant.tokens"]), f32(nulls["clip.embeds"])
    raw_tokens = torch.stack([f32(p["source"]["dinov2.tokens"]) for p in many])
    raw_embeds = torch.stack([f32(p["target"]["clip.embeds"]) for p in many])
    dropped_t = (a["source_tokens"] == null_tokens).flatten(1).all(1)
    dropped_e = (a["target_embeds"] == null_embeds).all(1)
    assert 4 <= int(dropped_t.sum()) <= 40 and 4 <= int(dropped_e.sum()) <= 40
    assert not torch.equal(dropped_t, dropped_e)  # independent draws
    assert torch.equal(a["source_tokens"][~dropped_t], raw_tokens[~dropped_t])
    assert torch.equal(a["target_embeds"][~dropped_e], raw_embeds[~dropped_e])
    assert torch.equal(a["latent_mean"], plugin.collate(many, generator=torch.Generator().manual_seed(9))["latent_mean"])

    plugin.drop_prob = 1.0
    c = plugin.collate(pairs[:4])
    assert (c["source_tokens"] == null_tokens).all() and (c["target_embeds"] == null_embeds).all()
    fresh = PcdmInpaintPlugin(data[0].card, weights="tiny")
    with pytest.raises(ValueError, match="null"):
        fresh.collate(pairs[:2])
    with pytest.raises(ValueError, match="null"):
        fresh.set_null_embeddings({"clip.embeds": nulls["clip.embeds"]})


def test_model_context_pose_and_save_load(data, tmp_path):
    _, _, pairs = data
    plugin = make_plugin(data, drop_prob=0.0)
    torch.manual_seed(0)
    model = plugin.build_model().eval()
    assert isinstance(model, PcdmInpaintModel) and model.unet.config.in_channels == 9
    assert model.unet.config.class_embed_type == "projection" and model.unet.config.projection_class_embeddings_input_dim == D
    batch = plugin.collate(pairs[:2])
    assert model.context(batch["source_tokens"], batch["target_embeds"]).shape == (2, 258, D)
    with torch.no_grad():  # pose_proj's last conv starts at zero (ControlNet); make it count
        model.pose_proj.conv_out.weight.normal_(0, 0.05)
    x, t = torch.randn(2, 9, h, 2 * w), torch.tensor([10, 900])
    args = (batch["source_tokens"], batch["target_embeds"])
    with torch.no_grad():
        out = model(x, t, *args, batch["pose"]).sample
        other_pose = model(x, t, *args, torch.flip(batch["pose"], dims=[-1])).sample
    assert out.shape == (2, 4, h, 2 * w) and not torch.allclose(out, other_pose)
    assert model.unet.conv_in._residual is None  # the pose residual never outlives a call

    model.save_pretrained(tmp_path / "saved")
    again = PcdmInpaintModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.allclose(again(x, t, *args, batch["pose"]).sample, out, atol=1e-6)


def test_loss_is_finite_repeatable_and_trains_every_part(data):
    _, _, pairs = data
    plugin = make_plugin(data)
    torch.manual_seed(0)
    model = plugin.build_model()
    batch = plugin.collate(pairs[:4], generator=torch.Generator().manual_seed(0))
    loss = plugin.loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(loss, plugin.loss(model, batch, generator=torch.Generator().manual_seed(0)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for name in ("pose_proj.conv_out.weight", "image_proj_model_p.net.0.weight", "unet.class_embedding.linear_1.weight", "unet.conv_in.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0  # mask + masked latents reach conv_in


def tiny_sd_unet(cross_attention_dim: int = D) -> UNet2DConditionModel:
    torch.manual_seed(3)
    return UNet2DConditionModel(**{**BASE_MODELS["sd21"].tiny_unet_config, "cross_attention_dim": cross_attention_dim})


def test_pretrained_path_widens_conv_in(data, tmp_path):
    ds, _, _ = data
    sd = tiny_sd_unet()
    sd.save_pretrained(tmp_path / "sd" / "unet")  # an SD pipeline directory's layout
    plugin = PcdmInpaintPlugin(ds.card, weights="pretrained", model=str(tmp_path / "sd"))
    model = plugin.build_model()
    conv = model.unet.conv_in
    assert conv.in_channels == 9 and model.unet.config.in_channels == 9
    assert torch.equal(conv.weight[:, :4], sd.conv_in.weight) and (conv.weight[:, 4:] == 0).all()
    assert torch.equal(conv.bias, sd.conv_in.bias)
    mine = model.unet.state_dict()
    for k, v in sd.state_dict().items():
        if not k.startswith("conv_in."):
            assert torch.equal(mine[k], v), k
    assert model.unet.class_embedding.linear_1.in_features == D

    plugin.conv_in_init = "official"  # what ignore_mismatched_sizes leaves: a fresh kernel
    official = plugin.build_model().unet.conv_in
    assert torch.equal(official.bias, sd.conv_in.bias) and (official.weight[:, 4:] != 0).any()
    assert not torch.equal(official.weight[:, :4], sd.conv_in.weight)

    # a trainer checkpoint (checkpoint-N/model) comes back through the same path
    model.save_pretrained(tmp_path / "ckpt" / "model")
    back = PcdmInpaintPlugin(ds.card, weights="pretrained", model=str(tmp_path / "ckpt")).build_model()
    theirs = back.state_dict()
    assert set(theirs) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(theirs[k], v), k

    tiny_sd_unet(cross_attention_dim=2 * D).save_pretrained(tmp_path / "wide" / "unet")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        PcdmInpaintPlugin(ds.card, weights="pretrained", model=str(tmp_path / "wide")).build_model()


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_size_on_meta_device():
    card = {"resolution": [512, 352], "features": {
        "vae@a": {"name": "vae", "preset": "sd21", "scaling_factor": 0.18215, "outputs": {"mean.npy": {"shape": [4, 64, 44]}}},
        "dinov2@b": {"name": "dinov2", "preset": "giant", "outputs": {"tokens.npy": {"shape": [257, 1536]}}},
        "clip@c": {"name": "clip", "outputs": {"embeds.npy": {"shape": [1024]}}}}}
    with torch.device("meta"):
        base = UNet2DConditionModel(**SD21_UNET_CONFIG)
        model = PcdmInpaintPlugin(card, weights="random").build_model()
    assert count(base) == SD21_UNET_PARAMS
    conv_in_extra = 5 * 320 * 3 * 3
    class_embedding = (1024 * 1280 + 1280) + (1280 * 1280 + 1280)
    mlp = (1536 * 768 + 768) + 2 * 768 + (768 * 1024 + 1024)
    assert count(model.unet) == SD21_UNET_PARAMS + conv_in_extra + class_embedding
    assert count(model.image_proj_model_p) == mlp == 1_969_408
    assert count(model.pose_proj) == 1_086_480  # ControlNetConditioningEmbedding(320, 3, (16, 32, 96, 256))
    assert count(model) == 871_932_692
    assert model.unet.config.cross_attention_dim == 1024 and model.unet.conv_in.in_channels == 9


def test_sample_shapes_and_options(data):
    _, _, pairs = data
    plugin = make_plugin(data)
    torch.manual_seed(0)
    model = plugin.build_model().eval()
    some = [{"source": p["source"], "target": dict(p["target"])} for p in pairs[:3]]

    def run(**kw):
        return plugin.sample(model, some, num_inference_steps=2, scheduler="ddim", generator=torch.Generator().manual_seed(0), **kw)

    out = run()
    assert out.shape == (3, 4, h, w) and torch.isfinite(out).all() and torch.equal(out, run())
    assert not torch.equal(out, run(guidance_scale=1.0))
    assert not torch.equal(out, run(uncond="null"))  # the official recipe's zero embeddings vs the stored nulls
    assert run(guidance_rescale=0.7).shape == (3, 4, h, w)
    embeds = torch.randn(3, D)
    for p in some:
        del p["target"]["clip.embeds"]  # the prior's prediction stands in for it
    with_prior = run(target_embeds=embeds)
    assert with_prior.shape == (3, 4, h, w) and not torch.equal(with_prior, out)
    assert plugin.sample(model, some, num_inference_steps=2, target_embeds=embeds).shape == (3, 4, h, w)  # UniPC (official)
    torch.manual_seed(0)
    images = run(target_embeds=embeds, vae=AutoencoderKL(**TINY_VAE).eval())
    assert images.shape == (3, 3, H, W) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="uncond"):
        run(target_embeds=embeds, uncond="nothing")
