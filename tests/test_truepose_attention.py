"""TruePose's HPFA (eq. 6-8) and CAA (eq. 9) pinned on hand-made attention maps and parsing
masks, and the processors against a plain diffusers attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from posedata.extractors.parsing import ATR_LABELS
from posedata.render import COCO18_NAMES
from posedata.train.truepose_attention import (
    FusionState,
    SourceWriter,
    TargetReader,
    coverage,
    level_grids,
    lowest_regions,
    region_scores,
    reweight_logits,
    reweighted_attention,
    selection_mask,
    target_classes,
)

ATR = {name: i for i, name in enumerate(ATR_LABELS)}
JOINT = {name: i for i, name in enumerate(COCO18_NAMES)}


def test_reweighting_follows_eq6_case_by_case():
    # one query, four keys: (positive, in M), (negative, in M), (positive, out), (negative, out)
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    key_mask = torch.tensor([True, True, False, False])
    out = reweight_logits(logits, key_mask, sigma=0.3, delta=0.6)
    assert torch.allclose(out, torch.tensor([[2.0 * 1.6, -2.0 * 0.6, 2.0 * 0.3, -2.0 * 1.3]]))
    # a zero logit stays zero whatever the weight
    assert reweight_logits(torch.zeros(1, 2), torch.tensor([True, False])).abs().sum() == 0


def test_reweighting_moves_attention_into_the_selected_region():
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    key_mask = torch.tensor([True, False, True, False])
    before = logits.softmax(-1)
    after = reweight_logits(logits, key_mask).softmax(-1)
    assert after[0, 0] > before[0, 0] and after[0, 1] < before[0, 1]  # positive logits
    assert after[0, 2] > after[0, 3]  # negative logits: the masked one loses less


def test_reweighted_attention_equals_the_written_formula_and_is_exact_in_chunks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g) for _ in range(3))
    key_mask = torch.rand(2, 10, generator=g) > 0.5
    scale = 0.5
    logits = q @ k.transpose(-1, -2) * scale
    m = torch.where(key_mask[:, None, None], torch.where(logits > 0, 1.6, 0.6), torch.where(logits > 0, 0.3, 1.3))
    probs = (logits * m).softmax(-1)
    expected = probs @ v
    out, received = reweighted_attention(q, k, v, key_mask, scale=scale)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(received, probs.mean(dim=(1, 2)), atol=1e-6)
    out3, received3 = reweighted_attention(q, k, v, key_mask, scale=scale, chunk_size=3)
    assert torch.allclose(out3, expected, atol=1e-6) and torch.allclose(received3, received, atol=1e-6)


def test_reweighted_attention_backward_through_checkpointed_chunks():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, requires_grad=True) for _ in range(3))
    key_mask = torch.tensor([[True, False] * 3 + [True]])
    out, _ = reweighted_attention(q, k, v, key_mask, scale=0.5, chunk_size=2)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref, _ = reweighted_attention(q, k, v, key_mask, scale=0.5, chunk_size=100)
    ref.sum().backward()
    for a, t in zip(grads, (q, k, v)):
        assert torch.allclose(a, t.grad, atol=1e-6)


def test_target_pose_selects_the_parsing_classes_its_joints_touch():
    kp = np.zeros((18, 3), dtype=np.float32)
    kp[JOINT["nose"]] = (10, 10, 1)
    kp[JOINT["r_wrist"]] = (5, 30, 1)
    kp[JOINT["l_ankle"]] = (8, 90, 1)
    kp[JOINT["l_wrist"]] = (0, 0, 0)  # missing: contributes nothing
    chosen = {ATR_LABELS[i] for i in np.flatnonzero(target_classes(kp))}
    assert chosen == {"face", "hair", "hat", "sunglasses", "right-arm", "upper-clothes", "dress", "left-shoe", "left-leg"}
    assert not target_classes(np.zeros((18, 3))).any()


def test_selection_mask_is_the_union_of_the_selected_classes():
    labels = np.array([[ATR["face"], ATR["pants"]], [ATR["background"], ATR["left-arm"]]], dtype=np.uint8)
    classes = np.zeros(len(ATR_LABELS), dtype=bool)
    classes[[ATR["face"], ATR["left-arm"]]] = True
    assert selection_mask(labels, classes).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_level_grids_follow_the_unet_downsampling():
    assert level_grids(64, 44, 4) == [(64, 44), (32, 22), (16, 11), (8, 6)]
    assert level_grids(32, 22, 4) == [(32, 22), (16, 11), (8, 6), (4, 3)]


def test_coverage_keeps_small_regions():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 0, 0] = 1  # one pixel
    cov = coverage(mask, (2, 2))
    assert cov.shape == (1, 1, 4) and math.isclose(cov[0, 0, 0].item(), 1 / 16) and cov[0, 0, 1:].sum() == 0


def test_caa_picks_the_two_least_attended_regions():
    # a 2 x 3 source grid; regions: 0 = column 0, 1 = column 1, 2 = column 2, 3 = padding
    received = torch.tensor([[0.5, 0.1, 0.3, 0.5, 0.1, 0.3]])  # column scores 0.5, 0.1, 0.3
    cover = torch.zeros(1, 4, 6)
    for col in range(3):
        cover[0, col, [col, col + 3]] = 1.0
    valid = torch.tensor([[True, True, True, False]])
    scores = region_scores(received, cover, valid)
    assert torch.allclose(scores[0, :3], torch.tensor([0.5, 0.1, 0.3])) and scores[0, 3] == math.inf
    index, chosen = lowest_regions(scores, 2)
    assert index.tolist() == [[1, 2]] and chosen.tolist() == [[True, True]]


def test_caa_region_choice_uses_pixel_area_not_boxes_and_pads_missing_regions():
    received = torch.tensor([[0.9, 0.0, 0.0, 0.2]])
    cover = torch.tensor([[[0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]])  # region 1 too small for this grid
    valid = torch.tensor([[True, True]])
    scores = region_scores(received, cover, valid)
    assert math.isclose(scores[0, 0].item(), 0.55, rel_tol=1e-6) and scores[0, 1] == math.inf
    index, chosen = lowest_regions(scores, 2)
    assert index[0, 0] == 0 and chosen.tolist() == [[True, False]]
    index, chosen = lowest_regions(scores[:, :1], 2)  # fewer regions than K
    assert index.shape == (1, 2) and chosen.tolist() == [[True, False]]


def _attention(dim=16, heads=2, cross=None, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, cross_attention_dim=cross)
    return attn.eval()


def test_writer_keeps_sourcenet_output_and_writes_the_reweighted_attention():
    attn = _attention()
    x = torch.randn(2, 6, 16)
    plain = AttnProcessor2_0()(attn, x)
    state = FusionState()
    state.key_masks[6] = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    state.write = True
    attn.set_processor(SourceWriter("b0", state))
    with torch.no_grad():
        out = attn(x)
    assert torch.allclose(out, plain, atol=1e-5)
    q, k, v = (t.view(2, 6, 2, 8).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    rw, received = reweighted_attention(q, k, v, state.key_masks[6], scale=attn.scale)
    expected = attn.to_out[0](rw.transpose(1, 2).reshape(2, 6, 16))
    assert torch.allclose(state.source["b0"], expected, atol=1e-5)
    assert torch.allclose(state.received["b0"].sum(-1), torch.ones(2), atol=1e-5)


def test_reader_is_plain_self_attention_without_a_condition_and_for_dropped_samples():
    attn = _attention(seed=1)
    caa = _attention(cross=8, seed=2)
    x = torch.randn(2, 6, 16)
    plain = AttnProcessor2_0()(attn, x)
    state = FusionState()
    attn.set_processor(TargetReader("b0", state, caa))
    with torch.no_grad():
        assert torch.allclose(attn(x), plain, atol=1e-5)  # nothing written: identity fusion
        state.source["b0"] = torch.randn(2, 4, 16)
        state.received["b0"] = torch.full((2, 4), 0.25)
        state.region_coverage[4] = torch.eye(4)[None, :3].expand(2, 3, 4).clone()
        state.region_tokens = torch.randn(2, 3, 8)
        state.region_valid = torch.ones(2, 3, dtype=torch.bool)
        state.keep = torch.tensor([False, True])
        out = attn(x)
    assert torch.allclose(out[0], plain[0], atol=1e-5)  # dropped: HPFA and CAA are the identity
    assert not torch.allclose(out[1], plain[1], atol=1e-3)  # kept: attends to H'
    # concat keys = Moore's reader with the bank replaced by H'
    kv = torch.cat([x[1:], state.source["b0"][1:]], dim=1)
    q = attn.to_q(x[1:]).view(1, 6, 2, 8).transpose(1, 2)
    k, v = (p(kv).view(1, 10, 2, 8).transpose(1, 2) for p in (attn.to_k, attn.to_v))
    fused = attn.to_out[0](torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 6, 16))
    with torch.no_grad():
        caa_out = caa(fused, encoder_hidden_states=state.region_tokens[1:, :2])  # equal scores: the first two regions
    assert torch.allclose(out[1:], fused + caa_out, atol=1e-5)


def test_reader_without_usable_regions_adds_nothing():
    attn = _attention(seed=3)
    caa = _attention(cross=8, seed=4)
    state = FusionState()
    attn.set_processor(TargetReader("b0", state, caa, keys="source"))
    x = torch.randn(1, 6, 16)
    state.source["b0"] = torch.randn(1, 4, 16)
    state.received["b0"] = torch.full((1, 4), 0.25)
    state.region_coverage[4] = torch.zeros(1, 2, 4)
    state.region_tokens = torch.randn(1, 2, 8)
    state.region_valid = torch.tensor([[True, False]])  # the valid region covers no token
    with torch.no_grad():
        out = attn(x)
    q = attn.to_q(x).view(1, 6, 2, 8).transpose(1, 2)
    k, v = (p(state.source["b0"]).view(1, 4, 2, 8).transpose(1, 2) for p in (attn.to_k, attn.to_v))
    fused = attn.to_out[0](torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 6, 16))
    assert torch.isfinite(out).all() and torch.allclose(out, fused, atol=1e-5)


def test_reader_rejects_unknown_key_mode():
    with pytest.raises(ValueError, match="fusion keys"):
        TargetReader("b0", FusionState(), _attention(), keys="both")
