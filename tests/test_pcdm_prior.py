"""pcdm-prior: the model (tiny forward, paper-size parameter count on the meta device, save /
load round trips through the pretrained path), collate with condition dropout, loss and
sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import PriorTransformer

from posedata.train import plugin_class
from posedata.train.pcdm_prior import (
    MISSING_JOINT,
    PcdmPriorPlugin,
    PcdmPriorTransformer,
    normalise_pose,
)

D = 32
H, W = 64, 48
CARD = {
    "name": "tiny",
    "resolution": [H, W],
    "features": {
        "clip": {"outputs": {"embeds.npy": {"dtype": "float16", "shape": [D]}}},
        "openpose": {"outputs": {"keypoints.npy": {"dtype": "float32", "shape": [18, 3]}}},
    },
}
NULL = np.full(D, 0.5, dtype=np.float16)


def fake_sample(rng: np.random.Generator) -> dict:
    kp = np.stack([rng.uniform(0, W, 18), rng.uniform(0, H, 18), rng.uniform(0.1, 1, 18)], axis=1).astype(np.float32)
    kp[[3, 16], 2] = 0.0  # two missing joints
    return {"__key__": "k", "clip.embeds": rng.normal(size=D).astype(np.float16), "openpose.keypoints": kp}


def fake_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"source": fake_sample(rng), "target": fake_sample(rng)} for _ in range(n)]


@pytest.fixture
def plugin() -> PcdmPriorPlugin:
    p = PcdmPriorPlugin(CARD, weights="tiny")
    p.set_null_embeddings({"clip.embeds": NULL})
    return p


def test_registry_and_declarations():
    cls = plugin_class("pcdm-prior")
    assert cls is PcdmPriorPlugin
    assert cls.needs == ("clip", ("openpose", "keypoints_annotated")) and cls.needs_pixels is False
    d = cls.presets["paper"].train
    assert (d.learning_rate, d.weight_decay, d.warmup_steps, d.max_grad_norm, d.batch_size) == (1e-5, 0.01, 2000, 10.0, 128)
    assert cls.objective.noise_offset == 0.1 and cls.objective.prediction_type == "sample"
    assert cls.sample_recipes["official"].scheduler == "unclip" and cls.sample_recipes["official"].guidance_scale <= 1


def test_tiny_forward_shapes(plugin):
    torch.manual_seed(0)
    model = plugin.build_model()
    assert model.config.embedding_dim == D and model.positional_embedding.shape == (1, 6, 64)
    out = model(torch.randn(3, D), torch.tensor([1, 500, 999]), torch.randn(3, D), torch.rand(3, 36), torch.rand(3, 36))
    assert out.predicted_image_embedding.shape == (3, D)
    # a scalar timestep broadcasts over the batch
    assert model(torch.randn(3, D), 10, torch.randn(3, D), torch.rand(3, 36), torch.rand(3, 36)).predicted_image_embedding.shape == (3, D)


def paper_param_count(width: int = 2048, dim: int = 1024, layers: int = 20, hidden: int = 512) -> int:
    linear = lambda i, o: i * o + o  # noqa: E731
    norm = lambda n: 2 * n  # noqa: E731
    block = norm(width) + 4 * linear(width, width) + norm(width) + linear(width, 4 * width) + linear(4 * width, width)
    pose = linear(36, hidden) + norm(hidden) + linear(hidden, dim) + norm(dim)
    return (
        layers * block
        + 2 * linear(width, width)  # time embedding
        + 4 * linear(dim, width)  # proj_in, embedding_proj, two pose projections
        + 2 * pose
        + 6 * width + width  # positional + prediction token
        + norm(width) + linear(width, dim)
    )


def test_paper_size_on_meta_device():
    with torch.device("meta"):
        model = PcdmPriorTransformer(embedding_dim=1024)
    assert len(model.transformer_blocks) == 20
    assert model.transformer_blocks[0].attn1.heads == 32 and model.norm_out.normalized_shape == (2048,)
    n = sum(p.numel() for p in model.parameters())
    assert n == paper_param_count() == 1_027_166_208


def test_save_load_round_trip(plugin, tmp_path):
    model = plugin.build_model()
    model.save_pretrained(tmp_path / "prior-ckpt")
    assert (tmp_path / "prior-ckpt" / "diffusion_pytorch_model.safetensors").is_file()
    again = PcdmPriorTransformer.from_pretrained(tmp_path / "prior-ckpt")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # and through the plugin's pretrained path (same code as a hub id)
    loaded = PcdmPriorPlugin(CARD, weights="pretrained", model=str(tmp_path / "prior-ckpt")).build_model()
    assert torch.equal(loaded.pose_encoder1.net[0].weight, model.pose_encoder1.net[0].weight)
    wrong = dict(CARD, features={"clip": {"outputs": {"embeds.npy": {"shape": [D * 2]}}}})
    with pytest.raises(ValueError, match="wide"):
        PcdmPriorPlugin(wrong, weights="pretrained", model=str(tmp_path / "prior-ckpt")).build_model()


def test_pretrained_from_a_kandinsky_like_prior(tmp_path):
    """A tiny diffusers PriorTransformer in prior/ stands in for kandinsky-2-2-prior."""
    torch.manual_seed(1)
    donor = PriorTransformer(num_attention_heads=2, attention_head_dim=32, num_layers=2, embedding_dim=D, num_embeddings=77, additional_embeddings=4)
    donor.save_pretrained(tmp_path / "prior")
    model = PcdmPriorPlugin(CARD, weights="pretrained", model=str(tmp_path)).build_model()
    assert model.config.num_embeddings == 2 and len(model.transformer_blocks) == 2
    for name in ("proj_to_clip_embeddings.weight", "proj_in.weight", "embedding_proj.weight", "encoder_hidden_states_proj.weight",
                 "time_embedding.linear_1.weight", "prd_embedding", "norm_out.weight", "transformer_blocks.1.attn1.to_q.weight"):
        assert torch.equal(model.state_dict()[name], donor.state_dict()[name]), name
    assert model.positional_embedding.shape == (1, 6, 64)  # donor has 81 positions: not copied


def test_normalise_pose_marks_missing_joints():
    kp = np.zeros((18, 3), np.float32)
    kp[0] = [24, 32, 0.9]
    kp[1] = [48, 64, 0.0]
    flat = normalise_pose(kp, H, W)
    assert flat.shape == (36,) and flat.dtype == np.float32
    assert flat[0] == pytest.approx(0.5) and flat[1] == pytest.approx(0.5)
    assert (flat[2:] == MISSING_JOINT).all()


def test_collate_with_dropped_conditions(plugin):
    pairs = fake_pairs(64)
    a = plugin.collate(pairs, generator=torch.Generator().manual_seed(3))
    b = plugin.collate(pairs, generator=torch.Generator().manual_seed(3))
    assert set(a) == {"source_embeds", "target_embeds", "source_pose", "target_pose"}
    assert a["source_embeds"].shape == (64, D) and a["source_pose"].shape == (64, 36) and a["source_embeds"].dtype == torch.float32
    for k in a:
        assert torch.equal(a[k], b[k]), "seeded collate must repeat"
    raw = torch.stack([torch.tensor(p["source"]["clip.embeds"], dtype=torch.float32) for p in pairs])
    null_rows = (a["source_embeds"] == torch.tensor(NULL, dtype=torch.float32)).all(1)
    zero_src, zero_tgt = (a["source_pose"] == 0).all(1), (a["target_pose"] == 0).all(1)
    assert 0 < int(null_rows.sum()) < 20 and 0 < int(zero_src.sum()) < 20 and 0 < int(zero_tgt.sum()) < 20
    assert torch.equal(a["source_embeds"][~null_rows], raw[~null_rows])
    assert (a["target_embeds"] == torch.stack([torch.tensor(p["target"]["clip.embeds"], dtype=torch.float32) for p in pairs])).all()
    # kept poses carry the missing-joint marker for joint 3
    assert (a["source_pose"][~zero_src][:, 6:8] == MISSING_JOINT).all()

    plugin.drop_prob = 1.0
    c = plugin.collate(pairs[:4])
    assert (c["source_embeds"] == 0.5).all() and (c["source_pose"] == 0).all() and (c["target_pose"] == 0).all()
    fresh = PcdmPriorPlugin(CARD, weights="tiny")
    fresh.drop_prob = 1.0
    with pytest.raises(ValueError, match="null embedding"):
        fresh.collate(pairs[:4])
    with pytest.raises(ValueError, match="null"):
        fresh.set_null_embeddings({})


def test_loss_is_finite_and_backward_works(plugin):
    torch.manual_seed(0)
    model = plugin.build_model()
    batch = plugin.collate(fake_pairs(8), generator=torch.Generator().manual_seed(0))
    loss = plugin.loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    again = plugin.loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss, again)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pose_encoder1.net[0].weight.grad.abs().sum() > 0


def test_sample_runs_in_tiny_mode(plugin):
    torch.manual_seed(0)
    model = plugin.build_model().eval()
    pairs = fake_pairs(3)
    for p in pairs:
        del p["target"]["clip.embeds"]  # sampling never needs the target's embedding
    out = plugin.sample(model, pairs, guidance_scale=2.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    again = plugin.sample(model, pairs, guidance_scale=2.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, D) and torch.isfinite(out).all() and torch.equal(out, again)
    plain = plugin.sample(model, pairs, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert plain.shape == (3, D) and not torch.equal(plain, out)
