"""Which denoising steps to train on and how to weigh them: uniform, discounted, timestep-aware.

Conventions: k counts generation order, k = 0 is the FIRST denoising step (from x_T, largest t). A "grid" is
a 1-D tensor of timesteps in generation order, both kinds given by the policy's noise process (policy/process.py):
the sampler's inference grid (SD1.5 with 50 DDIM steps: 981, 961, …, 1; a flow model's σ from 1 down) or every
training timestep (DDIM's T−1, …, 0, i.e. k = T−1−t; a flow's 999 training σ below 1).

* ``discount`` (Dense-reward DPO, Yang, Chen, Zhou ICML-24; code Shentao-YANG/Dense_Reward_T2I
  ``train_t2i.py``/``preference_based_policy_learner.py``): the public code draws k ~ Cat(γ^k) — importance
  sampling of the step index (``discount_as="sample"``); ``"weight"`` draws k uniformly and weighs it by the
  FIXED weight G·γ^k/Σ_j γ^j (G = grid size; mean 1 over the grid), so that E_uniform[w_k f(k)] =
  E_Cat(γ^k)[f(k)] for any per-step term f: same expectation, more variance, works at fixed steps. The losses
  use these weights as they are (``learner.losses``); renormalising them over a batch would undo the discount.
* ``timestep_aware`` (Rethinking-DPO, Kang et al. AAAI-26, Eq. 6 and "timestep-aware optimization"): t drawn
  from Cat(γ^k) and β scaled by
  λ(t) = 1 + norm(1/√SNR(t)) inside the log-sigmoid. The paper does not say over which set Cat(γ^t) runs:
  ``grid="inference"`` (default, the Dense-Reward reading) or ``grid="train"`` (the literal reading, which
  puts > 99% of the mass on t ≥ 950 for SD1.5).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from policy.process import DDIMEpsilon, NoiseProcess

Mode = Literal["uniform", "discount", "timestep_aware"]
DiscountAs = Literal["sample", "weight"]
Grid = Literal["inference", "train"]
LambdaNorm = Literal["minmax", "max"]


def _check_gamma(gamma: float) -> None:
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")


def discount_probs(num: int, gamma: float) -> Tensor:
    """p_k = γ^k / Σ_j γ^j for k = 0..num−1 (float64); γ = 1 is uniform."""
    _check_gamma(gamma)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    w = torch.full((num,), float(gamma), dtype=torch.float64).pow(torch.arange(num, dtype=torch.float64))
    return w / w.sum()


def _as_process(process: NoiseProcess | Tensor, inference_timesteps: Tensor | None = None) -> NoiseProcess:
    """The noise process; an ᾱ schedule (``alphas_cumprod``) is shorthand for the DDIM process on it."""
    return process if isinstance(process, NoiseProcess) else DDIMEpsilon(process, inference_timesteps)


def snr_lambda(process: NoiseProcess | Tensor, timesteps: Tensor, norm: LambdaNorm = "minmax") -> Tensor:
    """Rethinking-DPO λ(t) = 1 + norm(1/√SNR(t)) with the process's SNR, in [1, 2] and growing with t (float64).

    The paper leaves "norm" open; ``"minmax"`` maps (v − min)/(max − min) and ``"max"`` maps v/max, with min
    and max over ALL training timesteps (they differ by ≤ 0.002 for SD1.5's schedule, SNR = ᾱ/(1−ᾱ)). A t beyond
    the training grid's range takes λ of its end: a flow sampler's first σ = 1 (SNR 0, v infinite, not a training
    σ) gets λ = 2. For a flow model λ ≈ 1 below σ ≈ 0.96 (docs/math.md, "Flow matching").
    """
    if norm not in get_args(LambdaNorm):
        raise ValueError(f"norm must be one of {get_args(LambdaNorm)}, got {norm!r}")
    process = _as_process(process)
    inv_sqrt_snr = (1 / process.snr(process.train_timesteps)).sqrt()
    lo, hi = inv_sqrt_snr.min(), inv_sqrt_snr.max()
    v = (1 / process.snr(timesteps)).sqrt().clamp(lo, hi)
    return 1 + ((v - lo) / (hi - lo) if norm == "minmax" else v / hi)


class TimeWeightConfig(BaseModel):
    """``mode``, γ, how the discount acts (``discount_as``), the grid Cat(γ^k) runs over, and λ's norm."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Mode = Field("uniform", description="uniform | discount (dense-reward DPO) | timestep_aware (Rethinking)")
    gamma: float = Field(0.9, gt=0, le=1, description="discount γ of Cat(γ^k)")
    discount_as: DiscountAs = Field("sample", description="draw k ~ Cat(γ^k), or draw uniformly and weigh by γ^k")
    grid: Grid = Field("inference", description="the set Cat(γ^k) runs over: the sampler's steps or all T")
    lambda_norm: LambdaNorm = Field("minmax", description="how λ(t) = 1 + norm(1/√SNR(t)) normalises")


class StepSample(NamedTuple):
    """Chosen steps: ``index`` in the grid, its training ``timestep``, the in-sigmoid ``beta_scale``, the
    outside ``weight`` (feed both to the losses of ``learner.losses``)."""

    index: Tensor
    timestep: Tensor
    beta_scale: Tensor
    weight: Tensor


class TimeWeighting:
    """Draws training steps (``sample``) or weighs steps chosen elsewhere (``weigh``) by a TimeWeightConfig.

    With ``mode="timestep_aware"``, ``discount_as`` chooses how γ^k acts exactly as in ``"discount"`` (the
    default ``"sample"`` is the paper's Cat(γ^k) draw); λ(t) is applied on top.
    """

    def __init__(self, cfg: TimeWeightConfig, process: NoiseProcess | Tensor,
                 inference_timesteps: Tensor | None = None) -> None:
        """``process``: the policy's noise process (its grids and SNR), or an ᾱ schedule with the sampler's
        ``inference_timesteps``, shorthand for the DDIM process they define."""
        self.cfg = cfg
        process = _as_process(process, inference_timesteps)
        self.grid = grid = process.train_timesteps if cfg.grid == "train" else process.timesteps
        self.probs = discount_probs(grid.numel(), cfg.gamma)
        self._discount_weight = self.probs * grid.numel()  # γ^k normalised to mean 1 over the grid
        self._lambda = snr_lambda(process, grid, cfg.lambda_norm)

    def sample(self, n: int, generator: torch.Generator | None = None) -> StepSample:
        """Draw ``n`` steps (with replacement) according to the config."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        ones = torch.ones(n, dtype=torch.float64)
        discounted = self.cfg.mode != "uniform"
        if discounted and self.cfg.discount_as == "sample":
            index = torch.multinomial(self.probs, n, replacement=True, generator=generator)
            weight = ones
        else:
            index = torch.randint(0, self.grid.numel(), (n,), generator=generator)
            weight = self._discount_weight[index] if discounted else ones
        beta_scale = self._lambda[index] if self.cfg.mode == "timestep_aware" else ones
        return StepSample(index, self.grid[index], beta_scale, weight)

    def mean_beta_scale(self) -> float:
        """E[beta_scale] of a step ``sample`` draws: λ's mean under the draw in timestep-aware mode, else 1. A
        uniform arm with β times this isolates λ's skew from the larger β it gives on average."""
        if self.cfg.mode != "timestep_aware":
            return 1.0
        probs = self.probs if self.cfg.discount_as == "sample" else torch.full_like(self.probs, 1 / len(self.probs))
        return float((probs * self._lambda).sum())

    def weigh(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(beta_scale, weight) for grid positions chosen elsewhere (TailorPO trains at fixed steps):
        uniform → (1, 1); discount → (1, γ^k normalised to mean 1); timestep_aware → (λ(t), 1)."""
        index = torch.as_tensor(index).long().cpu()
        if bool(((index < 0) | (index >= self.grid.numel())).any()):
            raise ValueError(f"index must be grid positions in [0, {self.grid.numel()}), got {index}")
        ones = torch.ones(index.shape, dtype=torch.float64)
        if self.cfg.mode == "discount":
            return ones, self._discount_weight[index]
        if self.cfg.mode == "timestep_aware":
            return self._lambda[index], ones
        return ones, ones
