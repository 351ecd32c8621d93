"""reposedm: the plugin end to end on a tiny dataset built from the real fixture photos with
the reposedm preset (build -> train with guidance -> checkpoint -> exact resume -> sample
with and without pose guidance), its model, and the B1 / B2 ablations."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from PIL import Image

from posedata.cli import main as cli_main
from posedata.reader import Dataset, PairStream
from posedata.train import plugin_class
from posedata.train.reposedm import IN_CHANNELS, OUT_CHANNELS, RePoseDMModel, RePoseDMPlugin
from posedata.train.run import load_null_embeddings
from posedata.train.unet import BASE_MODELS

H, W = 64, 48
h, w = H // 8, W // 8


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(res=(H, W), preset="reposedm")


@pytest.fixture(scope="module")
def data(dataset):
    ds = Dataset(str(dataset))
    return ds, list(PairStream(ds, "train", RePoseDMPlugin.needs, seed=0, epochs=1))


def make_plugin(ds: Dataset, **options) -> RePoseDMPlugin:
    plugin = RePoseDMPlugin(ds.card, weights="tiny", **options)
    plugin.set_null_embeddings(load_null_embeddings(ds, plugin))
    return plugin


def cli(*args: str) -> str:
    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_declarations_and_the_preset_builds_what_it_reads(data):
    ds, pairs = data
    assert plugin_class("reposedm") is RePoseDMPlugin
    assert RePoseDMPlugin.needs == ("vae:sd15", "pose_latent:sd15", "higherhrnet")
    names = {c["name"] for c in ds.card["features"].values()}
    assert {"openpose", "vae", "pose_latent", "higherhrnet"} <= names
    plugin = make_plugin(ds)
    assert plugin.noise_scheduler.config.beta_schedule == "linear" and plugin.objective.learned_variance
    batch = plugin.collate(pairs[:4], torch.Generator().manual_seed(0))
    assert batch["pose_mean"].shape == (4, 4, h, w) and batch["pose_features"].shape == (4, 32, H // 4, W // 4)
    # dropout: pose -> the empty skeleton's posterior, context off, both together
    plugin.drop_prob = 1.0
    dropped = plugin.collate(pairs[:2], torch.Generator().manual_seed(0))
    assert torch.equal(dropped["keep"], torch.zeros(2))
    assert torch.equal(dropped["pose_mean"][0], torch.as_tensor(plugin.nulls["pose_latent.black_mean"], dtype=torch.float32))


def test_train_with_guidance_checkpoints_and_resumes_exactly_then_samples(dataset, tmp_path):
    common = ["--shards", str(dataset), "--weights", "tiny", "--batch-size", "2", "--checkpoint-every", "2", "--pose-guidance", "1.0"]
    cli("train", "reposedm", "--out", str(tmp_path / "full"), "--max-steps", "4", *common)
    with open(tmp_path / "full" / "loss.csv") as f:
        curve = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(curve) == 4 and all(np.isfinite(curve))
    assert (tmp_path / "full" / "checkpoint-4" / "model" / "config.json").is_file()
    cli("train", "reposedm", "--out", str(tmp_path / "split"), "--max-steps", "2", *common)
    cli("train", "reposedm", "--out", str(tmp_path / "split"), "--max-steps", "4", "--resume", "latest", *common)
    with open(tmp_path / "split" / "loss.csv") as f:
        assert [float(r["loss"]) for r in csv.DictReader(f)] == pytest.approx(curve, rel=1e-4)
    full = RePoseDMModel.from_pretrained(tmp_path / "full" / "checkpoint-4" / "model")
    split = RePoseDMModel.from_pretrained(tmp_path / "split" / "checkpoint-4" / "model")
    for (name, a), (_, b) in zip(full.state_dict().items(), split.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    base = ["--shards", str(dataset), "--run", str(tmp_path / "full"), "--split", "train", "--limit", "2", "--steps", "2"]
    cli("sample", "reposedm", "--out", str(tmp_path / "guided"), *base)
    cli("sample", "reposedm", "--out", str(tmp_path / "plain"), "--pose-guidance", "0", *base)
    guided, plain = pq.read_table(tmp_path / "guided" / "samples.parquet").to_pylist(), pq.read_table(tmp_path / "plain" / "samples.parquet").to_pylist()
    assert len(guided) == len(plain) == 2 and {"source_key", "target_key", "file"} <= set(guided[0])
    a = np.asarray(Image.open(tmp_path / "guided" / guided[0]["file"]))
    b = np.asarray(Image.open(tmp_path / "plain" / plain[0]["file"]))
    assert a.shape == b.shape == (H, W, 3)
    assert not np.array_equal(a, b)  # the pose guidance changes the samples
    assert (tmp_path / "guided" / "sheet.png").is_file()


def test_sampling_is_deterministic_and_runs_the_learned_variance_sampler(data):
    ds, pairs = data
    plugin = make_plugin(ds)
    torch.manual_seed(0)
    model = plugin.build_model().eval()

    def run(**kw):
        return plugin.sample(model, pairs[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw)

    out = run(pose_guidance=0.0)
    assert out.shape == (2, 4, h, w) and torch.isfinite(out).all()
    assert torch.equal(out, run(pose_guidance=0.0))
    assert not torch.equal(out, run(pose_guidance=50.0))
    ddpm = run(scheduler="ddpm", pose_guidance=0.0)  # eq. 2 with the learned range variance
    assert ddpm.shape == (2, 4, h, w) and torch.isfinite(ddpm).all()
    with pytest.raises(ValueError, match="uncond"):
        run(uncond="zeros")


def test_ablations_b1_and_b2(data):
    ds, pairs = data
    batch_pairs = pairs[:2]
    for options, has_rpa in (({"alignment": "none", "pose_guidance": 0.0}, False), ({"pose_guidance": 0.0}, True)):
        plugin = make_plugin(ds, **options)
        model = plugin.build_model()
        assert hasattr(model, "rpa") is has_rpa and model.config.alignment == ("rpa" if has_rpa else "none")
        batch = plugin.collate(batch_pairs, torch.Generator().manual_seed(0))
        loss = plugin.loss(model, batch, torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "attn2" not in n)
    with pytest.raises(ValueError, match="alignment"):
        RePoseDMPlugin(ds.card, weights="tiny", alignment="flow").build_model()


def test_guidance_changes_the_training_target(data):
    ds, pairs = data
    plugin, plain = make_plugin(ds, pose_guidance=1000.0), make_plugin(ds, pose_guidance=0.0)
    plugin.drop_prob = plain.drop_prob = 0.0
    torch.manual_seed(0)
    model = plugin.build_model()
    batch = plugin.collate(pairs[:2], torch.Generator().manual_seed(0))
    guided = plugin.loss(model, batch, torch.Generator().manual_seed(0))
    unguided = plain.loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(guided) and guided.item() != unguided.item()


def test_pretrained_adapts_an_sd15_unet(data, tmp_path):
    """The pretrained path: an SD-1.5-layout pipeline's unet/ (tiny here) gets conv_in widened
    (copy: the pose channels start at zero) and conv_out widened (variance channels start at
    zero), so its noise prediction is the original UNet's."""
    ds, _ = data
    torch.manual_seed(0)
    original = UNet2DConditionModel.from_config(BASE_MODELS["sd15"].tiny_unet_config)
    original.save_pretrained(tmp_path / "pipe" / "unet")
    plugin = RePoseDMPlugin(ds.card, weights="pretrained", model=str(tmp_path / "pipe"), preset="tiny")
    model = plugin.build_model().eval()
    assert (model.unet.config.in_channels, model.unet.config.out_channels) == (IN_CHANNELS, OUT_CHANNELS)
    x, pose = torch.randn(1, 4, h, w), torch.randn(1, 4, h, w)
    context = torch.randn(1, h * w, original.config.cross_attention_dim)
    levels = len(original.config.block_out_channels)
    with torch.no_grad():
        out = model.denoise_step(x, 10, pose, (context,) * levels)
        expected = original(x, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(out[:, :4], expected, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(out[:, 4:]) == 0


def test_paper_size_model():
    """SD-1.5 UNet with 8 in / 8 out channels, RHWF-width MapFormer (D = 96), cross-attention 768."""
    card = {"resolution": [256, 176], "features": {
        "vae@a": {"name": "vae", "preset": "sd15", "scaling_factor": 0.18215, "outputs": {"mean.npy": {"shape": [4, 32, 22]}}},
        "pose_latent@b": {"name": "pose_latent", "preset": "sd15", "outputs": {"mean.npy": {"shape": [4, 32, 22]}}},
        "higherhrnet@c": {"name": "higherhrnet", "outputs": {"pose_features.npy": {"shape": [32, "H/4", "W/4"]}}}}}
    plugin = RePoseDMPlugin(card, weights="random")
    with torch.device("meta"):
        model = plugin.build_model()
    assert model.unet.config.cross_attention_dim == 768 and model.rpa.mapformer.ffn.w_1.in_channels == 96
    assert model.rpa.iterations == 5 and model.rpa.kernels == (0, 9, 5, 3, 3, 3)


def test_frozen_networks_are_rebuilt_from_the_card_in_any_storage_dtype(data, tiny_dataset):
    """The guidance's VAE and HigherHRNet (and `posedata sample`'s decoding VAE) are the
    dataset's own: rebuilt from the card with its dtype, fingerprint checked."""
    from posedata.train.plugin import rebuild_extractor
    from posedata.train.sample import dataset_vae

    ds, _ = data
    for need in ("vae:sd15", "higherhrnet", "pose_latent:sd15"):
        assert rebuild_extractor(ds.card, need, "test").folder == ds.column(need).folder
    out = tiny_dataset(res=(H, W), features="vae:sd15", dtype="bf16")
    assert dataset_vae(Dataset(str(out)), "vae:sd15", "cpu").config.latent_channels == 4
    with pytest.raises(ValueError, match="no 'clip' feature"):
        rebuild_extractor(ds.card, "clip", "test")


def test_each_cross_attention_attends_its_own_resolution(data, tmp_path):
    """PIDM's per-resolution cross-attention: one token set per UNet level (h_l x w_l tokens,
    stride-2 halvings like the UNet's), each attn2 reads its own level's set, and the attn2
    outputs start at zero so an untrained UNet ignores the source."""
    ds, pairs = data
    plugin = make_plugin(ds)
    model = plugin.build_model().eval()
    levels = len(model.unet.config.block_out_channels)
    source, pose = torch.randn(2, 4, h, w), torch.randn(2, 4, h, w)
    with torch.no_grad():
        context, _ = model.context(source, pose)
    sizes = [(h, w)]
    for _ in range(levels - 1):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    assert [c.shape for c in context] == [(2, a * b, model.unet.config.cross_attention_dim) for a, b in sizes]
    seen: dict[str, int] = {}
    hooks = [m.to_k.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0].shape[1]))
             for name, m in model.unet.named_modules() if name.endswith("attn2")]
    noisy = torch.randn(2, 4, h, w)
    with torch.no_grad():
        out = model.denoise_step(noisy, 10, pose, context)
        unconditioned = model.denoise_step(noisy, 10, pose, tuple(torch.zeros_like(c) for c in context))
    for hook in hooks:
        hook.remove()
    assert seen and any(n.startswith("up_blocks") for n in seen) and any(n.startswith("mid_block") for n in seen)
    for name, tokens in seen.items():
        block, index = name.split(".")[:2]
        level = levels - 1 if block == "mid_block" else int(index) if block == "down_blocks" else levels - 1 - int(index)
        assert tokens == sizes[level][0] * sizes[level][1], name
    torch.testing.assert_close(out, unconditioned)  # zero-initialised attn2 outputs
    # the routing is rebuilt by from_pretrained (processors are not weights)
    model.save_pretrained(tmp_path / "model")
    loaded = RePoseDMModel.from_pretrained(tmp_path / "model")
    assert {n: p.level for n, p in loaded.unet.attn_processors.items()} == {n: p.level for n, p in model.unet.attn_processors.items()}
