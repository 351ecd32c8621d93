"""RePoseDM's Recurrent Pose Alignment (sec. 3.2, eq. 5-9): MapFormer + pose-mapping
aggregator, iterated, producing pose-aligned source features F_S^N for the UNet's
cross-attention.

The paper gives the structure, not the code (there is none public); where it is vague we
follow its nearest public code, RHWF (imdumpl78/RHWF c3e485a, `rhwf.py`, `ATT/attention_layer.py`),
which the paper cites as [4] together with IHN [3] and LocalTrans [31]:

- MapFormer = RHWF's `FocusFormer_Attention`: ONE self-attention module applied to both
  inputs, ONE cross-attention module applied both ways (source <- pose, pose <- source), ONE
  position-wise FFN; each is `out = LayerNorm(x + W_o attn(...))` (post-norm, residual +
  layer norm as eq. 5's text says) with 1x1-conv projections, one head of depth D.
- Regions N(x) shrink over the iterations: RHWF's `kernel_list_0 = [0, 9, 5, 3, 3, 3]`
  (0 = global attention) for the initial pass and N = 5 recurrent ones. A local window is
  every position's k x k neighbourhood with zero padding (RHWF's `Correlation` /
  `ChannelAttention` CUDA ops), written here with `F.unfold` (no custom CUDA).
- Correlation (eq. 6): ReLU(F'_T(x) . F'_S(x + r)), |r|_inf <= R, again with `F.unfold`.
- Aggregator: 2 convolutions of depth D and one max-pool (LocalTrans' unit; RHWF: 1x1 conv
  on the correlation, the current flow concatenated, 3x3 conv). RHWF and LocalTrans then
  regress a homography, which cannot express a change of human pose: here a zero-initialised
  3x3 head predicts a dense 2-channel flow update at half the latent resolution, upsampled
  bilinearly (RHWF upsamples its flow the same way before warping).
- Recurrence (eq. 7-9): the flow accumulates additively (RAFT / RHWF's
  `four_point_disp + delta`; eq. 7's product is composition of homographies) and every
  iteration re-warps the ORIGINAL source with the accumulated flow and re-encodes it (eq. 9,
  RHWF `warp(image2_org, flow_med)` then `self.encoder`).
- What is warped (`RPA_WARPS`): "latent" (default) warps the stored VAE latent of the source
  (grid_sample at latent resolution) and re-encodes it with the learned conv encoder of
  depth D, no VAE in the step (a departure: cheap); "pixels" is eq. 9 as written,
  F_S^n = Encoder(W(I_S; F^n)) with Encoder the VAE encoder ("Encoder is obtained from VAE
  encoder", sec. 3.2): the flow is upsampled to the image (RHWF `F.upsample_bilinear(flow,
  [4, 4]) * 4`, here x H/h), the source IMAGE is warped and the frozen VAE encoder
  (`VaeSourceEncoder`, the dataset's own) re-encodes it, then the same conv of depth D as
  for the initial F_S. The flow is NOT detached before the warp (RHWF detaches because each
  iteration's homography is supervised directly; without a warp loss the flow learns only
  through the warp, so with "pixels" the gradient goes back through the frozen encoder).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# RHWF rhwf.py `kernel_list_0`: window size per iteration, 0 = global.
RHWF_KERNELS: tuple[int, ...] = (0, 9, 5, 3, 3, 3)
# what eq. 9 re-warps: the stored source latent (default) or the source image's pixels
RPA_WARPS = ("latent", "pixels")


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each position of q [B, C, H, W] attends to the kernel x kernel neighbourhood of the same
    position in k, v (zero padding, as RHWF's CUDA ops); kernel 0 = every position (global).
    Single head, logits scaled by 1/sqrt(C)."""
    b, c, h, w = q.shape
    if kernel == 0:
        out = F.scaled_dot_product_attention(
            q.flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2)
        )
        return out.transpose(1, 2).reshape(b, c, h, w)
    if kernel % 2 == 0:
        raise ValueError(f"local attention needs an odd window, got {kernel}")
    pad = kernel // 2
    keys = F.unfold(k, kernel, padding=pad).view(b, c, kernel * kernel, h * w)
    values = F.unfold(v, kernel, padding=pad).view(b, v.shape[1], kernel * kernel, h * w)
    logits = (q.reshape(b, c, 1, h * w) * keys).sum(1) / math.sqrt(c)  # [B, k*k, HW]
    weights = logits.softmax(dim=1)
    return (weights.unsqueeze(1) * values).sum(2).view(b, v.shape[1], h, w)


