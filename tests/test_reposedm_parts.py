"""RePoseDM's own parts: region attention, correlation and warping (RPA), the L_vlb port,
and the pose-interaction-field guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from posedata.extractors.vae import TINY_CONFIG as TINY_VAE
from posedata.models.higherhrnet import TINY_CONFIG as TINY_HRNET
from posedata.models.higherhrnet import build_higherhrnet
from posedata.train.reposedm_guidance import PoseInteractionField, alpha_bar, guidance_term, guided_latents
from posedata.train.reposedm_rpa import RecurrentPoseAlignment, local_attention, local_correlation, warp
from posedata.train.reposedm_vlb import GaussianPosterior, discretized_gaussian_log_likelihood, normal_kl, vlb_loss


def naive_local_attention(q, k, v, kernel):
    b, c, h, w = q.shape
    pad = kernel // 2
    kp, vp = F.pad(k, (pad,) * 4), F.pad(v, (pad,) * 4)
    out = torch.zeros_like(q)
    for y in range(h):
        for x in range(w):
            keys = kp[:, :, y : y + kernel, x : x + kernel].reshape(b, c, -1)
            values = vp[:, :, y : y + kernel, x : x + kernel].reshape(b, c, -1)
            weights = torch.softmax((q[:, :, y, x, None] * keys).sum(1) / math.sqrt(c), dim=-1)
            out[:, :, y, x] = (weights[:, None] * values).sum(-1)
    return out


def test_local_attention_is_attention_over_each_neighbourhood():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 5, 4) for _ in range(3))
    for kernel in (3, 5):
        torch.testing.assert_close(local_attention(q, k, v, kernel), naive_local_attention(q, k, v, kernel), rtol=1e-5, atol=1e-5)
    # kernel 0 = global attention over every position
    flat = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    expected = torch.softmax(flat(q) @ flat(k).transpose(1, 2) / math.sqrt(6), -1) @ flat(v)
    torch.testing.assert_close(local_attention(q, k, v, 0), expected.transpose(1, 2).reshape(2, 6, 5, 4), rtol=1e-5, atol=1e-5)


def test_local_correlation_is_eq6():
    torch.manual_seed(0)
    target, source = torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)
    corr = local_correlation(target, source, radius=1)
    assert corr.shape == (1, 9, 4, 5)
    padded = F.pad(source, (1, 1, 1, 1))
    for y in range(4):
        for x in range(5):
            for i, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                value = (target[0, :, y, x] * padded[0, :, y + 1 + dy, x + 1 + dx]).sum() / math.sqrt(3)
                assert corr[0, i, y, x].item() == pytest.approx(max(value.item(), 0.0), abs=1e-5)


def test_warp_is_identity_at_zero_flow_and_shifts_by_whole_pixels():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    torch.testing.assert_close(warp(x, torch.zeros(2, 2, 4, 5)), x)
    flow = torch.zeros(2, 2, 4, 5)
    flow[:, 0] = 1.0  # sample one pixel to the right
    torch.testing.assert_close(warp(x, flow)[..., :-1], x[..., 1:])


def test_rpa_shapes_starts_as_identity_and_every_part_learns():
    torch.manual_seed(0)
    rpa = RecurrentPoseAlignment(dim=8, radius=2, iterations=5)
    source, pose = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)
    features, warped, flow = rpa(source, pose)
    assert features.shape == (2, 8, 8, 6) and warped.shape == source.shape and flow.shape == (2, 2, 8, 6)
    torch.testing.assert_close(warped, source)  # zero-initialised flow head: no warp yet
    optimizer = torch.optim.SGD(rpa.parameters(), lr=0.1)
    target = torch.roll(source, 1, dims=-1)  # a pose "moved" one latent pixel
    losses = []
    for _ in range(3):
        features, warped, flow = rpa(source, pose)
        loss = F.mse_loss(warped, target) + features.pow(2).mean() * 1e-3
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert flow.abs().sum() > 0  # the flow moved: gradients reach it through the warp
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in rpa.parameters())


# ---- L_vlb ----------------------------------------------------------------------------------


def linear_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear", variance_type="learned_range")


def test_normal_kl_and_likelihood_match_torch_distributions():
    torch.manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)
    # a bin of width 2/255 at the centre of a wide Gaussian: log(pdf * width)
    x, mean, log_scale = torch.zeros(1), torch.zeros(1), torch.log(torch.tensor([0.5]))
    pdf = torch.distributions.Normal(0.0, 0.5).log_prob(torch.zeros(1)).exp()
    assert discretized_gaussian_log_likelihood(x, mean, log_scale).item() == pytest.approx(math.log(pdf.item() * 2 / 255), rel=1e-3)


def test_learned_range_matches_diffusers_sampling_variance():
    scheduler = linear_scheduler()
    posterior = GaussianPosterior(scheduler.betas)
    for t in (1, 10, 500, 999):
        for v in (-1.0, -0.3, 0.0, 1.0):
            ours = posterior.learned_range_log_variance(torch.full((1, 1), v), torch.tensor([t])).item()
            theirs = scheduler._get_variance(t, predicted_variance=torch.tensor(v), variance_type="learned_range").item()
            assert ours == pytest.approx(theirs, rel=1e-4)  # diffusers computes in float32


def test_vlb_is_zero_gradient_for_the_mean_and_minimal_at_the_true_posterior():
    scheduler = linear_scheduler()
    posterior = GaussianPosterior(scheduler.betas)
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 5, 700])
    xt = scheduler.add_noise(x0, noise, t)
    output = torch.cat([noise, torch.full_like(noise, -1.0)], dim=1).requires_grad_(True)
    loss = vlb_loss(posterior, output, x0, xt, t)
    loss.backward()
    assert output.grad[:, :4].abs().max() == 0  # the mean is detached
    assert output.grad[:, 4:].abs().max() > 0
    terms = posterior.vb_terms_bpd(noise, torch.full_like(noise, -1.0), x0, xt, t)
    # true noise and the posterior's own variance: the KL terms vanish
    assert terms[1:].abs().max() < 1e-3
    wrong = posterior.vb_terms_bpd(noise + 0.5, torch.full_like(noise, -1.0), x0, xt, t)
    assert (wrong[1:] > terms[1:]).all()


# ---- pose interaction field -----------------------------------------------------------------


@pytest.fixture(scope="module")
def field() -> PoseInteractionField:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE)
    net = build_higherhrnet(TINY_HRNET, seed=0, zero_init_last=True)
    return PoseInteractionField(vae, net, scaling_factor=0.18215)


def test_guidance_gradient_points_downhill_on_g(field):
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 6, generator=generator)
    target = torch.randn(2, 32, 16, 12, generator=generator)
    grad, energy, weight = field.gradient(z, target)
    assert grad.shape == z.shape and (energy > 0).all() and 0 < weight.mean() < 1
    # a small step (0.01 at the largest entry) against the gradient lowers G for every sample
    # (at the same mask W_h: a no-gradient weight, re-thresholded it may switch cells on or off)
    step = 0.01 / grad.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    assert (field.energy(z - step * grad, target, weight)[0] < energy).all()
    assert (field.energy(z + step * grad, target, weight)[0] > energy).all()


def test_guided_noise_moves_tweedie_x0_downhill(field):
    """eq. 15: eps~ = eps + s sqrt(1 - abar) dG/dx0 gives an x0 estimate with lower G."""
    scheduler = linear_scheduler()
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 8, 6, generator=generator)
    noise = torch.randn(2, 4, 8, 6, generator=generator)
    target = torch.randn(2, 32, 16, 12, generator=generator)
    t = torch.tensor([300, 300])
    noisy = scheduler.add_noise(x0, noise, t)
    abar = alpha_bar(scheduler.alphas_cumprod, t, noisy)
    eps = noise + 0.3 * torch.randn(2, 4, 8, 6, generator=generator)  # an imperfect prediction
    term, energy = guidance_term(field, target, noisy, eps, abar)
    before, weight = field.energy(guided_latents("tweedie", noisy, eps, abar), target)
    scale = 0.01 / term.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    after, _ = field.energy(guided_latents("tweedie", noisy, eps + scale * term, abar), target, weight)
    torch.testing.assert_close(before, energy)
    assert (after < before).all()
    residual, _ = guidance_term(field, target, noisy, eps, abar, kind="residual", noise=noise)
    assert not torch.allclose(residual, term)
    with pytest.raises(ValueError, match="ground-truth noise"):
        guidance_term(field, target, noisy, eps, abar, kind="residual")


def test_mask_is_summed_heatmaps_over_threshold(field):
    heatmaps = torch.zeros(1, 17, 8, 8)
    heatmaps[0, 3, 1, 1] = 0.06
    heatmaps[0, 4, 1, 1] = 0.06  # summed 0.12 > 0.1
    heatmaps[0, 5, 6, 6] = 0.09  # alone below the threshold
    mask = field.heatmap_mask(heatmaps, (8, 8))
    np.testing.assert_array_equal(mask[0, 0].numpy(), np.array([[1, 0], [0, 0]], dtype=np.float32))
