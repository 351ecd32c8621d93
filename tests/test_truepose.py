"""truepose on a tiny dataset built from the real fixture photos with `--preset truepose`:
collate (regions at their ATR ids, A_tau, joint condition dropout), the model (identical
initial UNets, fusion as the identity without a condition, SourceNet's tail frozen, save /
load), the pretrained loading path (both UNets + SD's null text embedding), the paper-size
model on the meta device, training with exact resume, sampling, and the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from test_pcdm_inpaint import H, W, with_keypoints  # the same fixture size; random drawable poses

from posedata.cli import main as cli_main
from posedata.extractors.parsing import ATR_LABELS, NUM_LABELS
from posedata.reader import Dataset, PairStream
from posedata.train import plugin_class
from posedata.train.run import run_training
from posedata.train.truepose import TruePoseModel, TruePosePlugin, transformer_blocks
from posedata.train.unet import SD15_UNET_CONFIG, tiny_unet_config

h, w = H // 8, W // 8
SD15_UNET_PARAMS = 859_520_964  # stable-diffusion-v1-5 unet


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(res=(H, W), preset="truepose")


@pytest.fixture(scope="module")
def data(dataset):
    ds = Dataset(str(dataset))
    pairs = list(PairStream(ds, "train", TruePosePlugin.needs, seed=0, epochs=1))
    return ds, with_keypoints(pairs)


def make_plugin(data, drop_prob: float | None = None) -> TruePosePlugin:
    ds, _ = data
    plugin = TruePosePlugin(ds.card, weights="tiny")
    if drop_prob is not None:
        plugin.drop_prob = drop_prob
    return plugin


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_and_declarations():
    assert plugin_class("truepose") is TruePosePlugin
    assert TruePosePlugin.needs == ("vae:sd15", "parsing", "clip_regions", ("openpose", "keypoints_annotated"))
    paper = TruePosePlugin.presets["paper"].train
    assert (paper.learning_rate, paper.lr_schedule, paper.batch_size, paper.warmup_steps) == (1e-5, "constant", 12, 0)
    recipe = TruePosePlugin.sample_recipes["paper"]
    assert (recipe.scheduler, recipe.num_inference_steps, recipe.guidance_scale) == ("ddim", 35, 3.5)


def test_collate_layout_regions_and_selection(data):
    _, pairs = data
    plugin = make_plugin(data, drop_prob=0.0)
    batch = plugin.collate(pairs[:3], torch.Generator().manual_seed(0))
    assert batch["latent_mean"].shape == batch["source_mean"].shape == (3, 4, h, w)
    assert batch["pose"].shape == (3, 3, H, W) and batch["pose"].min() >= 0 and batch["pose"].max() <= 1
    assert batch["labels"].shape == (3, H, W) and batch["labels"].dtype == torch.uint8
    assert batch["region_tokens"].shape == (3, NUM_LABELS, plugin.region_dim) and batch["keep"].all()
    source = pairs[0]["source"]
    classes = np.asarray(source["clip_regions.classes"]).astype(int)
    assert batch["region_valid"][0].nonzero().flatten().tolist() == sorted(classes.tolist())
    for row, c in enumerate(classes):
        assert torch.allclose(batch["region_tokens"][0, c], torch.as_tensor(np.asarray(source["clip_regions.embeds"][row], dtype=np.float32)))
    assert not batch["region_valid"][:, 0].any()  # background is never a region
    # every joint present but r_elbow (3): r_elbow's classes still come from r_shoulder / r_wrist
    selected = {ATR_LABELS[i] for i in batch["selected"][0].nonzero().flatten().tolist()}
    assert {"face", "right-arm", "left-shoe", "pants"} <= selected and "bag" not in selected and "background" not in selected


def test_condition_dropout_drops_source_features_together(data):
    _, pairs = data
    dropped = make_plugin(data, drop_prob=1.0).collate(pairs[:4], torch.Generator().manual_seed(0))
    assert not dropped["keep"].any()
    some = make_plugin(data).collate(pairs[:16], torch.Generator().manual_seed(3))
    assert 0 < (~some["keep"]).sum() < 16  # p = 0.3, one draw per pair
    again = make_plugin(data).collate(pairs[:16], torch.Generator().manual_seed(3))
    assert torch.equal(some["keep"], again["keep"])


def test_model_starts_from_identical_unets_and_fuses_every_block(data):
    plugin = make_plugin(data)
    model = plugin.build_model()
    names = transformer_blocks(model.target_unet)
    assert model.fused == names and len(names) == 4 and len(model.caa) == 4
    src, tgt = model.source_unet.state_dict(), model.target_unet.state_dict()
    assert src.keys() == tgt.keys() and all(torch.equal(src[k], tgt[k]) for k in src)
    assert all(float(caa.to_out[0].weight.abs().sum()) == 0 for caa in model.caa.values())
    frozen = {n for n, p in model.source_unet.named_parameters() if not p.requires_grad}
    assert "conv_out.weight" in frozen and all(p.requires_grad for p in model.target_unet.parameters())
    assert not any(n.startswith(names[0]) for n in frozen)  # the first fused block feeds the rest


def test_fusion_is_the_identity_without_a_condition(data):
    _, pairs = data
    plugin = make_plugin(data, drop_prob=0.0)
    model = plugin.build_model().eval()
    batch = plugin.collate(pairs[:2], torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    x, t, source = torch.randn(2, 4, h, w), torch.tensor([10, 500]), torch.randn(2, 4, h, w)
    args = (source, batch["pose"], batch["labels"], batch["selected"], batch["region_tokens"], batch["region_valid"])
    with torch.no_grad():
        kept = model(x, t, *args, torch.tensor([True, True])).sample
        dropped = model(x, t, *args, torch.tensor([False, True])).sample
        model.state.clear()
        plain = model.denoise_target(x, t, model.pose_encoder(batch["pose"])).sample
    assert torch.allclose(dropped[0], plain[0], atol=1e-5)  # dropped: TargetNet + pose alone
    assert torch.allclose(dropped[1], kept[1], atol=1e-5)  # rows are independent
    assert not torch.allclose(kept[0], plain[0], atol=1e-4)  # HPFA changes the prediction


def test_loss_trains_every_part_and_save_load_round_trip(data, tmp_path):
    _, pairs = data
    plugin = make_plugin(data, drop_prob=0.0)
    model = plugin.build_model()
    batch = plugin.collate(pairs[:2], torch.Generator().manual_seed(0))
    loss = plugin.loss(model, batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    assert torch.equal(loss, plugin.loss(model, batch, torch.Generator().manual_seed(1)))
    loss.backward()
    untouched = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not untouched, untouched
    assert float(model.caa[next(iter(model.caa))].to_out[0].weight.grad.abs().sum()) > 0
    model.save_pretrained(tmp_path / "m")
    loaded = TruePoseModel.from_pretrained(tmp_path / "m")
    assert loaded.fused == model.fused and torch.equal(loaded.null_text, model.null_text)
    with torch.no_grad():
        assert torch.equal(plugin.loss(loaded, batch, torch.Generator().manual_seed(1)), plugin.loss(model, batch, torch.Generator().manual_seed(1)))


def test_gradient_checkpointing_recomputes_the_fusion_exactly(data):
    _, pairs = data
    plugin = make_plugin(data, drop_prob=0.0)
    torch.manual_seed(0)
    model = plugin.build_model().train()
    batch = plugin.collate(pairs[:2], torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        plugin.loss(model, batch, torch.Generator().manual_seed(1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_subset_of_blocks_and_literal_eq8_keys(data):
    plugin = make_plugin(data)
    cfg = tiny_unet_config(SD15_UNET_CONFIG)
    first = transformer_blocks(UNet2DConditionModel.from_config(cfg))[0]
    model = TruePoseModel(unet_config=cfg, region_embed_dim=plugin.region_dim, fusion_blocks=[first], fusion_keys="source")
    assert model.fused == [first] and list(model.caa) == [first.replace(".", "_")]
    assert not model.source_unet.get_submodule("mid_block").attentions[0].proj_out.weight.requires_grad
    with pytest.raises(ValueError, match="not BasicTransformerBlocks"):
        TruePoseModel(unet_config=cfg, region_embed_dim=plugin.region_dim, fusion_blocks=["down_blocks.9"])


def write_tiny_sd_pipeline(folder) -> UNet2DConditionModel:
    """A Stable-Diffusion-1.5-shaped pipeline folder with tiny weights: unet/, text_encoder/,
    tokenizer/ (a minimal CLIP BPE vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_unet_config(SD15_UNET_CONFIG))
    unet.save_pretrained(folder / "unet")
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "a</w>": 3}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77).save_pretrained(tok_dir)
    config = CLIPTextConfig(vocab_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return unet


def test_pretrained_path_copies_the_unet_and_encodes_the_null_text(data, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    ds, _ = data
    unet = write_tiny_sd_pipeline(tmp_path / "sd")
    model = TruePosePlugin(ds.card, weights="pretrained", model=str(tmp_path / "sd")).build_model()
    for net in (model.source_unet, model.target_unet):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), unet.state_dict().values()))
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "sd", subfolder="tokenizer")
    ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :2].tolist() == [0, 1]
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(tmp_path / "sd", subfolder="text_encoder")(ids)[0]
    assert torch.allclose(model.null_text, expected) and model.null_text.abs().sum() > 0
    with pytest.raises(ValueError, match="null text embedding"):
        (tmp_path / "bare").mkdir()
        unet.save_pretrained(tmp_path / "bare" / "unet")
        TruePosePlugin(ds.card, weights="pretrained", model=str(tmp_path / "bare")).build_model()