def local_correlation(target: torch.Tensor, source: torch.Tensor, radius: int) -> torch.Tensor:
    """Eq. 6: ReLU(target(x) . source(x + r)) / sqrt(C) for every offset |r|_inf <= radius,
    [B, (2R+1)^2, H, W] (zero padding outside the map)."""
    b, c, h, w = target.shape
    size = 2 * radius + 1
    shifted = F.unfold(source, size, padding=radius).view(b, c, size * size, h, w)
    return F.relu((target.unsqueeze(2) * shifted).sum(1) / math.sqrt(c))


def identity_grid(flow: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates (x, y) [B, 2, H, W] of a flow's grid."""
    b, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype), torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    return torch.stack([xs, ys]).unsqueeze(0).expand(b, -1, -1, -1)


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out(p) = x(p + flow(p)), flow [B, 2, H, W] in pixels (x, y), bilinear,
    border padding (a latent of zeros is not background)."""
    _, _, h, w = x.shape
    coords = identity_grid(flow) + flow
    grid_x = 2.0 * coords[:, 0] / max(w - 1, 1) - 1.0
    grid_y = 2.0 * coords[:, 1] / max(h - 1, 1) - 1.0
    grid = torch.stack([grid_x, grid_y], dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def upsample_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A flow [B, 2, h, w] in latent pixels -> [B, 2, H, W] in image pixels: bilinear with
    aligned corners, x scaled by W / w and y by H / h (RHWF rhwf.py:165,
    `F.upsample_bilinear(flow_med, None, [4, 4]) * 4`)."""
    height, width = size
    h, w = flow.shape[-2:]
    up = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=True)
    scale = torch.tensor([width / w, height / h], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
    return up * scale


class VaeSourceEncoder:
    """Eq. 9's Encoder for the pixel warp: the frozen VAE encoder (eval mode, no parameter
    gradients; gradients still reach its input, so the flow learns through it). [-1, 1]
    pixels [B, 3, H, W] -> the scaled posterior mean [B, 4, H/8, W/8] (the mode: a
    deterministic re-encoding), in the pixels' dtype."""

    def __init__(self, vae: Any, scaling_factor: float):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)

    def to(self, device: torch.device | str) -> VaeSourceEncoder:
        self.vae.to(device)
        return self

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(pixels.to(dtype)).latent_dist.mean
        return (mean * self.scaling_factor).to(pixels.dtype)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map (RHWF's LayerNorm2d)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RegionAttention(nn.Module):
    """One attention of eq. 5 over regions N(x): 1x1-conv Q/K/V/output projections without
    bias, residual, then LayerNorm (RHWF `Multi_head_focus_attention`, one head)."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_q = nn.Conv2d(dim, dim, 1, bias=False)
        self.to_k = nn.Conv2d(dim, dim, 1, bias=False)
        self.to_v = nn.Conv2d(dim, dim, 1, bias=False)
        self.to_out = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm = ChannelLayerNorm(dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, kernel: int) -> torch.Tensor:
        attended = local_attention(self.to_q(query), self.to_k(context), self.to_v(context), kernel)
        return self.norm(query + self.to_out(attended))


class FeedForward(nn.Module):
    """Position-wise FFN: x + LayerNorm(W2 relu(W1 x)) (RHWF `PositionwiseFeedForward`)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.w_1 = nn.Conv2d(dim, hidden or dim, 1)
        self.w_2 = nn.Conv2d(hidden or dim, dim, 1)
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.w_2(F.relu(self.w_1(x))))


