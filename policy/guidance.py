"""TailorPO-G: one reward-gradient step on the winner child, kept only where it raises the reward.

Paper (TailorPO, Sec. 3.4, Eq. 13–14, Alg. 1 lines 6–9; docs/math.md §6): x⁺ = x − η_t ∇_x (r_high − r(x))²
with r_high = r(x) + δ held constant, i.e. x⁺ = x + 2 η_t δ ∇_x r(x) (η ∇r at δ = 0.5); accepted per sample
only if r(x⁺) > r(x). x⁺ then replaces x^w in the loss and in the rollout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


def guidance_eta(step_index: int, num_steps: int, lo: float = 0.1, hi: float = 0.2) -> float:
    """η for generation step k (k = 0 first, largest t): lo + (hi − lo)(1 − cos(π k/(N−1)))/2.

    The paper says only "a cosine scheduler in the range [0.1, 0.2], higher for smaller t"; this exact
    half-cosine from lo at the first step to hi at the last is our choice. With N = 1 it returns lo.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= step_index < num_steps:
        raise ValueError(f"step_index must be in [0, {num_steps}), got {step_index}")
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= lo <= hi, got lo={lo}, hi={hi}")
    frac = step_index / (num_steps - 1) if num_steps > 1 else 0.0
    return lo + (hi - lo) * (1 - math.cos(math.pi * frac)) / 2


class GuidanceResult(NamedTuple):
    """Detached outputs: the new latents, which samples took the step, and the rewards before and after.
    ``reward_after`` is the reward of the returned latents: it equals ``reward_before`` where rejected."""

    x: Tensor
    accepted: Tensor
    reward_before: Tensor
    reward_after: Tensor


def _per_sample_eta(value: float | Tensor, like: Tensor) -> Tensor:
    """η as a [B, 1, ...] tensor that broadcasts over ``like``'s sample dims."""
    batch = like.shape[0]
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"eta must be a float or a [{batch}] tensor, got shape {tuple(v.shape)}")
    if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
        raise ValueError("eta must be finite and >= 0")
    return v.view((batch,) + (1,) * (like.ndim - 1))


def reward_gradient_step(
    x: Tensor,
    reward_fn: Callable[[Tensor], Tensor],
    eta: float | Tensor,
    *,
    delta: float = 0.5,
    max_grad_norm: float | None = None,
) -> GuidanceResult:
    """x⁺ = x + 2 η δ ∇_x r(x) per sample, accepted only where r(x⁺) > r(x) (TailorPO Eq. 14, Alg. 1 l. 8).

    ``reward_fn`` maps latents [B, ...] to rewards [B] differentiably and per sample (the caller composes
    x → x̂_0 → decode → reward). ``max_grad_norm`` rescales each sample's gradient to at most that L2 norm:
    raw reward gradients through a VAE decoder and x̂_0 = (x − √(1−ᾱ) ε̂)/√ᾱ blow up at high noise (1/√ᾱ is
    ~13 at t = 981 for SD1.5), and one huge step is then always rejected. Non-finite proposals are rejected
    too (the comparison is False). Only x's gradient is taken (``torch.autograd.grad``): nothing accumulates
    in parameters' ``.grad`` and the input ``x`` is never modified.
    """
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    batch = x.shape[0]
    x_in = x.detach()
    x_wide = x_in.to(torch.promote_types(x.dtype, torch.float32))  # the step is computed in fp32 or wider
    step_size = _per_sample_eta(eta, x_wide)
    with torch.enable_grad():
        x_var = x_in.clone().requires_grad_(True)
        reward = reward_fn(x_var)
        if reward.shape != (batch,):
            raise ValueError(f"reward_fn must return shape ({batch},), got {tuple(reward.shape)}")
        (grad,) = torch.autograd.grad(reward.sum(), x_var)
    grad = grad.to(step_size.dtype)
    if max_grad_norm is not None:
        norms = grad.flatten(1).norm(dim=1)
        scale = (max_grad_norm / norms.clamp(min=torch.finfo(norms.dtype).tiny)).clamp(max=1)
        grad = grad * scale.view_as(step_size)
    proposal = (x_wide + 2 * delta * step_size * grad).to(x.dtype)
    reward_before = reward.detach()
    with torch.no_grad():
        reward_proposal = reward_fn(proposal)
    accepted = reward_proposal > reward_before
    keep = accepted.view_as(step_size)
    return GuidanceResult(
        torch.where(keep, proposal, x_in),
        accepted,
        reward_before,
        torch.where(accepted, reward_proposal, reward_before),
    )
