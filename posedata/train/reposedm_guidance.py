"""RePoseDM's Pose Interaction Fields and gradient guidance (sec. 3.3-3.4, eq. 10-16).

- P~_t (eq. 10): a latent decoded by the frozen VAE decoder. Eq. 10 literally decodes
  (eps - eps_theta), as HumanSD does (IDEA-Research/HumanSD c5db29d
  `ldm/models/diffusion/ddpm.py` `p_losses`: `decode_first_stage(model_output - noise)`,
  the opposite sign), while eq. 13 writes the guidance on Tweedie's estimate
  x0 = (y_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t), which is Universal Guidance's
  forward guidance (arpitbansal297/Universal-Guided-Diffusion). `GUIDANCE_LATENTS` makes it
  a switch; "tweedie" is the default because it is the only one defined at sampling time (no
  ground-truth eps there), so training and sampling guide the same quantity.
- G (eq. 11): HigherHRNet (posedata.models.higherhrnet, differentiable) on P~_t; its joint
  heatmaps (official single-scale aggregation, at the image size) summed over the joints and
  thresholded at 0.1 give the mask W_h (computed without gradient, as HumanSD's weight);
  G = W_h * ||P_phi(P~_t) - P_phi(P)||^2 on the backbone features (stage-4 highest-resolution
  branch, stride 4), with P_phi(P) the `higherhrnet` feature's stored `pose_features` of the
  target's skeleton render. W_h is taken to the feature grid by a max over each 4 x 4 cell.
  The per-sample scalar is the mean over the feature map (so the scale does not depend on
  the resolution).
- Guidance (eq. 15): eps~ = eps + scale * sqrt(1 - abar_t) * dG/dz, the gradient taken with
  respect to the decoded latent z through the frozen decoder and HigherHRNet (eps_theta is a
  constant there). Training (eq. 3 with eq. 15): the regression target becomes
  eps - lambda sqrt(1 - abar_t) stopgrad(dG/dz). Sampling (eq. 16): added to the CFG
  combination, eps_u + w_c (eps_c - eps_u) + scale sqrt(1 - abar_t) dG/dz at the CFG
  prediction's x0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from posedata.models.higherhrnet import FEATURE_STRIDE, aggregate_outputs, prepare_input

GUIDANCE_LATENTS = ("tweedie", "residual")
HEATMAP_THRESHOLD = 0.1


class PoseInteractionField:
    """G_phi of eq. 11 over scaled VAE latents, with a frozen VAE (decoder) and a frozen
    HigherHRNet (both in eval mode, no parameter gradients)."""

    def __init__(self, vae: Any, pose_net: torch.nn.Module, scaling_factor: float, threshold: float = HEATMAP_THRESHOLD):
        self.vae = vae.eval().requires_grad_(False)
        self.pose_net = pose_net.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        self.threshold = float(threshold)

    def to(self, device: torch.device | str) -> PoseInteractionField:
        self.vae.to(device)
        self.pose_net.to(device)
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> RGB in [0, 1] (HumanSD clamps (x + 1) / 2 the same way)."""
        dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(dtype) / self.scaling_factor).sample.float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def heatmap_mask(self, heatmaps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Summed joint heatmaps > threshold, at the image size, then max over each feature cell."""
        summed = heatmaps[..., : size[0], : size[1]].sum(1, keepdim=True)
        mask = (summed > self.threshold).float()
        return F.max_pool2d(mask, FEATURE_STRIDE, ceil_mode=True)

    def energy(self, latents: torch.Tensor, target_features: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(G per sample [B], W_h [B, 1, H/4, W/4]) for scaled latents [B, 4, h, w] and the
        stored P_phi(P) [B, C, H/4, W/4]. `weight` reuses a mask W_h instead of thresholding
        this decode's heatmaps (W_h is a no-gradient weight: G is smooth only for a fixed one)."""
        images = self.decode(latents)
        height, width = images.shape[-2:]
        inputs = prepare_input(images)
        out = self.pose_net(inputs)
        fh, fw = math.ceil(height / FEATURE_STRIDE), math.ceil(width / FEATURE_STRIDE)
        features = out.features[..., :fh, :fw].float()
        if features.shape[1:] != target_features.shape[1:]:
            raise ValueError(f"pose features of the decoded latents are {tuple(features.shape[1:])}, the stored ones {tuple(target_features.shape[1:])}")
        if weight is None:
            with torch.no_grad():
                heatmaps, _ = aggregate_outputs(out.heatmaps_quarter, out.tags, out.heatmaps_half, inputs.shape[-2:])
                weight = self.heatmap_mask(heatmaps.float(), (height, width))[..., :fh, :fw]
        distance = (features - target_features.float()).pow(2).sum(1, keepdim=True)
        return (weight * distance).mean(dim=(1, 2, 3)), weight

    def gradient(self, latents: torch.Tensor, target_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dG/dz [B, 4, h, w], G [B], W_h) at z = latents, which are treated as a leaf
        (whatever computed them gets no gradient). Works inside torch.no_grad()."""
        with torch.enable_grad():
            z = latents.detach().float().requires_grad_(True)
            energy, weight = self.energy(z, target_features)
            (grad,) = torch.autograd.grad(energy.sum(), z)
        return grad.to(latents.dtype), energy.detach(), weight


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t broadcast to `like` (t: a scalar or one timestep per sample)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device).long().reshape(-1)
    values = alphas_cumprod[t].to(like.device, torch.float32)
    if values.numel() == 1:
        values = values.expand(like.shape[0])
    return values.view(-1, *([1] * (like.ndim - 1)))


def guided_latents(kind: str, noisy: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """What P~_t decodes: Tweedie's x0 (eq. 13) or eq. 10's residual eps - eps_theta."""
    if kind == "tweedie":
        return (noisy.float() - (1.0 - abar).sqrt() * eps.float()) / abar.sqrt()
    if kind == "residual":
        if noise is None:
            raise ValueError("guidance on the residual (eq. 10) needs the ground-truth noise: training only")
        return noise.float() - eps.float()
    raise ValueError(f"guidance latents must be one of {GUIDANCE_LATENTS}, got {kind!r}")


def guidance_term(
    field: PoseInteractionField,
    target_features: torch.Tensor,
    noisy: torch.Tensor,
    eps: torch.Tensor,
    abar: torch.Tensor,
    *,
    kind: str = "tweedie",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(1 - abar_t) dG/dz, G): eq. 15's added term at scale 1, with eps_theta constant."""
    latents = guided_latents(kind, noisy, eps.detach(), abar, noise)
    grad, energy, _ = field.gradient(latents, target_features)
    return (1.0 - abar).sqrt() * grad.float(), energy


def interaction_field(card: dict[str, Any], vae_need: str, pose_need: str, plugin: str, scaling_factor: float, vae: Any = None) -> PoseInteractionField:
    """G_phi with the dataset's own VAE (`vae_need`; or `vae`, already rebuilt from it) and
    HigherHRNet (`pose_need`), on CPU."""
    from posedata.train.plugin import rebuild_extractor

    vae = vae if vae is not None else rebuild_extractor(card, vae_need, plugin).build_model()
    pose_net = rebuild_extractor(card, pose_need, plugin).build_net()
    return PoseInteractionField(vae, pose_net, scaling_factor)
