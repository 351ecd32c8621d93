"""TruePose's style transfer (Sec. 5.4): a trained TruePose model, no extra training.

For a pair (source = the appearance donor, target = the reference image y^ref) the sampler
denoises one latent at the reference's pose with two noise predictions per step:

    y_t      TargetNet fed by SourceNet on the donor (the pair's ordinary prediction)
    y_t^ref  TargetNet fed by SourceNet on the reference itself (its stored latent,
             parsing and CLIP regions): the reference re-posed to its own pose

and blends them with a binary mask m of the reference's parsing regions (`--style-region`),
resized to the latent grid: y_t = m * y_t + (1 - m) * y_t^ref (the paper's formula). Inside
m the donor's appearance is painted at the reference's pose; outside it the reference is
kept (Fig. 7: "edit the reference image to incorporate pattern features from the source
image while ensuring consistency in appearance and pose"). `region_from="reference"` swaps
the two sides (the region keeps the reference, the rest follows the donor: the literal
reading of the prose "preserves the region of interest in y^ref"); docs/truepose-fidelity.md.

The blend is linear, so blending the conditional predictions before classifier-free
guidance equals blending the guided ones; the unconditional prediction does not see
SourceNet (HPFA and CAA are the identity for it) and the pose is the reference's in both
branches, so it is one prediction shared by the two branches. One forward pass per step
carries [unconditional; donor; reference] (or [donor; reference] without guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posedata.extractors.parsing import ATR_LABELS

REGION_FROM = ("source", "reference")  # which image the masked region takes its appearance from


def style_region_ids(spec: str | list[str] | tuple[str, ...], plugin: str = "truepose") -> list[int]:
    """"upper-clothes,skirt" (or a list of names) -> ATR label ids; unknown names are an error
    that lists the known ones."""
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ValueError(f"{plugin}: --style-region names no region; known: {', '.join(ATR_LABELS)}")
    unknown = [n for n in names if n not in ATR_LABELS]
    if unknown:
        raise ValueError(f"{plugin}: unknown --style-region {', '.join(unknown)}; the parsing regions are {', '.join(ATR_LABELS)}")
    return sorted({ATR_LABELS.index(n) for n in names})


def region_mask(labels: torch.Tensor, ids: list[int], size: tuple[int, int]) -> torch.Tensor:
    """The binary mask m [B, 1, h, w] (bool) of the classes `ids` in the label maps [B, H, W],
    at the latent grid `size`: a latent pixel is in m when the classes cover at least half of
    its cell (area resampling, the rule HPFA uses for its mask M)."""
    chosen = torch.isin(labels.long(), torch.as_tensor(ids, device=labels.device)).float().unsqueeze(1)
    return F.adaptive_avg_pool2d(chosen, size) >= 0.5


def branch_rows(batch: int, guided: bool) -> torch.Tensor:
    """Which of the 2B SourceNet states ([donor; reference]) each row of the model's batch
    reads: [donor; reference], or [unconditional (any state: it is hidden); donor; reference]."""
    rows = torch.arange(2 * batch)
    return torch.cat([rows[:batch], rows]) if guided else rows


def spread_latents(x: torch.Tensor, guided: bool) -> torch.Tensor:
    """The sampler's latents ([x] or [x_uncond; x_cond]) laid out as the model's batch: the
    conditional latents go to both branches."""
    if not guided:
        return torch.cat([x, x])
    uncond, cond = x.chunk(2)
    return torch.cat([uncond, cond, cond])


def blend_branches(out: torch.Tensor, mask: torch.Tensor, guided: bool) -> torch.Tensor:
    """The model's output over `spread_latents`' layout -> what the sampler expects ([B] or
    [uncond; cond]), the two branches blended: m * donor + (1 - m) * reference (m binary,
    so each latent pixel is exactly one branch's)."""
    parts = out.chunk(3 if guided else 2)
    mixed = torch.where(mask.to(out.device), parts[-2], parts[-1])
    return torch.cat([parts[0], mixed]) if guided else mixed
