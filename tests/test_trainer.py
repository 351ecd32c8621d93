"""The shared trainer, on the tiny pcdm-prior with a synthetic batches_factory of fixed data:
the loss falls, checkpoints are written and resume continues to max_steps."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.train.pcdm_prior import PcdmPriorPlugin
from posedata.train.trainer import checkpoints, find_checkpoint, train

D = 32
CARD = {"name": "synthetic", "resolution": [64, 48], "features": {"clip": {"outputs": {"embeds.npy": {"shape": [D]}}}}}
NULLS = {"clip.embeds": np.zeros(D, np.float16)}
BATCH = 8


def fixed_batches(seen: list[int]):
    """A factory over 4 fixed batches, cycled forever; records where each stream starts."""
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "source_embeds": torch.randn(BATCH, D, generator=g),
            "target_embeds": 0.4 * torch.randn(BATCH, D, generator=g),
            "source_pose": torch.rand(BATCH, 36, generator=g),
            "target_pose": torch.rand(BATCH, 36, generator=g),
        }
        for _ in range(4)
    ]

    def factory(start: int, seed: int):
        seen.append(start)
        return (data[i % len(data)] for i in itertools.count(start))

    return factory


def run(out, seen, **kw):
    args = dict(max_steps=40, batch_size=BATCH, learning_rate=1e-3, warmup_steps=0, seed=0,
                checkpoint_every=20, log_every=5, null_embeddings=NULLS)
    args.update(kw)
    return train(PcdmPriorPlugin(CARD, weights="tiny"), fixed_batches(seen), out, **args)


def losses(out) -> list[tuple[int, float]]:
    with open(out / "loss.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_loss_falls_and_run_dir_is_complete(tmp_path):
    seen: list[int] = []
    summary = run(tmp_path, seen)
    assert summary["steps"] == 40 and seen == [0]
    rows = losses(tmp_path)
    assert [s for s, _ in rows] == list(range(1, 41))
    first, last = np.mean([v for _, v in rows[:5]]), np.mean([v for _, v in rows[-5:]])
    assert last < 0.7 * first, (first, last)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["plugin"] == "pcdm-prior" and config["learning_rate"] == 1e-3 and config["weight_decay"] == 0.01
    assert config["max_grad_norm"] == 10.0 and config["model_config"]["embedding_dim"] == D
    assert config["null_embeddings"] == {"clip.embeds": [D]}
    with Image.open(tmp_path / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] >= 320
    assert [s for s, _ in checkpoints(tmp_path)] == [20, 40]
    ckpt = tmp_path / "checkpoint-40"
    assert summary["checkpoint"] == str(ckpt)
    assert (ckpt / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 40
    torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.load(ckpt / "scheduler.pt", weights_only=True)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40


def test_resume_continues_from_the_checkpoint(tmp_path):
    seen: list[int] = []
    run(tmp_path, seen, max_steps=20, checkpoint_every=10)
    before = losses(tmp_path)
    summary = run(tmp_path, seen, max_steps=30, checkpoint_every=10, resume="latest")
    assert seen == [0, 20]  # the data stream restarted at the checkpoint's position
    assert summary["start_step"] == 20 and summary["steps"] == 30
    rows = losses(tmp_path)
    assert [s for s, _ in rows] == list(range(1, 31)) and rows[:20] == before
    # the loss continues where it was instead of starting over from an untrained model
    assert np.mean([v for _, v in rows[20:25]]) < np.mean([v for _, v in rows[:5]])
    assert json.loads((tmp_path / "config.json").read_text())["resumed_from"].endswith("checkpoint-20")
    assert (tmp_path / "config.prev-20.json").is_file()

    # an explicit path works too, and accumulation consumes batches per micro-step
    seen.clear()
    summary = run(tmp_path, seen, max_steps=32, checkpoint_every=10, resume=tmp_path / "checkpoint-30", gradient_accumulation=2)
    assert summary["steps"] == 32 and seen == [30]
    assert json.loads((tmp_path / "checkpoint-32" / "trainer_state.json").read_text())["batches_seen"] == 34


def test_find_checkpoint_errors(tmp_path):
    assert find_checkpoint(tmp_path, False) is None
    assert find_checkpoint(tmp_path, "latest") is None
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path, tmp_path / "checkpoint-7")


# ---- exact resume, EMA, gradient checkpointing, attention -----------------------------------

H, W = 64, 48
POSE_CARD = {**CARD, "features": {**CARD["features"], "openpose": {"outputs": {"keypoints.npy": {"shape": [18, 3]}}}}}


class DropoutPrior(PcdmPriorPlugin):
    """The tiny prior with dropout in its blocks, so the model itself draws from torch's
    global RNG (what the checkpoint's RNG state must bring back)."""

    def build_model(self):
        from posedata.train.pcdm_prior import TINY, PcdmPriorTransformer

        return PcdmPriorTransformer(embedding_dim=self.embedding_dim, dropout=0.1, **TINY)


class FakePairs:
    """An endless pair stream split across DataLoader workers like PairStream (each worker
    its own part, shuffled per epoch), over 24 fixed pairs."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(0)

        def sample(i):
            kp = np.stack([rng.uniform(0, W, 18), rng.uniform(0, H, 18), rng.uniform(0, 1, 18)], axis=1).astype(np.float32)
            return {"__key__": f"k{i}", "clip.embeds": (0.4 * rng.normal(size=D)).astype(np.float16), "openpose.keypoints": kp}

        self.pairs = [{"source": sample(2 * i), "target": sample(2 * i + 1)} for i in range(24)]
        self.seed = seed

    def __iter__(self):
        import random

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.pairs[worker::workers]
        for epoch in itertools.count():
            order = list(range(len(mine)))
            random.Random(f"{self.seed}:{epoch}:{worker}").shuffle(order)
            for i in order:
                yield mine[i]


def pair_factory(plugin, num_workers: int, seen: list[int] | None = None):
    from posedata.train.run import collated_loader

    def factory(start: int, seed: int):
        if seen is not None:
            seen.append(start)
        return collated_loader(FakePairs(seed), plugin, BATCH, num_workers, seed, start=start)

    return factory


def train_pairs(out, num_workers: int, max_steps: int, **kw):
    plugin = DropoutPrior(POSE_CARD, weights="tiny")
    args = {"max_steps": max_steps, "batch_size": BATCH, "learning_rate": 1e-3, "warmup_steps": 3, "seed": 7, "checkpoint_every": 10,
            "log_every": 5, "null_embeddings": NULLS, "ema_decay": 0.9, "run_info": {"num_workers": num_workers}}
    args.update(kw)
    return train(plugin, pair_factory(plugin, num_workers), out, **args)


def loss_rows(out) -> list[tuple[str, str, str]]:
    with open(out / "loss.csv") as f:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]  # samples/s is a timing


def tensors(folder):
    from posedata.train.trainer import load_model_weights

    return load_model_weights(folder)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, num_workers):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_pairs(straight, num_workers, 20)
    train_pairs(split, num_workers, 10)
    summary = train_pairs(split, num_workers, 20, resume="latest")
    assert summary["start_step"] == 10 and summary["steps"] == 20
    assert summary["ema"] == str(split / "checkpoint-20" / "ema")

    assert loss_rows(split) == loss_rows(straight) and len(loss_rows(straight)) == 20
    for part in ("model", "ema"):
        a, b = tensors(straight / "checkpoint-20" / part), tensors(split / "checkpoint-20" / part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    model, ema = tensors(straight / "checkpoint-20" / "model"), tensors(straight / "checkpoint-20" / "ema")
    assert any(not torch.equal(model[k], ema[k]) for k in model)  # the EMA is not the model
    opt_a = torch.load(straight / "checkpoint-20" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(split / "checkpoint-20" / "optimizer.pt", weights_only=True)
    for i, s in opt_a["state"].items():
        assert all(torch.equal(s[k], opt_b["state"][i][k]) for k in s)
    state = json.loads((split / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["ema"]["optimization_step"] == 20 and state["batches_seen"] == 20
    assert state["stream"] == {"batch_size": BATCH, "num_processes": 1, "num_workers": num_workers, "gradient_accumulation": 1}
    assert (split / "checkpoint-20" / "rng_state_0.safetensors").is_file()
    # the EMA folder loads as a model of its own
    from posedata.train.pcdm_prior import PcdmPriorTransformer

    loaded = PcdmPriorTransformer.from_pretrained(straight / "checkpoint-20" / "ema")
    assert torch.equal(loaded.proj_in.weight, ema["proj_in.weight"])

    config = json.loads((split / "config.json").read_text())
    assert config["ema"]["decay"] == 0.9 and config["gradient_checkpointing"] is False
    assert config["attention"]["mode"] == "sdpa" and config["attention"]["processors"] == {"AttnProcessor2_0": 2}
    assert config["data"] == {"num_workers": num_workers} and config["versions"]["torch"] == torch.__version__


def test_collate_generator_depends_on_the_batch_not_on_workers_or_resume():
    """Batch n gets the same dropout (one generator per (seed, rank, n)) from any start;
    with workers, batch n comes from worker n % W's part of the stream."""
    from posedata.train.run import collated_loader
    from posedata.train.trainer import batch_seed

    plugin = PcdmPriorPlugin(POSE_CARD, weights="tiny")
    plugin.set_null_embeddings(NULLS)
    plugin.drop_prob = 0.5
    for workers in (0, 2):
        full = list(itertools.islice(collated_loader(FakePairs(), plugin, BATCH, workers, seed=3), 6))
        late = list(itertools.islice(collated_loader(FakePairs(), plugin, BATCH, workers, seed=3, start=3), 3))
        for a, b in zip(full[3:], late):
            assert all(torch.equal(a[k], b[k]) for k in a)
    other_rank = next(collated_loader(FakePairs(), plugin, BATCH, 0, seed=3, rank=1))
    assert not all(torch.equal(full[0][k], other_rank[k]) for k in full[0])
    assert batch_seed(3, 0, 5) == batch_seed(3, 0, 5) != batch_seed(3, 1, 5)


def test_resume_warns_when_the_stream_changes(tmp_path, caplog):
    train_pairs(tmp_path, 0, 10)
    with caplog.at_level("WARNING", logger="posedata.train.trainer"):
        train_pairs(tmp_path, 0, 12, resume="latest", run_info={"num_workers": 2}, ema_decay=None)
    text = caplog.text
    assert "num_workers 0 -> 2" in text and "EMA weights but ema_decay is not set" in text


def test_gradient_checkpointing_and_sdpa(tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
    )

    from posedata.train.trainer import configure_model
    from posedata.train.unet import BASE_MODELS

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(BASE_MODELS["sd21"].tiny_unet_config)
    attn = [m for m in unet.modules() if isinstance(m, Attention)]
    attn[0].set_processor(AttnProcessor())  # plain attention: switched to SDPA

    class Custom(AttnProcessor2_0):
        pass

    attn[1].set_processor(Custom())  # someone else's processor: left alone
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 32)

    def grads(model):
        model.zero_grad()
        model(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    before = grads(unet)
    info = configure_model(unet, gradient_checkpointing=True, attention="sdpa")
    assert info["gradient_checkpointing"] is True and unet.is_gradient_checkpointing
    assert info["attention"]["processors"] == {"AttnProcessor2_0": len(attn) - 1, "Custom": 1}
    assert type(attn[0].processor) is AttnProcessor2_0 and type(attn[1].processor) is Custom
    after = grads(unet)  # checkpointing recomputes, it does not change the gradients
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after))

    prior = PcdmPriorPlugin(CARD, weights="tiny").build_model()
    if not getattr(prior, "_supports_gradient_checkpointing", False):
        with pytest.raises(ValueError, match="does not support gradient checkpointing"):
            configure_model(prior, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="attention"):
        configure_model(prior, attention="xformers")
