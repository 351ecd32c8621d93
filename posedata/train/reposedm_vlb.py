"""The learned-variance term L_vlb of RePoseDM's eq. 4 (Improved DDPM, Nichol & Dhariwal 2021).

RePoseDM: "an additional loss term L_vlb is proposed in [26], to learn the noise variance
... L_total = L_mse + L_vlb". diffusers implements the learned-range variance for SAMPLING
only (`DDPMScheduler(variance_type="learned_range")`), not this training term, so it is
ported here, the same computation as PIDM (ankanbhunia/PIDM e4f1d88 `diffusion.py`
`_vb_terms_bpd` :914-945 and `training_losses` :985-1017) and DiT (facebookresearch/DiT
`diffusion/gaussian_diffusion.py` `_vb_terms_bpd` / `training_losses`,
`diffusion/diffusion_utils.py` `normal_kl`, `discretized_gaussian_log_likelihood`):

- the model's second C channels v in [-1, 1] interpolate the log variance between the
  clipped posterior variance (min) and beta_t (max): log var = (v+1)/2 log beta_t +
  (1 - (v+1)/2) log beta~_t;
- the mean comes from the predicted noise DETACHED ("learn the variance using the
  variational bound, but don't let it affect our mean prediction");
- term = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits (mean over dimensions /
  log 2), and at t = 0 the discretized Gaussian decoder NLL instead;
- weight 1: PIDM and DiT build their diffusion with `rescale_learned_sigmas=False`
  (LossType.MSE), so loss = mse + vb; with T = 1000 the RESCALED_MSE factor T/1000 would
  be 1 anyway.

The decoder NLL's 1/255 bins were made for pixels in [-1, 1]; DiT applies it unchanged to
SD-VAE latents, and so do we (it only affects t = 0, one step in a thousand).
"""

from __future__ import annotations

import math

import torch


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """A fast approximation of the standard normal CDF (the tanh form DiT / iDDPM use)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of x (data in [-1, 1] quantised to 256 bins) under N(means, exp(log_scales)^2),
    elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianPosterior:
    """The q(x_{t-1} | x_t, x_0) coefficients of a beta schedule (float64, as iDDPM), with the
    clipped log variance and the learned-range interpolation."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.detach().to(torch.float64).cpu()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.num_timesteps = len(betas)
        self.log_betas = torch.log(betas)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod - 1.0)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # log of the posterior variance, its 0th entry (0) replaced by the 1st (iDDPM)
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)

    @staticmethod
    def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t.long()].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, clipped log variance) of q(x_{t-1} | x_t, x_0)."""
        mean = self.extract(self.posterior_mean_coef1, t, x_t) * x_start + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def predict_start_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def learned_range_log_variance(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Model output v in [-1, 1] -> log variance between beta~_t (v = -1) and beta_t (v = 1)."""
        min_log = self.extract(self.posterior_log_variance_clipped, t, values)
        max_log = self.extract(self.log_betas, t, values)
        frac = (values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def vb_terms_bpd(self, eps: torch.Tensor, variance_values: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_vlb per sample [B] in bits: KL for t > 0, decoder NLL at t = 0. `eps` is used as
        given: pass it detached for the iDDPM hybrid loss (`vlb_loss` does)."""
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        pred_start = self.predict_start_from_eps(x_t, t, eps)
        model_mean, _ = self.q_posterior(pred_start, x_t, t)
        model_log_variance = self.learned_range_log_variance(variance_values, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)


def vlb_loss(posterior: GaussianPosterior, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The iDDPM / PIDM / DiT L_vlb term (mean over the batch) of an 2C-channel output
    [eps | v]: the mean from the detached eps, so only the variance channels learn from it."""
    channels = x_t.shape[1]
    eps, values = model_output.float().split(channels, dim=1)
    return posterior.vb_terms_bpd(eps.detach(), values, x_start.float(), x_t.float(), t).mean()
