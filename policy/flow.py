"""Rectified-flow step with a Gaussian log-probability: the SDE that turns a flow-matching sampler into a policy.

Forward process (rectified flow, as SD3 and FLUX are trained): x_σ = (1−σ) x_0 + σ ε, σ ∈ [0, 1]; the model
predicts the velocity v̂ ≈ ε − x_0, so
    x̂_0 = x_σ − σ v̂                      (and ε̂ = x_σ + (1−σ) v̂)
    score ∇ log p_σ(x_σ) = −ε̂ / σ = −(x_σ + (1−σ) v̂) / σ
The deterministic sampler is the Euler step of the ODE dx = v dσ: x_{σ'} = x_σ + (σ' − σ) v̂ (σ' < σ toward data).
Among the SDEs with the ODE's marginals, dx = [v − (g²/2) ∇ log p] dσ + g dw̄ run backwards (Flow-GRPO, Liu et al.,
arXiv 2505.05470, Eq. 8-9, re-derived in docs/math.md), with g_σ = a √(σ / (1−σ)) (``noise_level`` a).
Its Euler–Maruyama step from σ to σ' (dσ = σ' − σ < 0):
    μ   = x_σ + [v̂ + g² / (2σ) · (x_σ + (1−σ) v̂)] dσ
    std = g_σ √(−dσ),      x_{σ'} = μ + std · z
a → 0 gives back the Euler ODE step (diffusers' ``FlowMatchEulerDiscreteScheduler.step``). g is infinite at σ = 1;
there the next grid point's σ stands in the denominator, as Flow-GRPO does. Computed in float32 or wider (the
mean's terms grow like 1/(1−σ) near σ = 1; bf16 overflows).
"""

from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of SD3's scheduler: σ' = s σ / (1 + (s−1) σ); s > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_add_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_σ = (1−σ) x_0 + σ ε (``sigma`` broadcast over the latent dims)."""
    return (1 - sigma) * x0 + sigma * noise


def flow_x0(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂_0 = x_σ − σ v̂: the clean latent the velocity points to."""
    return x - sigma * velocity


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sigma_cap: torch.Tensor | float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_σ, the step's std g_σ √(σ − σ')): ``sigma_cap`` replaces σ in 1 − σ where σ = 1."""
    denominator = 1 - torch.where(sigma >= 1, torch.as_tensor(sigma_cap, dtype=sigma.dtype), sigma)
    g = noise_level * (sigma / denominator).sqrt()
    return g, g * (sigma - sigma_next).sqrt()


def sde_mean(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             g: torch.Tensor) -> torch.Tensor:
    """μ of the reverse SDE's Euler–Maruyama step from σ to σ' (see the module docstring)."""
    x, velocity = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (x, velocity))
    d_sigma = sigma_next - sigma
    return x + (velocity + g**2 / (2 * sigma) * (x + (1 - sigma) * velocity)) * d_sigma