def test_paper_size_on_meta_device():
    card = {"resolution": [512, 352], "features": {
        "vae@a": {"name": "vae", "preset": "sd15", "scaling_factor": 0.18215, "outputs": {"mean.npy": {"shape": [4, 64, 44]}}},
        "clip_regions@b": {"name": "clip_regions", "outputs": {"embeds.npy": {"shape": ["M", 1024]}}}}}
    with torch.device("meta"):
        base = UNet2DConditionModel(**SD15_UNET_CONFIG)
        model = TruePosePlugin(card, weights="random").build_model()
    assert count(base) == SD15_UNET_PARAMS
    assert len(model.fused) == 16 and model.fused[0].startswith("down_blocks.0") and model.fused[-1].startswith("up_blocks.3")
    assert count(model.source_unet) == count(model.target_unet) == SD15_UNET_PARAMS
    assert count(model.pose_encoder) == 1_086_480  # ControlNetConditioningEmbedding(320, 3, (16, 32, 96, 256))
    # per fused block of width d: to_q d*d, to_k / to_v 1024*d, to_out d*d + d
    widths = [320] * 5 + [640] * 5 + [1280] * 6
    assert count(model.caa) == sum(2 * d * d + 2 * 1024 * d + d for d in widths)
    assert tuple(model.null_text.shape) == (1, 77, 768)


