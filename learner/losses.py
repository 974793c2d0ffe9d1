"""Preference losses on per-step log-ratios or ε-MSEs: all are a (weighted) Bradley–Terry loss −log σ(logit).

Each loss builds a per-pair logit whose sign says whether the model currently prefers the winner, then hands
it to one shared helper that applies −log σ per pair and the weighted mean OUTSIDE the log-sigmoid (the
diffusers #6702 bug took the mean inside the log-sigmoid).

Two optional per-pair weightings, used by ``learner.time_weighting``:
  * ``beta_scale`` s_i multiplies β INSIDE the log-sigmoid (Rethinking-DPO Eq. 6 puts λ(t) there);
  * ``weights`` w_i weigh pairs OUTSIDE: loss = mean_i w_i L_i (None = all ones). The weights are fixed
    importance weights (γ^k normalised over the whole step grid), NOT renormalised over the batch: Σ w_i L_i / Σ w_i
    would cancel them for a batch of one and bias the expectation for any finite batch.

Inputs are upcast to float32 at least (bf16 cannot resolve a log-ratio of two nearby Gaussians). Sources and
conventions: docs/math.md §3-5.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLoss(NamedTuple):
    """Scalar loss and the detached implicit-reward margin per pair (accuracy = (margin > 0).mean())."""

    loss: Tensor
    margin: Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_same_shape(ndim: int, **tensors: Tensor) -> torch.Size:
    names = list(tensors)
    shape = tensors[names[0]].shape
    for name, t in tensors.items():
        if t.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dim(s), got shape {tuple(t.shape)}")
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like {names[0]}")
    return shape


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_nonneg_weights(name: str, w: Tensor, shape: torch.Size, dim: int | None = None) -> None:
    """Weights must match ``shape``, be finite and >= 0 with a positive sum (over ``dim``, or all)."""
    if w.shape != shape:
        raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    total = w.sum() if dim is None else w.sum(dim)
    if bool((total <= 0).any()):
        raise ValueError(f"{name} must have a positive sum")


def _effective_beta(beta: float, beta_scale: Tensor | None, n: int, dtype: torch.dtype) -> Tensor | float:
    """β·s_i, with s validated as a positive [N] tensor (a negative scale would flip the preference)."""
    _check_positive("beta", beta)
    if beta_scale is None:
        return beta
    if beta_scale.shape != (n,):
        raise ValueError(f"beta_scale has shape {tuple(beta_scale.shape)}, expected ({n},)")
    if not bool(torch.isfinite(beta_scale).all()) or bool((beta_scale <= 0).any()):
        raise ValueError("beta_scale must be finite and > 0")
    return beta * beta_scale.to(dtype)


def _bradley_terry(logit: Tensor, weights: Tensor | None) -> PairLoss:
    """mean_i w_i · −log σ(logit_i) (weights outside the log-sigmoid); margin = logit (detached)."""
    per_pair = -F.logsigmoid(logit)
    if weights is not None:
        _check_nonneg_weights("weights", weights, logit.shape)
        per_pair = weights.to(per_pair.dtype) * per_pair
    return PairLoss(per_pair.mean(), logit.detach())


def dpo_logprob_loss(
    logratio_w: Tensor,
    logratio_l: Tensor,
    beta: float,
    *,
    ratio_clip: float | None = None,
    beta_scale: Tensor | None = None,
    weights: Tensor | None = None,
) -> PairLoss:
    """DPO on one denoising step's log π_θ − log π_ref: L_i = −log σ(β s_i (lr_w,i − lr_l,i)).

    TailorPO Eq. 10 (winner and loser are two children of the SAME x_t) and D3PO (matching steps of two
    trajectories). ``ratio_clip`` = ε is the D3PO/SPO hard two-sided clamp of the ratio to [1−ε, 1+ε]
    (yk7333/d3po ``scripts/rm/train_d3po.py``), i.e. of the log-ratio to [log(1−ε), log(1+ε)], whose gradient
    is zero outside the band; it is not a PPO-style min.
    """
    _check_same_shape(1, logratio_w=logratio_w, logratio_l=logratio_l)
    dtype = _compute_dtype(logratio_w, logratio_l)
    lw, ll = logratio_w.to(dtype), logratio_l.to(dtype)
    if ratio_clip is not None:
        if not 0 < ratio_clip < 1:
            raise ValueError(f"ratio_clip must be in (0, 1) or None, got {ratio_clip}")
        lo, hi = math.log1p(-ratio_clip), math.log1p(ratio_clip)
        lw, ll = lw.clamp(lo, hi), ll.clamp(lo, hi)
    b = _effective_beta(beta, beta_scale, lw.shape[0], dtype)
    return _bradley_terry(b * (lw - ll), weights)


def diffusion_dpo_loss(
    mse_w: Tensor,
    mse_ref_w: Tensor,
    mse_l: Tensor,
    mse_ref_l: Tensor,
    beta: float,
    *,
    beta_scale: Tensor | None = None,
    weights: Tensor | None = None,
) -> PairLoss:
    """Diffusion-DPO ε-MSE surrogate (Wallace et al. 2024, Eq. 14; Rethinking-DPO Eq. 6):

    logit_i = −0.5 β s_i [(mse_w − mse_ref_w) − (mse_l − mse_ref_l)], L = weighted mean of −log σ(logit_i).
    The mse_* are per-sample mean squared ε errors, computed by the caller with the same t and ε for winner
    and loser. The reference MSEs are detached: π_ref is a constant of the objective, so a reference that was
    evaluated with autograd on (e.g. the policy with adapters disabled) cannot leak a gradient.
    """
    _check_same_shape(1, mse_w=mse_w, mse_ref_w=mse_ref_w, mse_l=mse_l, mse_ref_l=mse_ref_l)
    dtype = _compute_dtype(mse_w, mse_ref_w, mse_l, mse_ref_l)
    diff_w = mse_w.to(dtype) - mse_ref_w.detach().to(dtype)
    diff_l = mse_l.to(dtype) - mse_ref_l.detach().to(dtype)
    b = _effective_beta(beta, beta_scale, mse_w.shape[0], dtype)
    return _bradley_terry(-0.5 * b * (diff_w - diff_l), weights)


def dense_dpo_loss(
    logratio_w: Tensor,
    logratio_l: Tensor,
    *,
    scale_c: float,
    kappa: float | None,
    step_weights: Tensor | None = None,
) -> PairLoss:
    """Dense-reward DPO (Yang, Chen, Zhou ICML-24) on [B, M] log π_θ − log π_init.

    l = C · mean_m w_m clamp(logratio, −κ, κ) over the M sampled step indices (the same indices for winner and
    loser), L = mean_B −log σ(l_w − l_l). The public code (Shentao-YANG/Dense_Reward_T2I,
    ``preference_based_policy_learner.py``) draws k ~ Cat(γ^k) and averages, w = 1: importance sampling of
    the step index. ``step_weights`` w ([M] or [B, M]) is the explicit-weights form: k drawn uniformly and
    w_k = γ^k/Z · (grid size), FIXED, so that E[l] is the same C · Σ_k (γ^k/Z) clamp_k in both forms
    (renormalising w over the M drawn steps would cancel the discount at M = 1). The clamp is hard (as in the
    code, although its comment says "soft").
    """
    _check_same_shape(2, logratio_w=logratio_w, logratio_l=logratio_l)
    _check_positive("scale_c", scale_c)
    dtype = _compute_dtype(logratio_w, logratio_l)
    lw, ll = logratio_w.to(dtype), logratio_l.to(dtype)
    if kappa is not None:
        _check_positive("kappa", kappa)
        lw, ll = lw.clamp(-kappa, kappa), ll.clamp(-kappa, kappa)
    if step_weights is not None:
        shape = torch.Size((lw.shape[1],)) if step_weights.ndim == 1 else lw.shape
        _check_nonneg_weights("step_weights", step_weights, shape, dim=-1)
        w = step_weights.to(dtype)
        lw, ll = w * lw, w * ll
    return _bradley_terry(scale_c * (lw.mean(1) - ll.mean(1)), None)


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (Shao et al. 2024, DeepSeekMath §4.1.2; Flow-GRPO Eq. 4): each sample's reward standardised
    within its prompt's group, (r − mean) / (std + ε) over the last dim of ``rewards`` [N, G] (population std, as
    Flow-GRPO's per-prompt stat tracker). Two samples a group give ±1: only which one is better counts."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, samples >= 2], got shape {tuple(rewards.shape)}")
    r = rewards.double()
    return (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)


def ppo_clip_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """DDPO's clipped surrogate (Black et al. 2024, Eq. 4 with PPO's clip; kvablack/ddpo-pytorch ``train.py``):
    ρ = exp(log π_θ − log π_old) per trained transition, loss = mean over transitions of
    −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A). ``logp``/``logp_old`` [N, M]: M transitions of N samples; ``advantages``
    [N]. Once ρ has moved past 1 ± ε in A's direction the term's gradient is 0: the update stays near the sampler."""
    _check_same_shape(2, logp=logp, logp_old=logp_old)
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({logp.shape[0]},)")
    if not 0 < clip_range < 1:
        raise ValueError(f"clip_range must be in (0, 1), got {clip_range}")
    dtype = _compute_dtype(logp, logp_old, advantages)
    ratio = torch.exp(logp.to(dtype) - logp_old.detach().to(dtype))
    a = advantages.detach().to(dtype)[:, None]
    return -torch.minimum(ratio * a, ratio.clamp(1 - clip_range, 1 + clip_range) * a).mean()
