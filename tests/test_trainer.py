"""The shared trainer, on the tiny pcdm-prior with a synthetic batches_factory of fixed data:
the loss falls, checkpoints are written and resume continues to max_steps."""

from __future__ import annotations

import csv
import json
import itertools

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