def losses(run_dir) -> list[float]:
    with open(run_dir / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_run_training_learns_and_resumes_exactly(dataset, tmp_path):
    kw = {"weights": "tiny", "batch_size": 2, "checkpoint_every": 6, "seed": 0}
    run_training("truepose", str(dataset), str(tmp_path / "full"), max_steps=12, **kw)
    curve = losses(tmp_path / "full")
    assert len(curve) == 12 and all(np.isfinite(curve))
    run_training("truepose", str(dataset), str(tmp_path / "split"), max_steps=6, **kw)
    resumed = run_training("truepose", str(dataset), str(tmp_path / "split"), max_steps=12, resume="latest", **kw)
    assert resumed["start_step"] == 6 and resumed["steps"] == 12
    assert losses(tmp_path / "split") == pytest.approx(curve, rel=1e-4)


def test_sample_is_deterministic_and_guided(data):
    _, pairs = data
    plugin = make_plugin(data)
    torch.manual_seed(0)
    model = plugin.build_model().eval()

    def run(**kw):
        return plugin.sample(model, pairs[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=2, **kw)

    out = run()
    assert out.shape == (2, 4, h, w) and torch.isfinite(out).all() and torch.equal(out, run())
    assert not torch.equal(out, run(guidance_scale=1.0))
    assert not model.state.source  # nothing left behind for the next forward pass
    with pytest.raises(ValueError, match="uncond"):
        run(uncond="zeros")


def test_cli_train_then_sample_writes_samples_at_the_stored_size(dataset, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    run = tmp_path / "run"
    result = CliRunner().invoke(cli_main, ["train", "truepose", "--shards", str(dataset), "--out", str(run), "--weights", "tiny",
                                           "--max-steps", "2", "--batch-size", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "samples"
    result = CliRunner().invoke(cli_main, ["sample", "truepose", "--shards", str(dataset), "--split", "train", "--run", str(run),
                                           "--out", str(out), "--limit", "2", "--steps", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(rows) == 2 and {"source_key", "target_key", "file"} <= set(rows[0])
    assert all(Image.open(out / r["file"]).size == (W, H) for r in rows) and (out / "sheet.png").is_file()
