"""TruePose's two attention modules (Xu et al., arXiv 2502.03426, Sec. 4.2-4.3) as diffusers
attention processors on the `attn1` of each fused `BasicTransformerBlock`, no forked UNet.

- `SourceWriter` (SourceNet, eq. 6-7): computes the block's own self-attention as usual (so
  SourceNet runs as a plain UNet) and, from the same query / key / value projections of F'
  (the block's `norm1` output), the parsing-reweighted self-attention H' = to_out(SoftMax(A'
  (.) M') V') with A' = Q'K'^T / sqrt(d) and M' from eq. 6 (`reweight_logits`). It stores H'
  and the attention each source token receives (for CAA) in the shared `FusionState`.
- `TargetReader` (TargetNet, eq. 8-9): the block's self-attention with TargetNet's queries
  over keys / values [F ; H'] (Moore-AnimateAnyone's reader, with the bank F' replaced by
  H'; `keys="source"` uses H' alone, eq. 8 literally), then CAA: the K source regions that
  received the least attention, their stored CLIP region embeddings as keys / values of one
  more cross-attention (zero-initialised output, added to the eq. 8 result).

What the paper leaves open and the reading chosen is in docs/truepose-fidelity.md.

Everything that depends on the pair (the selection mask M, the parsing-region masks, the CLIP
region tokens, which samples keep their condition) is put into a `FusionState` before the
forward pass; processors find their layer's masks by token count (each UNet level has its own
grid). The state is not cleared after a forward: gradient checkpointing recomputes blocks in
the backward pass and must see the same state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posedata.extractors.parsing import ATR_LABELS
from posedata.render import COCO18_NAMES

SIGMA, DELTA = 0.3, 0.6  # eq. 6 (Sec. 4.2: "we empirically set sigma and delta as 0.3 and 0.6")
TOP_K = 2  # CAA: "k is empirically set to 2" (Sec. 4.4)
FUSION_KEYS = ("concat", "source")

# A_tau -> ATR classes (the paper gives no table): the parsing classes each target-pose joint
# touches. A side's joints select that side's limb and shoe (ATR left / right are the person's,
# as OpenPose's; SCHP swaps them together with a horizontal flip). Bag is never selected.
_FACE = ("face", "hair", "hat", "sunglasses")
KEYPOINT_CLASSES: dict[str, tuple[str, ...]] = {
    "nose": _FACE,
    "r_eye": _FACE,
    "l_eye": _FACE,
    "r_ear": _FACE,
    "l_ear": _FACE,
    "neck": ("scarf", "upper-clothes", "dress"),
    "r_shoulder": ("right-arm", "upper-clothes", "dress"),
    "r_elbow": ("right-arm", "upper-clothes", "dress"),
    "r_wrist": ("right-arm", "upper-clothes", "dress"),
    "l_shoulder": ("left-arm", "upper-clothes", "dress"),
    "l_elbow": ("left-arm", "upper-clothes", "dress"),
    "l_wrist": ("left-arm", "upper-clothes", "dress"),
    "r_hip": ("pants", "skirt", "dress", "belt"),
    "l_hip": ("pants", "skirt", "dress", "belt"),
    "r_knee": ("right-leg", "pants", "skirt", "dress"),
    "l_knee": ("left-leg", "pants", "skirt", "dress"),
    "r_ankle": ("right-shoe", "right-leg"),
    "l_ankle": ("left-shoe", "left-leg"),
}
# [18, 18 ATR classes] bool: joint j touches class c.
JOINT_CLASS_TABLE = np.zeros((len(COCO18_NAMES), len(ATR_LABELS)), dtype=bool)
for _j, _name in enumerate(COCO18_NAMES):
    for _cls in KEYPOINT_CLASSES[_name]:
        JOINT_CLASS_TABLE[_j, ATR_LABELS.index(_cls)] = True


# ---- the pair's masks -------------------------------------------------------------------------


def target_classes(keypoints: np.ndarray, score_threshold: float = 0.0) -> np.ndarray:
    """A_tau: target keypoints [18, 3] (x, y, score) -> bool [18 ATR classes], the classes
    touched by the joints present (score > threshold); a missing joint adds nothing."""
    present = np.asarray(keypoints, dtype=np.float32).reshape(len(COCO18_NAMES), 3)[:, 2] > score_threshold
    return JOINT_CLASS_TABLE[present].any(axis=0)


def selection_mask(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """M = union of the source parsing masks of `classes` (bool [18]): float32 [H, W] in {0, 1}."""
    return np.asarray(classes, dtype=bool)[np.asarray(labels, dtype=np.int64)].astype(np.float32)


def level_grids(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Token grids of a UNet's levels from the latent size: each stride-2 conv (padding 1)
    maps n to ceil(n / 2)."""
    grids = [(int(height), int(width))]
    for _ in range(levels - 1):
        h, w = grids[-1]
        grids.append(((h + 1) // 2, (w + 1) // 2))
    return grids


def coverage(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel masks [B, C, H, W] -> the fraction of each token's cell they cover, [B, C, h*w]
    (area resampling: a region a few pixels wide keeps a small non-zero weight)."""
    pooled = F.adaptive_avg_pool2d(masks.float(), grid)
    return pooled.flatten(2)


# ---- eq. 6-7 ----------------------------------------------------------------------------------


def reweight_logits(logits: torch.Tensor, key_mask: torch.Tensor, sigma: float = SIGMA, delta: float = DELTA) -> torch.Tensor:
    """A' (.) M' (eq. 6-7): a logit on a key inside M is scaled by 1 + delta if positive and
    delta if negative; outside M by sigma if positive and 1 + sigma if negative. `key_mask`
    (bool) broadcasts against `logits` on the key axis (the last one)."""
    positive = logits > 0
    inside = torch.where(positive, 1.0 + delta, delta)
    outside = torch.where(positive, sigma, 1.0 + sigma)
    return logits * torch.where(key_mask, inside, outside).to(logits.dtype)


def _reweighted_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float, sigma: float,
                      delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs = reweight_logits(logits.float(), key_mask, sigma, delta).softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v), probs.sum(dim=(1, 2))


def reweighted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, *, scale: float,
                         sigma: float = SIGMA, delta: float = DELTA, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """RwSelfAtt (eq. 7) with an explicit attention matrix (SDPA cannot scale logits by their
    sign). q, k, v [B, heads, N, d]; key_mask bool [B, N]. Returns (output [B, heads, N, d],
    attention each key receives, averaged over heads and queries, [B, N]).

    Queries go in chunks of `chunk_size` (softmax is per query row, so chunking is exact); under
    autograd each chunk is checkpointed, so only one chunk's [B, heads, chunk, N] matrices
    live at a time (512 x 352 images: N = 2816 tokens at the first level)."""
    mask = key_mask[:, None, None, :].bool()
    outs, received = [], torch.zeros(q.shape[0], k.shape[2], device=q.device, dtype=torch.float32)
    for start in range(0, q.shape[2], chunk_size):
        chunk = q[:, :, start : start + chunk_size]
        if torch.is_grad_enabled() and (chunk.requires_grad or k.requires_grad or v.requires_grad):
            out, got = checkpoint(_reweighted_chunk, chunk, k, v, mask, scale, sigma, delta, use_reentrant=False)
        else:
            out, got = _reweighted_chunk(chunk, k, v, mask, scale, sigma, delta)
        outs.append(out)
        received = received + got
    return torch.cat(outs, dim=2), received / (q.shape[1] * q.shape[2])


# ---- eq. 9's region choice ----------------------------------------------------------------------


def region_scores(received: torch.Tensor, region_coverage: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The average attention of each parsing region: received [B, N] (attention per source
    token), region_coverage [B, R, N] (area fraction of each token in each region), valid bool
    [B, R] (padding rows False). Returns [B, R], +inf where a region is padding or covers no
    token at this grid."""
    mass = region_coverage.sum(dim=-1)
    scores = torch.einsum("brn,bn->br", region_coverage.float(), received.float()) / mass.clamp_min(1e-12)
    return torch.where(valid & (mass > 0), scores, torch.full_like(scores, math.inf))


def lowest_regions(scores: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """The K regions with the lowest scores: (indices [B, K], chosen bool [B, K]); when a sample
    has fewer than K scorable regions the extra picks are marked not chosen."""
    k_eff = min(k, scores.shape[1])
    values, index = scores.topk(k_eff, dim=1, largest=False)
    chosen = torch.isfinite(values)
    if k_eff < k:
        pad = k - k_eff
        index = torch.cat([index, index.new_zeros(index.shape[0], pad)], dim=1)
        chosen = torch.cat([chosen, chosen.new_zeros(chosen.shape[0], pad)], dim=1)
    return index, chosen


# ---- the state shared by the processors of one forward pass -----------------------------------


@dataclass
class FusionState:
    """The pair-dependent inputs of one forward pass and what SourceNet leaves for TargetNet.

    `key_masks` / `region_coverage`: token count -> [B, N] bool (M at that grid) and
    [B, R, N]; `region_tokens` [B, R, D_clip] and `region_valid` bool [B, R]: CLIP embeddings
    of the source's parsing regions (padded); `keep` bool [B]: samples whose condition
    {F', F_clip} is present (False: dropped for classifier-free guidance; HPFA and CAA are
    the identity for them). `source` / `received`: written by the SourceNet writers."""

    key_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    region_coverage: dict[int, torch.Tensor] = field(default_factory=dict)
    region_tokens: torch.Tensor | None = None
    region_valid: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    write: bool = False
    source: dict[str, torch.Tensor] = field(default_factory=dict)
    received: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.key_masks, self.region_coverage = {}, {}
        self.region_tokens = self.region_valid = self.keep = None
        self.write = False
        self.source, self.received = {}, {}

    def repeat(self, times: int) -> None:
        """Tile every per-sample tensor `times` along the batch (the CFG-doubled batch)."""
        self._per_sample(lambda x: torch.cat([x] * times))

    def select(self, rows: torch.Tensor) -> None:
        """Keep the samples at `rows` (long [N], repeats allowed) in that order: the batch
        layout of a forward pass that is not simply the CFG-doubled one (style transfer)."""
        self._per_sample(lambda x: x[rows.to(x.device)])

    def _per_sample(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.key_masks = {n: change(m) for n, m in self.key_masks.items()}
        self.region_coverage = {n: change(c) for n, c in self.region_coverage.items()}
        self.region_tokens = None if self.region_tokens is None else change(self.region_tokens)
        self.region_valid = None if self.region_valid is None else change(self.region_valid)
        self.keep = None if self.keep is None else change(self.keep)
        self.source = {n: change(h) for n, h in self.source.items()}
        self.received = {n: change(r) for n, r in self.received.items()}


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, attn.heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _out(attn, x: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](x))


class SourceDone(Exception):
    """Raised by the last fused block's writer: SourceNet's later layers feed nothing."""


class SourceWriter:
    """SourceNet `attn1` processor of one fused block (eq. 6-7, see the module docstring).
    `last`: stop SourceNet's forward pass (`SourceDone`) once this block has written."""

    def __init__(self, name: str, state: FusionState, sigma: float = SIGMA, delta: float = DELTA, chunk_size: int = 1024,
                 last: bool = False):
        self.name, self.state = name, state
        self.sigma, self.delta, self.chunk_size, self.last = sigma, delta, chunk_size, last

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q, k, v = (_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        own = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        state = self.state
        # the work done depends on the masks only, not on `write`: gradient checkpointing
        # recomputes this block in the backward pass (write False) and must redo the same ops
        key_mask = state.key_masks.get(hidden_states.shape[1])
        if state.write and key_mask is None:
            raise RuntimeError(f"truepose: no selection mask for {hidden_states.shape[1]} tokens at {self.name}")
        if key_mask is not None:
            reweighted, received = reweighted_attention(q, k, v, key_mask, scale=attn.scale, sigma=self.sigma, delta=self.delta,
                                                        chunk_size=self.chunk_size)
            state.source[self.name] = _out(attn, _merge(reweighted).to(hidden_states.dtype))
            state.received[self.name] = received
            if self.last and state.write:
                raise SourceDone
        return _out(attn, _merge(own).to(hidden_states.dtype))


class TargetReader:
    """TargetNet `attn1` processor of one fused block (eq. 8-9, see the module docstring).
    `caa` is the block's CAA `Attention` (owned by the model, not by this processor)."""

    def __init__(self, name: str, state: FusionState, caa: torch.nn.Module, keys: str = "concat", top_k: int = TOP_K):
        if keys not in FUSION_KEYS:
            raise ValueError(f"fusion keys must be one of {FUSION_KEYS}, got {keys!r}")
        self.name, self.state, self.caa = name, state, caa
        self.keys, self.top_k = keys, top_k

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        source = state.source.get(self.name)
        bsz, n, _ = hidden_states.shape
        if source is None:  # no condition in this pass: plain self-attention
            q, k, v = (_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            return _out(attn, _merge(F.scaled_dot_product_attention(q, k, v)).to(hidden_states.dtype))
        keep = state.keep if state.keep is not None else torch.ones(bsz, dtype=torch.bool, device=hidden_states.device)
        keep = keep.to(hidden_states.device)
        source = source.to(hidden_states.dtype)
        # keys [F ; H']: H' visible to kept samples only, F to all ("concat") or to dropped
        # samples only ("source"); a dropped sample is then Moore's unconditional branch
        context = torch.cat([hidden_states, source], dim=1)
        own = keep.new_ones(bsz, n) if self.keys == "concat" else ~keep[:, None].expand(bsz, n)
        mask = torch.cat([own, keep[:, None].expand(bsz, source.shape[1])], dim=1)[:, None, None, :]
        q = _heads(attn, attn.to_q(hidden_states))
        k, v = _heads(attn, attn.to_k(context)), _heads(attn, attn.to_v(context))
        fused = _out(attn, _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).to(hidden_states.dtype))
        return fused + self.align(fused, keep)

    def align(self, fused: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """CAA (eq. 9): cross-attention from the fused tokens to the CLIP embeddings of the K
        least-attended source regions; zero for dropped samples or with no scorable region."""
        state = self.state
        if state.region_tokens is None:
            return torch.zeros_like(fused)
        received = state.received[self.name]
        cover = state.region_coverage[received.shape[1]]
        index, chosen = lowest_regions(region_scores(received, cover, state.region_valid), self.top_k)
        tokens = torch.gather(state.region_tokens, 1, index[..., None].expand(-1, -1, state.region_tokens.shape[-1]))
        usable = chosen & keep[:, None]
        any_usable = usable.any(dim=1)
        # a row with no usable token attends to all (finite), then is zeroed
        visible = usable | ~any_usable[:, None]
        bias = torch.zeros(visible.shape, dtype=fused.dtype, device=fused.device).masked_fill(~visible, torch.finfo(fused.dtype).min)
        out = self.caa(fused, encoder_hidden_states=tokens.to(fused.dtype), attention_mask=bias[:, None, :])
        return out * any_usable[:, None, None].to(out.dtype)
