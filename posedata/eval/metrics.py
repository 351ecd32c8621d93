"""The metric library calls, once: scikit-image for SSIM and PSNR, `lpips` for LPIPS,
pytorch-fid's Frechet distance for FID, and the Inception Score (no library computes it
as the papers' script did, so it is written here). A protocol decides what goes in (see protocol.py).

scikit-image's SSIM is the one the scripts call; torchmetrics' differs by up to 0.013 on
these images (it pads the border instead of cropping it) and its PSNR pools the squared
error over the batch unless told `dim=(1, 2, 3)`, so neither is used here.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def ssim(generated: np.ndarray, truth: np.ndarray, sigma: float) -> float:
    """The scripts' `ssim_256`: Gaussian window of `sigma`, population covariance, the three
    colour channels averaged, `data_range = generated.max() - generated.min()`, computed in
    the dtype the script passed (float32, or float64 for uint8)."""
    data_range = float(generated.max()) - float(generated.min())
    return float(structural_similarity(truth, generated, gaussian_weights=True, sigma=sigma, use_sample_covariance=False, channel_axis=2, data_range=data_range))


def psnr(generated: np.ndarray, truth: np.ndarray) -> float:
    """PSNR with data_range 1 on [0, 1] images, per image (the scripts average per-image values)."""
    return float(peak_signal_noise_ratio(truth, generated, data_range=1))


def lpips_distances(network: torch.nn.Module, generated: list[np.ndarray], truth: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """Per-pair LPIPS: HxWx3 float32 arrays already in the range the network receives."""
    device = next(network.parameters()).device
    out = []
    for start in range(0, len(generated), batch_size):
        a = torch.from_numpy(np.stack(generated[start : start + batch_size])).permute(0, 3, 1, 2).to(device)
        b = torch.from_numpy(np.stack(truth[start : start + batch_size])).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            out.append(network(a, b).flatten().float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def counted(n: int, batch: int | None) -> int:
    """How many of `n` items a script that drops the last partial batch uses: the scripts set
    the batch to `n` when `n` is smaller, then keep `n // batch * batch`."""
    if batch is None or n == 0:
        return n
    batch = min(batch, n)
    return n // batch * batch


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of pool features, in float64 as `np.mean` / `np.cov(rowvar=False)`."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """FID between two sets of pool features [N, D].

    With at least D images on each side (every official test set: 8,570 DeepFashion pairs,
    12,000 Market-1501 pairs, against 2048 dimensions) this is pytorch-fid's
    `calculate_frechet_distance`, the TTUR code every script copies (scipy `sqrtm` of the
    D x D product). With fewer images on one side the covariance has rank < D: scipy's
    sqrtm of the singular product is slow (minutes) and inaccurate, so the same trace,
    tr sqrt(S1 S2), is taken exactly through the small side's K x K matrix
    X S_other X^T / (K - 1), X its centred features, whose eigenvalues are the non-zero
    eigenvalues of S1 S2."""
    mu1, sigma1 = statistics(generated)
    mu2, sigma2 = statistics(reference)
    small, other_sigma = (generated, sigma2) if len(generated) <= len(reference) else (reference, sigma1)
    k, d = np.shape(small)
    if k >= d:
        from pytorch_fid.fid_score import calculate_frechet_distance

        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    centred = np.asarray(small, np.float64) - np.asarray(small, np.float64).mean(axis=0)
    gram = centred @ other_sigma @ centred.T / (k - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((gram + gram.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """OpenAI's `get_inception_score` (improved-GAN `inception_score.py`, copied by PATN):
    softmax of each image's logits; the images, in order, cut into `splits` parts at
    `i * N // splits`; per part `exp(mean_i KL(p_i || mean p))`; the mean and std of those.
    Log-probabilities are taken with log-softmax in float64, so a class with probability 0
    adds 0 (where `p * log p` of the script would give NaN)."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if splits < 1 or n < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images for {splits} splits, got {n}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part)
        with np.errstate(divide="ignore", invalid="ignore"):  # a class of probability 0 throughout adds 0
            log_marginal = np.log(p.mean(axis=0, keepdims=True))
            kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