class MapFormer(nn.Module):
    """Self-attention on each input, cross-attention both ways, FFN (one layer of each)."""

    def __init__(self, dim: int):
        super().__init__()
        self.self_attn = RegionAttention(dim)
        self.cross_attn = RegionAttention(dim)
        self.ffn = FeedForward(dim)

    def forward(self, source: torch.Tensor, pose: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
        source_self = self.self_attn(source, source, kernel)
        pose_self = self.self_attn(pose, pose, kernel)
        source_cross = self.cross_attn(source_self, pose_self, kernel)
        pose_cross = self.cross_attn(pose_self, source_self, kernel)
        return self.ffn(source_cross), self.ffn(pose_cross)


class PoseMappingAggregator(nn.Module):
    """Correlation (+ the current flow) -> conv 1x1 (D) -> conv 3x3 (D) -> max-pool /2 ->
    zero-initialised 3x3 flow head -> bilinear x2: a dense flow update [B, 2, H, W]."""

    def __init__(self, dim: int, radius: int):
        super().__init__()
        corr_channels = (2 * radius + 1) ** 2
        self.conv1 = nn.Conv2d(corr_channels + 2, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.flow_head = nn.Conv2d(dim, 2, 3, padding=1)
        nn.init.zeros_(self.flow_head.weight)
        nn.init.zeros_(self.flow_head.bias)

    def forward(self, correlation: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(torch.cat([correlation, flow], dim=1)))
        x = self.pool(F.relu(self.conv2(x)))
        return F.interpolate(self.flow_head(x), size=flow.shape[-2:], mode="bilinear", align_corners=False)


def latent_encoder(in_channels: int, dim: int) -> nn.Sequential:
    """The conv of depth D that represents a latent's regions (two 3x3 convs, ReLU between)."""
    return nn.Sequential(nn.Conv2d(in_channels, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1))


class RecurrentPoseAlignment(nn.Module):
    """Eq. 7-9 over the source latent z_S and the target pose latent z_P (both [B, 4, h, w],
    scaled VAE latents). `iterations` = N recurrent passes after the initial one (N = 5 in
    the paper); `kernels` the region size of each pass (RHWF's, the last one repeated).

    forward -> (F_S^N [B, D, h, w], warped source latent [B, 4, h, w], flow [B, 2, h, w]).
    With `pixels` (the source image, [-1, 1] [B, 3, H, W]) and `encode` (pixels -> scaled
    latent, `VaeSourceEncoder`) every iteration warps the image instead of z_S and
    re-encodes it (eq. 9 on pixels); the warped latent returned is that re-encoding."""

    def __init__(self, latent_channels: int = 4, dim: int = 96, radius: int = 4, iterations: int = 5, kernels: Sequence[int] = RHWF_KERNELS):
        super().__init__()
        self.iterations = int(iterations)
        self.kernels = tuple(int(k) for k in kernels)
        self.radius = int(radius)
        self.source_encoder = latent_encoder(latent_channels, dim)
        self.pose_encoder = latent_encoder(latent_channels, dim)
        self.mapformer = MapFormer(dim)
        self.aggregator = PoseMappingAggregator(dim, radius)

    def kernel(self, step: int) -> int:
        return self.kernels[min(step, len(self.kernels) - 1)]

    def forward(self, source: torch.Tensor, pose: torch.Tensor, pixels: torch.Tensor | None = None,
                encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (pixels is None) != (encode is None):
            raise ValueError("the pixel warp needs both the source pixels and the encoder")
        pose_features = self.pose_encoder(pose)
        source_features = self.source_encoder(source)
        flow = source.new_zeros(source.shape[0], 2, *source.shape[-2:])
        warped = source
        for step in range(self.iterations + 1):
            mapped_source, mapped_pose = self.mapformer(source_features, pose_features, self.kernel(step))
            correlation = local_correlation(mapped_pose, mapped_source, self.radius)
            flow = flow + self.aggregator(correlation, flow)
            # the ORIGINAL source, accumulated flow (eq. 9)
            warped = warp(source, flow) if pixels is None else encode(warp(pixels, upsample_flow(flow, pixels.shape[-2:])))
            source_features = self.source_encoder(warped)
        return source_features, warped, flow
