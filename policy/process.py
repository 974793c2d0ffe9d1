"""The noise process: how clean latents are noised, what the denoiser predicts, and the sampler's reverse kernel.

Everything that depends on the diffusion's parametrisation sits behind ``NoiseProcess`` (docs/math.md, "The noise
process"), so that the learner, the time weighting, the reference's divergence and the rollout work unchanged for
any process the policy holds: the forward noising, the training target, the Gaussian reverse kernel with its x̂_0,
the timestep grids and SNR(t). ``DDIMEpsilon`` (SD1.5-style ε-prediction sampled by DDIM) is the one implemented;
its formulas live in policy/schedule.py.

A timestep ``t`` is whatever the process's grids hold, one per sample: DDIM's integer training index, or a flow's
continuous σ ∈ [0, 1]. Records store it as float32; a process converts it back where it needs another type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor

from policy.schedule import (
    StepCoefficients,
    ddim_mean,
    forward_noise,
    predict_x0,
    signal_to_noise,
    step_coefficients,
)


class Kernel(NamedTuple):
    """The reverse kernel π(x_prev | x_t) = N(mean, sigma²) per element, and the x̂_0 its mean goes through."""

    mean: Tensor
    sigma: Tensor
    x0: Tensor


class NoiseProcess(ABC):
    """A diffusion's forward process, its model parametrisation and its sampler's stochastic reverse kernel.

    ``timesteps``: the sampler's, in generation order (one reverse step each); ``train_timesteps``: every t training
    may draw, in generation order (λ(t) is normalised over them). ``model_output`` below is the denoiser's
    (guided) prediction in the process's parametrisation, e.g. ε̂ or a velocity v̂.

    A rectified-flow SDE process (Flow-GRPO, arXiv 2505.05470) fits as: t = σ ∈ [0, 1]; ``add_noise``
    (1−t) x_0 + t ε; ``target`` the velocity ε − x_0; ``predict_x0`` x_t − t v̂; ``kernel`` one Euler–Maruyama
    step of the reverse SDE, μ = x_t + [v̂ + σ_t²/(2t) (x_t + (1−t) v̂)] Δt, σ = σ_t √|Δt| with
    σ_t = η √(t/(1−t)) (η its noise level a); ``snr`` ((1−t)/t)², finite on a training grid without t = 1;
    ``model_time`` 1000 t.
    """

    timesteps: Tensor
    train_timesteps: Tensor

    @abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """What the denoiser is conditioned on at ``t`` (same device)."""

    @abstractmethod
    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The sample of q(x_t | x_0) that ``noise`` (standard normal, shaped like ``x0``) gives."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model output regresses on at ``add_noise(x0, t, noise)`` (the denoising loss's target)."""

    @abstractmethod
    def predict_x0(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        """The clean-latent estimate x̂_0 the model output implies at (x_t, t)."""

    @abstractmethod
    def kernel(self, x_t: Tensor, t: Tensor, model_output: Tensor, eta: float) -> Kernel:
        """The sampler's Gaussian step from x_t at ``t`` to the next timestep; ``eta`` sets its noise (> 0)."""

    @abstractmethod
    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) of x_t = add_noise(x_0, t, ε) in float64: signal over noise variance per element."""


class DDIMEpsilon(NoiseProcess):
    """SD1.5-style variance-preserving process, ε-prediction, DDIM sampling with η > 0.

    t is the integer index into ``alphas_cumprod``; a reverse step goes from t to t − T//N, and below index 0
    ᾱ_prev is ``final_alpha_cumprod`` (diffusers' convention; by default ᾱ_0, i.e. ``set_alpha_to_one=False``,
    the one setting whose last step has σ > 0). Without ``timesteps`` the sampler visits every training timestep.
    """

    def __init__(self, alphas_cumprod: Tensor, timesteps: Tensor | None = None,
                 final_alpha_cumprod: float | None = None) -> None:
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        num_train = self.alphas_cumprod.numel()
        self.train_timesteps = torch.arange(num_train - 1, -1, -1)
        self.timesteps = self.train_timesteps if timesteps is None else self._sampler_grid(timesteps)
        self.final_alpha_cumprod = float(self.alphas_cumprod[0] if final_alpha_cumprod is None
                                         else final_alpha_cumprod)
        self.stride = num_train // len(self.timesteps)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> DDIMEpsilon:
        """The process of a diffusers ``DDIMScheduler`` (its ``set_timesteps(num_steps)`` gives the sampler grid)."""
        scheduler.set_timesteps(num_steps)
        return cls(scheduler.alphas_cumprod, scheduler.timesteps, float(scheduler.final_alpha_cumprod))

    def _sampler_grid(self, timesteps: Tensor) -> Tensor:
        grid = torch.as_tensor(timesteps).long().cpu()
        if grid.ndim != 1 or grid.numel() == 0:
            raise ValueError(f"sampler timesteps must be non-empty and 1-D, got {tuple(grid.shape)}")
        if grid.numel() > 1 and not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("sampler timesteps must be strictly decreasing (generation order)")
        num_train = self.alphas_cumprod.numel()
        if int(grid.min()) < 0 or int(grid.max()) >= num_train:
            raise ValueError(f"sampler timesteps must lie in [0, {num_train}), got {grid.tolist()}")
        return grid

    def _index(self, t: Tensor) -> Tensor:
        """[B] indices into ``alphas_cumprod`` (on the CPU, where it lives) of timesteps of any dtype."""
        index = torch.as_tensor(t).long().reshape(-1).cpu()
        num_train = self.alphas_cumprod.numel()
        if index.numel() and bool(((index < 0) | (index >= num_train)).any()):
            raise ValueError(f"timesteps must be in [0, {num_train}), got {int(index.min())}..{int(index.max())}")
        return index

    def _alpha(self, t: Tensor, like: Tensor) -> Tensor:
        """float32 ᾱ_t shaped to broadcast over ``like`` [B, ...], on its device."""
        return self.alphas_cumprod[self._index(t)].float().view(-1, *([1] * (like.ndim - 1))).to(like.device)

    def model_time(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).long()

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return forward_noise(x0, noise, self._alpha(t, x0))

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise

    def predict_x0(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        return predict_x0(x_t, model_output, self._alpha(t, x_t))

    def kernel(self, x_t: Tensor, t: Tensor, model_output: Tensor, eta: float) -> Kernel:
        """DDIM's step (coefficients gathered in float64, used in float32 on the latents' device)."""
        index = self._index(t)
        c = step_coefficients(self.alphas_cumprod, self.final_alpha_cumprod, index, index - self.stride, eta,
                              x_t.ndim)
        c = StepCoefficients(*(v.float().to(x_t.device) for v in (c.alpha_t, c.alpha_prev, c.sigma)))
        mean, x0 = ddim_mean(x_t, model_output, c)
        return Kernel(mean, c.sigma, x0)

    def snr(self, t: Tensor) -> Tensor:
        return signal_to_noise(self.alphas_cumprod[self._index(t)])
