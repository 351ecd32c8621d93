"""imagpose on tiny datasets built from the real fixture photos with `--preset imagpose`
(groups by file-name prefix: patn x2, pcdms x3), at 256x176 and 512x352: the padded 2 x 2
canvas, collate (flags, reference, dropout per stage), the CVA (diffusers' MotionAdapter at
the official 21 places, zero-initialised), the paper-size model on the meta device against
the official parameter counts, the pretrained loading path, the three stages through the CLI
with exact resume, and sampling in every scenario."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from diffusers import MotionAdapter, UNet2DConditionModel
from PIL import Image

from posedata.cli import main as cli_main
from posedata.reader import Dataset, GroupStream
from posedata.train import plugin_class
from posedata.train.imagpose import STAGE_PARTS, TINY_UNET, ImagPosePlugin, run_model_path
from posedata.train.imagpose_model import (
    ImagPoseModel,
    across_tiles,
    cva_targets,
    from_canvas,
    motion_adapter_config,
    to_canvas,
)
from posedata.train.imagpose_sample import sampling_items
from posedata.train.run import load_null_embeddings
from posedata.train.unet import SD15_UNET_CONFIG, tiny_unet_config

GROUP_REGEX = "(?P<group>patn|pcdms)"


@pytest.fixture(scope="module")
def ds256(tiny_dataset):
    return tiny_dataset(res=(256, 176), preset="imagpose", group_regex=GROUP_REGEX)


@pytest.fixture(scope="module")
def ds512(tiny_dataset):
    return tiny_dataset(res=(512, 352), preset="imagpose", group_regex=GROUP_REGEX)


def with_pose(sample: dict, seed: int) -> dict:
    """The tiny (random-weight) OpenPose finds nobody: give a sample a drawable body and hands."""
    rng = np.random.default_rng(seed)
    H, W = sample["image"].shape[:2] if "image" in sample else (256, 176)
    kp = np.stack([rng.uniform(4, W - 4, 18), rng.uniform(4, H - 4, 18), np.ones(18)], axis=1).astype(np.float32)
    hands = np.concatenate([rng.uniform(4, min(H, W) - 4, (2, 21, 2)), np.ones((2, 21, 1))], axis=-1).astype(np.float32)
    return {**sample, "openpose.keypoints": kp, "openpose.hands": hands}


def groups_of(ds_path, count=3, seed=0) -> tuple[Dataset, list[dict]]:
    ds = Dataset(str(ds_path))
    items = []
    for g in GroupStream(ds, "train", ImagPosePlugin.needs, seed=seed, epochs=None):
        items.append({**g, "samples": [with_pose(s, i) for i, s in enumerate(g["samples"])]})
        if len(items) == count:
            return ds, items
    raise AssertionError("unreachable")


def plugin_for(ds: Dataset, **options) -> ImagPosePlugin:
    plugin = ImagPosePlugin(ds.card, weights="tiny", **options)
    plugin.set_null_embeddings(load_null_embeddings(ds, plugin))
    return plugin


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- declarations, canvas, model ----------------------------------------------------------------


def test_registry_declarations_and_stage_settings(ds256):
    assert plugin_class("imagpose") is ImagPosePlugin
    assert ImagPosePlugin.stream == "groups"
    card = Dataset(str(ds256)).card
    assert {c["name"] + ":" + str(c["preset"]) for c in card["features"].values()} == {"openpose:full", "vae:sd15", "dinov2:base"}
    official = ImagPosePlugin.sample_recipes["official"]
    assert (official.scheduler, official.num_inference_steps, official.guidance_scale, official.uncond) == ("ddim", 30, 2.0, "zeros")
    lrs = {s: ImagPosePlugin(card, weights="random", stage=s).defaults for s in (1, 2, 3)}
    assert [lrs[s].learning_rate for s in (1, 2, 3)] == [5e-5, 5e-5, 1e-6]
    assert [lrs[s].batch_size for s in (1, 2, 3)] == [2, 4, 1] and {lrs[s].lr_schedule for s in lrs} == {"constant"}
    assert (lrs[1].weight_decay, lrs[1].max_grad_norm, lrs[1].ema_decay) == (1e-2, 1.0, None)
    official_sched = ImagPosePlugin(card, weights="tiny").noise_scheduler.config
    assert (official_sched.prediction_type, official_sched.rescale_betas_zero_snr, official_sched.timestep_spacing) == ("v_prediction", True, "trailing")
    plugin = ImagPosePlugin(card, weights="tiny")
    assert (plugin.objective.min_snr_gamma, plugin.objective.noise_offset) == (5.0, 0.05)
    paper = ImagPosePlugin(card, weights="tiny", recipe="paper")
    assert (paper.noise_scheduler.config.prediction_type, paper.noise_scheduler.config.beta_schedule) == ("epsilon", "linear")
    assert paper.objective.min_snr_gamma is None and paper.objective.noise_offset == 0
    with pytest.raises(ValueError, match="--stage must be one of"):
        ImagPosePlugin(card, weights="tiny", stage=4)


def test_canvas_tiles_in_official_order_and_padding_for_both_resolutions(ds256, ds512):
    tiles = torch.arange(4.0).reshape(1, 4, 1, 1, 1).expand(1, 4, 1, 2, 3)
    canvas = to_canvas(tiles)
    assert canvas.shape == (1, 1, 4, 6)
    assert canvas[0, 0, :2, :3].unique().tolist() == [0] and canvas[0, 0, :2, 3:].unique().tolist() == [1]  # TL, TR
    assert canvas[0, 0, 2:, :3].unique().tolist() == [2] and canvas[0, 0, 2:, 3:].unique().tolist() == [3]  # BL, BR
    assert torch.equal(from_canvas(canvas), tiles)
    # the official CVA split fails at 256x176 (22 latent columns, 11 at the 1/2 level): pad to 8
    for path, latent, padded in ((ds256, (32, 22), (32, 24)), (ds512, (64, 44), (64, 48))):
        plugin = ImagPosePlugin(Dataset(str(path)).card, weights="tiny")
        assert plugin.latent_shape[1:] == latent and plugin.tile_latent == padded
        assert plugin.tile_pixels == (padded[0] * 8, padded[1] * 8)


def test_paper_size_model_matches_the_official_parameter_counts():
    with torch.device("meta"):
        model = ImagPoseModel(unet_config={**SD15_UNET_CONFIG, "in_channels": 9}, use_cva=True)
    counts = {k: round(v / 1e6, 3) for k, v in model.parameter_counts().items()}
    # official: tokenizer 0.787 M, pose guider 1.086 M, UNet 859.5 M, CVA 453.2 M (21 modules)
    assert counts == {"unet": 859.535, "pose_guider": 1.086, "tokenizer": 0.787, "cva": 453.209}
    names = [n for n, _ in cva_targets(model.unet)]
    assert len(names) == 21
    assert names[:8] == ["down.0.0", "down.0.1", "down.1.0", "down.1.1", "down.2.0", "down.2.1", "down.3.0", "down.3.1"]
    assert names[8] == "mid.0.0" and names[9:12] == ["up.0.0", "up.0.1", "up.0.2"] and names[-1] == "up.3.2"
    assert type(model.unet.down_blocks[3].resnets[0]).__name__ == "ResnetBlock2D"  # down 3: after ResNets
    motion = model.cva.down_blocks[0].motion_modules[0]
    block = motion.transformer_blocks[0]
    assert (motion.norm.num_groups, block.attn1.heads, block.attn2.heads, type(block.ff.net[0]).__name__) == (32, 8, 8, "GEGLU")
    assert block.attn2.is_cross_attention is False and block.pos_embed is not None  # two temporal self-attentions, sinusoidal PE


def test_cva_runs_diffusers_motion_layers_with_a_per_tile_group_norm():
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(16, 16, 16, 16), motion_layers_per_block=1, motion_num_attention_heads=2, motion_norm_num_groups=8)
    motion = adapter.down_blocks[0].motion_modules[0]
    for p in motion.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 4, 16, 3, 5)
    same = x[:, :1].expand(2, 4, 16, 3, 5).contiguous()  # equal tiles: per-tile and joint norm agree
    reference = motion(same.reshape(8, 16, 3, 5), num_frames=4).reshape(2, 4, 16, 3, 5)
    assert torch.allclose(across_tiles(motion, same), reference, atol=1e-5)  # same layers, same order as diffusers
    block = motion.transformer_blocks[0]
    with torch.no_grad():  # attention and feed-forward silent: what is left is norm -> proj -> residual, per tile
        for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2]):
            linear.weight.zero_()
            linear.bias.zero_()
    y = x.clone()
    y[:, 1] *= 5
    assert torch.equal(across_tiles(motion, x)[:, 0], across_tiles(motion, y)[:, 0])  # official: (b f) c h w GroupNorm
    assert not torch.allclose(across_tiles(motion, x)[:, 1], across_tiles(motion, y)[:, 1])


def test_official_min_snr_weight_adds_one_before_clipping(ds256):
    from diffusers.training_utils import compute_snr

    from posedata.train.diffusion import NoisedBatch

    plugin = ImagPosePlugin(Dataset(str(ds256)).card, weights="tiny")
    t = torch.tensor([0, 400, 999])
    target = torch.ones(3, 1, 1, 1)
    pred = torch.zeros(3, 1, 1, 1)  # squared error 1 per sample: the loss is the mean weight
    snr = compute_snr(plugin.noise_scheduler, t).float() + 1
    expected = (torch.minimum(snr, torch.tensor(5.0)) / snr).mean()
    got = plugin.objective.loss(pred, NoisedBatch(pred, t, target, target), scheduler=plugin.noise_scheduler)
    assert torch.allclose(got, expected) and float(snr[2]) == 1.0  # zero terminal SNR: weight 1, not 0


def test_a_fresh_cva_keeps_the_stage1_output_and_only_cva_trains_in_stage2(ds256, tmp_path):
    ds, groups = groups_of(ds256, 2)
    plugin = plugin_for(ds)
    torch.manual_seed(0)
    stage1 = plugin.build_model()
    assert stage1.cva is None and all(p.requires_grad for p in stage1.parameters())
    assert set(stage1.parts()) == {"unet", "pose_guider", "tokenizer"}  # tiny DINOv2 is the UNet's width: no projection
    stage1.save_pretrained(tmp_path / "s1")
    stage2_plugin = plugin_for(ds, stage=2, init=str(tmp_path / "s1"))
    stage2 = stage2_plugin.build_model()
    assert stage2.cva is not None and len(cva_targets(stage2.unet)) == 13  # tiny: 4 levels, 1 layer each
    assert all(float(m.proj_out.weight.abs().sum()) == 0 for m in [*stage2.cva.down_blocks[0].motion_modules])
    trainable = {n.split(".")[0] for n, p in stage2.named_parameters() if p.requires_grad}
    assert trainable == {"cva"}
    batch = plugin.collate(groups, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plugin.loss(stage1, batch, torch.Generator().manual_seed(1))
        b = stage2_plugin.loss(stage2, batch, torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-6)  # zero proj_out: CVA starts as the identity
    loss = stage2_plugin.loss(stage2, batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert float(stage2.cva.down_blocks[1].motion_modules[0].proj_out.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in stage2.unet.parameters())
    stage3 = plugin_for(ds, stage=3, init=str(tmp_path / "s1")).build_model()
    assert all(p.requires_grad for p in stage3.parameters()) and set(STAGE_PARTS[3]) >= set(stage3.parts())


def test_stage_rules_fail_clearly(ds256, tmp_path):
    ds = Dataset(str(ds256))
    with pytest.raises(ValueError, match="stage 2 starts from the previous stage's run: pass --init"):
        plugin_for(ds, stage=2).build_model()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        plugin_for(ds, stage=2, init=str(tmp_path / "none")).build_model()
    model = plugin_for(ds).build_model().with_cva()
    model.save_pretrained(tmp_path / "with_cva")
    with pytest.raises(ValueError, match="stage 1 trains a model without CVA"):
        plugin_for(ds, stage=1, init=str(tmp_path / "with_cva")).build_model()
    with pytest.raises(ValueError, match="trained with --recipe official"):
        plugin_for(ds, stage=3, init=str(tmp_path / "with_cva"), recipe="paper").build_model()


# ---- collate and loss -------------------------------------------------------------------------


def test_collate_builds_the_ilc_canvas_with_one_to_three_targets(ds256):
    ds, groups = groups_of(ds256, 3)
    plugin = plugin_for(ds)
    (hp, wp), (h, w) = plugin.tile_latent, plugin.latent_shape[1:]
    flags_seen = set()
    for seed in range(12):
        batch = plugin.collate(groups, torch.Generator().manual_seed(seed))
        assert batch["latent_mean"].shape == batch["masked_mean"].shape == (3, 4, 2 * hp, 2 * wp)
        assert batch["mask"].shape == batch["loss_mask"].shape == (3, 1, 2 * hp, 2 * wp)
        assert batch["pose"].shape == (3, 3, 16 * hp, 16 * wp) and float(batch["pose"].min()) >= 0 and float(batch["pose"].max()) <= 1
        assert batch["reference_mean"].shape == (3, 4, h, w)
        known = from_canvas(batch["mask"])[:, :, 0, 0, 0]  # [B, 4] per-tile flag
        flags_seen |= {int(k.sum()) for k in known}
        assert ((known.sum(1) >= 1) & (known.sum(1) <= 3)).all()
        tiles_latent, tiles_masked = from_canvas(batch["latent_mean"]), from_canvas(batch["masked_mean"])
        black = plugin.null("vae:sd15.black_mean")
        for b in range(3):
            for t in range(4):
                if known[b, t]:
                    assert torch.equal(tiles_masked[b, t], tiles_latent[b, t])
                else:
                    assert torch.allclose(tiles_masked[b, t, :, :h, :w], black)
            # the reference is one of the source tiles
            assert any(known[b, t] and torch.equal(batch["reference_mean"][b], tiles_latent[b, t, :, :h, :w]) for t in range(4))
        region = from_canvas(batch["loss_mask"])
        assert region[..., :h, :w].eq(1).all() and region[..., w:].eq(0).all()  # the padding is out of the loss
    assert flags_seen == {1, 2, 3}


def test_condition_dropout_per_stage(ds256):
    ds, groups = groups_of(ds256, 2)
    null = plugin_for(ds).null("dinov2:base.tokens")
    collated = plugin_for(ds).collate(groups, torch.Generator().manual_seed(0))

    plugins = {stage: plugin_for(ds, stage=stage, init="unused") for stage in (1, 2)}

    def dropped(stage, seed, n=20):
        rows = [i % len(groups) for i in range(n)]
        batch = {k: collated[k][rows].clone() for k in ("image_tokens", "reference_mean", "reference_std")}
        batch["image_tokens"][:] = 1.0
        plugins[stage].drop(batch, torch.Generator().manual_seed(seed))
        return (batch["image_tokens"] == null).flatten(1).all(1), (batch["reference_mean"] == 0).flatten(1).all(1)

    stage1 = [dropped(1, s) for s in range(200)]
    assert all(d.all() or not d.any() for d, _ in stage1)  # one draw for the whole batch
    assert 8 <= sum(bool(d.all()) for d, _ in stage1) <= 35 and not any(v.any() for _, v in stage1)  # p = 0.1
    dino, vae = (torch.cat(x) for x in zip(*[dropped(2, s) for s in range(100)]))  # 2000 samples
    both, only_dino, only_vae = (dino & vae).sum(), (dino & ~vae).sum(), (vae & ~dino).sum()
    assert all(60 <= int(n) <= 140 for n in (both, only_dino, only_vae)), (both, only_dino, only_vae)  # 5 % each
    # collate applies it: the same draws with the same generator
    again = plugins[2].collate(groups, torch.Generator().manual_seed(5))
    assert torch.equal(again["image_tokens"], plugins[2].collate(groups, torch.Generator().manual_seed(5))["image_tokens"])


def test_loss_is_the_objective_over_the_canvas_without_padding(ds256, monkeypatch):
    from posedata.train.diffusion import Objective

    ds, groups = groups_of(ds256, 2)
    plugin = plugin_for(ds)
    torch.manual_seed(0)
    model = plugin.build_model()
    batch = plugin.collate(groups, torch.Generator().manual_seed(0))
    seen = {}
    real = Objective.loss

    def spy(self, prediction, step, mask=None, scheduler=None):
        seen.update(prediction=prediction, mask=mask, target=step.target)
        return real(self, prediction, step, mask=mask, scheduler=scheduler)

    monkeypatch.setattr(Objective, "loss", spy)
    loss = plugin.loss(model, batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and seen["prediction"].shape == seen["target"].shape == batch["latent_mean"].shape
    assert torch.equal(seen["mask"], batch["loss_mask"])
    # a prediction wrong only in the padding costs nothing
    step_target = seen["target"]
    monkeypatch.setattr(Objective, "loss", real)
    wrong = step_target.clone()
    tiles = from_canvas(wrong)
    tiles[..., plugin.latent_shape[2]:] += 10.0
    from posedata.train.diffusion import NoisedBatch

    fake = NoisedBatch(noisy=wrong, timesteps=torch.tensor([500, 500]), target=step_target, noise=step_target)
    paper = ImagPosePlugin(ds.card, weights="tiny", recipe="paper")  # plain MSE: no SNR weight
    assert float(paper.objective.loss(to_canvas(tiles), fake, mask=batch["loss_mask"])) == 0.0
    assert float(paper.objective.loss(to_canvas(tiles), fake)) > 0.0


# ---- the pretrained path ------------------------------------------------------------------------


def test_pretrained_loads_an_sd15_unet_and_an_animatediff_adapter(ds256, tmp_path):
    ds = Dataset(str(ds256))
    config = {**tiny_unet_config(SD15_UNET_CONFIG), **TINY_UNET}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    unet.save_pretrained(tmp_path / "sd" / "unet")
    adapter = MotionAdapter(**motion_adapter_config(config, heads=1))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    adapter.save_pretrained(tmp_path / "adapter")

    plugin = ImagPosePlugin(ds.card, weights="pretrained", model=str(tmp_path / "sd"))
    plugin.set_null_embeddings(load_null_embeddings(ds, plugin))
    model = plugin.build_model()
    assert model.unet.conv_in.in_channels == 9
    assert torch.equal(model.unet.conv_in.bias, unet.conv_in.bias)  # official: random kernel, SD bias kept
    assert torch.equal(model.unet.conv_out.weight, unet.conv_out.weight)
    model.save_pretrained(tmp_path / "s1" / "model")

    stage2 = ImagPosePlugin(ds.card, weights="pretrained", stage=2, init=str(tmp_path / "s1"), cva_model=str(tmp_path / "adapter")).build_model()
    loaded, saved = stage2.cva.state_dict(), adapter.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert run_model_path(str(tmp_path / "s1")) == str(tmp_path / "s1")

    # the official stage 2 starts from AnimateAnyone's motion_module.pth: original AnimateDiff key names
    original = {}
    for key, value in saved.items():
        block, _, rest = key.partition(".motion_modules.")
        index, _, inner = rest.partition(".")
        inner = (inner.replace("norm1", "norms.0").replace("norm2", "norms.1").replace("norm3", "ff_norm")
                 .replace("attn1", "attention_blocks.0").replace("attn2", "attention_blocks.1"))
        original[f"{block}.motion_modules.{index}.temporal_transformer.{inner}"] = value
    original["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"] = torch.zeros(1, 32, 8)
    torch.save(original, tmp_path / "motion_module.pth")
    from_file = ImagPosePlugin(ds.card, weights="pretrained", stage=2, init=str(tmp_path / "s1"), cva_model=str(tmp_path / "motion_module.pth")).build_model()
    assert all(torch.equal(from_file.cva.state_dict()[k], v) for k, v in saved.items())


# ---- three stages, resume, sampling (CLI) ---------------------------------------------------------


def train(ds, out, *args):
    result = CliRunner().invoke(cli_main, ["train", "imagpose", "--shards", str(ds), "--out", str(out), "--weights", "tiny", *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def losses(run) -> list[float]:
    with open(run / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_three_stages_resume_exactly_and_sample_every_scenario_at_256x176(ds256, tmp_path):
    small = ("--batch-size", "2", "--checkpoint-every", "2")
    train(ds256, tmp_path / "s1", "--stage", "1", "--max-steps", "4", *small)
    train(ds256, tmp_path / "half", "--stage", "1", "--max-steps", "2", *small)
    train(ds256, tmp_path / "half", "--stage", "1", "--max-steps", "4", "--resume", "latest", *small)
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "s1"), rel=1e-5) and len(losses(tmp_path / "s1")) == 4
    train(ds256, tmp_path / "s2", "--stage", "2", "--init", str(tmp_path / "s1"), "--max-steps", "2", *small)
    train(ds256, tmp_path / "s3", "--stage", "3", "--init", str(tmp_path / "s2"), "--max-steps", "2", *small)
    before = ImagPoseModel.from_pretrained(run_model_path(str(tmp_path / "s1")), subfolder="model")
    after2 = ImagPoseModel.from_pretrained(run_model_path(str(tmp_path / "s2")), subfolder="model")
    assert all(torch.equal(a, b) for a, b in zip(before.unet.parameters(), after2.unet.parameters()))  # stage 2: CVA only
    config = json.loads((tmp_path / "s3" / "config.json").read_text())
    assert config["learning_rate"] == 2e-5  # stage 3 at 1/50 of stage 1, as official
    assert (config["data"]["groups"], config["data"]["groups_of_one_image_skipped"]) == (2, 0)

    height, width = 256, 176
    expected = {"single": 3, "t1": 3, "multi-source": 3}
    for mode in ("single", "t1", "multi-source", "multi-target"):
        out = tmp_path / f"samples-{mode}"
        result = CliRunner().invoke(cli_main, ["sample", "imagpose", "--shards", str(ds256), "--split", "train", "--run", str(tmp_path / "s3"),
                                               "--out", str(out), "--mode", mode, "--steps", "1", "-n", "3", "--guidance", "1"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        rows = pq.read_table(out / "samples.parquet").to_pylist()
        assert len(rows) == expected.get(mode, len(rows)) and rows
        for row in rows:
            assert row["mode"] == mode and row["source_key"] != row["target_key"] and row["source_key"] == row["source_keys"][0]
            assert Image.open(out / row["file"]).size == (width, height)
        assert (out / "sheet.png").is_file()
        if mode == "multi-target":
            assert len(rows) > 3 and len({r["source_key"] for r in rows}) < len(rows)  # several targets per canvas
        if mode == "t1":
            assert {r["tile"] for r in rows} == {1}
    ds = Dataset(str(ds256))
    items, _ = sampling_items(ds, "train", ImagPosePlugin.needs, "multi-source", 10)
    assert max(len(s) for s, _ in items) == 2 and all(t[0]["__key__"] not in [x["__key__"] for x in s] for s, t in items)


def test_train_and_sample_at_512x352(ds512, tmp_path):
    train(ds512, tmp_path / "s1", "--max-steps", "1", "--checkpoint-every", "1", "--batch-size", "1")
    train(ds512, tmp_path / "s2", "--stage", "2", "--init", str(tmp_path / "s1"), "--max-steps", "1", "--checkpoint-every", "1", "--batch-size", "1")
    out = tmp_path / "samples"
    result = CliRunner().invoke(cli_main, ["sample", "imagpose", "--shards", str(ds512), "--split", "train", "--run", str(tmp_path / "s2"),
                                           "--out", str(out), "--mode", "multi-target", "--steps", "1", "-n", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert rows and all(Image.open(out / r["file"]).size == (352, 512) for r in rows)
