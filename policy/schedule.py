"""DDIM (eta > 0) step with its Gaussian log-probability: the building block of every method here.

The DDIM and ε formulas are the math of the ``DDIMEpsilon`` noise process (policy/process.py), their one caller
outside the tests; the Gaussian log-probabilities serve any process. Song et al., DDIM, Eq. 12 and 16;
docs/math.md §1-2, with ᾱ the scheduler's ``alphas_cumprod``:
    x_t  = √ᾱ_t x_0 + √(1−ᾱ_t) ε ,   SNR(t) = ᾱ_t / (1−ᾱ_t)
    x̂_0  = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
    σ_t² = η² (1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)
    μ    = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ_t²) ε̂ ,   x_{t−1} = μ + σ_t z
    log π(x_{t−1} | x_t) = Σ or mean over latent dims of log N(x_{t−1}; μ, σ_t²)
η = 1 is DDPM's posterior variance. The previous timestep is ``t − T//N`` with ᾱ of a negative index equal to
``final_alpha_cumprod`` (diffusers' convention; for SD1.5 it equals the clamp of kvablack/ddpo-pytorch
``ddim_with_logprob.py``). That value must be < 1: with ``set_alpha_to_one=True`` the last step has σ = 0.
Everything is computed in float32 or wider: the log-ratio of two policies is a difference of squared distances
that bf16 cannot resolve (docs/math.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Reduce = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class StepCoefficients:
    """ᾱ_t, ᾱ_prev and σ_t for a batch of timesteps, shaped to broadcast over latents [B, C, H, W]."""

    alpha_t: torch.Tensor
    alpha_prev: torch.Tensor
    sigma: torch.Tensor


def _widen(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def step_coefficients(
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float | torch.Tensor,
    timestep: torch.Tensor,
    prev_timestep: torch.Tensor,
    eta: float,
    ndim: int = 4,
) -> StepCoefficients:
    """Gather ᾱ_t, ᾱ_prev (final ᾱ where prev < 0) and σ_t for each timestep of the batch."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ac = _widen(alphas_cumprod)
    t = torch.as_tensor(timestep, device=ac.device).long().reshape(-1)
    tp = torch.as_tensor(prev_timestep, device=ac.device).long().reshape(-1)
    final = torch.as_tensor(final_alpha_cumprod, dtype=ac.dtype, device=ac.device)
    alpha_t = ac[t]
    alpha_prev = torch.where(tp >= 0, ac[tp.clamp(min=0)], final)
    var = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    if eta > 0 and bool((alpha_prev >= 1).any()):
        raise ValueError(
            f"sigma_t = 0 at timestep(s) {t[alpha_prev >= 1].tolist()} although eta = {eta}: the step lands on "
            "alpha_cumprod = 1 (a scheduler with set_alpha_to_one=True makes the last DDIM step noise-free), so it "
            "has no log-probability; load the scheduler with set_alpha_to_one=False")
    sigma = eta * var.clamp(min=0).sqrt()
    shape = (-1,) + (1,) * (ndim - 1)
    return StepCoefficients(alpha_t.view(shape), alpha_prev.view(shape), sigma.view(shape))


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """A sample of q(x_t | x_0) for given noise: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (what ``predict_x0`` inverts)."""
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise


def signal_to_noise(alpha_t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1−ᾱ_t) of the variance-preserving forward process."""
    return alpha_t / (1 - alpha_t)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """Tweedie's estimate of the clean latent: x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t."""
    return (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()


def ddim_mean(x_t: torch.Tensor, eps: torch.Tensor, c: StepCoefficients) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of π(x_{t−1} | x_t) and the x̂_0 it goes through."""
    x_t, eps = _widen(x_t), _widen(eps)
    x0 = predict_x0(x_t, eps, c.alpha_t)
    direction = (1 - c.alpha_prev - c.sigma**2).clamp(min=0).sqrt()
    return c.alpha_prev.sqrt() * x0 + direction * eps, x0


def reduce_per_sample(per_dim: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """[B, ...] → [B]: the mean or the sum over every non-batch dim (the log-probs' and the divergences' scale)."""
    flat = per_dim.flatten(1)
    if reduce == "mean":
        return flat.mean(1)
    if reduce == "sum":
        return flat.sum(1)
    raise ValueError(f"reduce must be 'mean' or 'sum' (sampler.logprob_reduce), got {reduce!r}")


def _check_sigma(sigma: torch.Tensor) -> None:
    if not bool((sigma > 0).all()):
        raise ValueError(
            "log-probability needs sigma > 0: DDIM with eta=0 is deterministic and has no density; use eta > 0 "
            "(and a scheduler with set_alpha_to_one=False, whose last step keeps sigma > 0)"
        )


def gaussian_logprob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """log N(x_prev; mean, σ²) per sample, summed or averaged over latent dims (the public code averages)."""
    _check_sigma(sigma)
    x_prev, mean = _widen(x_prev), _widen(mean)
    per_dim = -((x_prev - mean) ** 2) / (2 * sigma**2) - sigma.log() - _LOG_SQRT_2PI
    return reduce_per_sample(per_dim, reduce)


def logprob_ratio(
    x_prev: torch.Tensor, mean_a: torch.Tensor, mean_b: torch.Tensor, sigma: torch.Tensor, reduce: Reduce
) -> torch.Tensor:
    """log π_a(x_prev) − log π_b(x_prev) for two Gaussians sharing σ, as a difference of squared distances.

    Subtracting two full log-densities loses the tiny difference in the large shared terms; this form keeps it.
    """
    _check_sigma(sigma)
    x_prev, mean_a, mean_b = _widen(x_prev), _widen(mean_a), _widen(mean_b)
    per_dim = ((x_prev - mean_b) ** 2 - (x_prev - mean_a) ** 2) / (2 * sigma**2)
    return reduce_per_sample(per_dim, reduce)
