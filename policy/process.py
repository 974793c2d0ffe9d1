"""The noise process: how clean latents are noised, what the denoiser predicts, and the sampler's reverse kernel.

Everything that depends on the diffusion's parametrisation sits behind ``NoiseProcess`` (docs/math.md, "The noise
process"), so that the learner, the time weighting, the reference's divergence and the rollout work unchanged for
any process the policy holds: the forward noising, the training target, the Gaussian reverse kernel with its x̂_0,
the timestep grids and SNR(t). ``DDIMEpsilon``: SD1.5-style ε-prediction sampled by DDIM (formulas in
policy/schedule.py). ``FlowMatchingSDE``: rectified flow with velocity prediction (SD3, FLUX) sampled by Flow-GRPO's
SDE (formulas in policy/flow.py). ``process_for`` picks one from the model directory's scheduler class.

A timestep ``t`` is whatever the process's grids hold, one per sample: DDIM's integer training index, or a flow's
continuous σ ∈ [0, 1]. Records store it as float32; a process converts it back where it needs another type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from policy.flow import flow_add_noise, flow_x0, sde_mean, sde_std
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
    (guided) prediction in the process's parametrisation, e.g. ε̂ or a velocity v̂. ``noise_setting`` names the
    sampler setting (``SamplerConfig``) that holds the noise scale ``kernel`` takes.
    """

    timesteps: Tensor
    train_timesteps: Tensor
    noise_setting: ClassVar[str]

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
    def kernel(self, x_t: Tensor, t: Tensor, model_output: Tensor, noise: float) -> Kernel:
        """The sampler's Gaussian step from x_t at ``t`` to the next timestep; ``noise`` (> 0) scales its std."""

    @abstractmethod
    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) of x_t = add_noise(x_0, t, ε) in float64: signal over noise variance per element."""


class DDIMEpsilon(NoiseProcess):
    """SD1.5-style variance-preserving process, ε-prediction, DDIM sampling with η > 0.

    t is the integer index into ``alphas_cumprod``; a reverse step goes from t to t − T//N, and below index 0
    ᾱ_prev is ``final_alpha_cumprod`` (diffusers' convention; by default ᾱ_0, i.e. ``set_alpha_to_one=False``,
    the one setting whose last step has σ > 0). Without ``timesteps`` the sampler visits every training timestep.
    The kernel's noise is DDIM's η (``sampler.eta``).
    """

    noise_setting = "eta"

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

    def kernel(self, x_t: Tensor, t: Tensor, model_output: Tensor, noise: float) -> Kernel:
        """DDIM's step with η = ``noise`` (coefficients gathered in float64, used in float32 on the latents' device)."""
        index = self._index(t)
        c = step_coefficients(self.alphas_cumprod, self.final_alpha_cumprod, index, index - self.stride, noise,
                              x_t.ndim)
        c = StepCoefficients(*(v.float().to(x_t.device) for v in (c.alpha_t, c.alpha_prev, c.sigma)))
        mean, x0 = ddim_mean(x_t, model_output, c)
        return Kernel(mean, c.sigma, x0)

    def snr(self, t: Tensor) -> Tensor:
        return signal_to_noise(self.alphas_cumprod[self._index(t)])


MODEL_TIME_SCALE = 1000  # diffusers' SD3/FLUX timestep: σ times the scheduler's num_train_timesteps (1000)


class FlowMatchingSDE(NoiseProcess):
    """Rectified flow with velocity prediction (SD3, FLUX), sampled by Flow-GRPO's SDE (policy/flow.py).

    t = σ ∈ [0, 1]: x_σ = (1−σ) x_0 + σ ε, target v = ε − x_0, x̂_0 = x_σ − σ v̂, SNR = ((1−σ)/σ)². ``sigmas`` is
    the sampler's grid as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` gives it: N values from σ = 1 down,
    then its terminal 0; step k goes from sigmas[k] to sigmas[k+1], one Euler–Maruyama step of the SDE with noise
    level a (``sampler.noise_level``), where g's 1 − σ at σ = 1 is replaced by 1 − sigmas[1] (Flow-GRPO's cap). The
    last step ends at σ = 0 with std g·√σ_{N−1} > 0, so every step has a log-prob. ``train_sigmas`` are every σ
    training may draw: the scheduler's 1000 training σ, shifted as the sampler's grid is; σ = 1 is dropped (SNR = 0:
    x_σ holds no signal, and λ(t)'s 1/√SNR would be infinite). Sampler σ are kept as float32 values, so a t stored
    in a float32 record finds its grid point exactly.
    """

    noise_setting = "noise_level"

    def __init__(self, sigmas: Tensor, train_sigmas: Tensor) -> None:
        grid = torch.as_tensor(sigmas).detach().float().cpu()
        if grid.ndim != 1 or grid.numel() < 2 or float(grid[-1]) != 0:
            raise ValueError(f"flow sigmas must be 1-D, at least two, and end with the terminal 0, got {grid.tolist()}")
        if float(grid[0]) > 1 or not bool((grid[1:] < grid[:-1]).all()):  # so every σ before the 0 is positive
            raise ValueError(f"flow sigmas must decrease from at most 1, got {grid.tolist()}")
        self.sigmas = grid.double()
        self.timesteps = grid[:-1]
        train = torch.as_tensor(train_sigmas).detach().float().cpu()
        self.train_timesteps = train[train < 1]
        self.sigma_cap = float(grid[1])

    @classmethod
    def from_scheduler(cls, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, image_seq_len: int,
                       sigmas: np.ndarray | None = None) -> FlowMatchingSDE:
        """The process of a ``FlowMatchEulerDiscreteScheduler`` driven as the diffusers pipelines drive it:
        ``set_timesteps(num_steps, sigmas=sigmas, mu=μ)``, with μ = ``calculate_shift(image_seq_len)`` from the
        config where it asks for resolution-dependent shifting (FLUX.1-dev: ``use_dynamic_shifting``), else its
        static ``shift``. The scheduler given is left untouched (a fresh one from its config is used)."""
        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        cfg, mu = sched.config, None
        if cfg.use_dynamic_shifting:
            mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                                 cfg.max_shift)
        train = sched.sigmas if mu is None else sched.time_shift(mu, 1.0, sched.sigmas)  # static shift: built in
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        return cls(sched.sigmas, train)

    def _index(self, t: Tensor) -> Tensor:
        """[B] positions in the sampler grid of timesteps that lie on it (exactly, as float32)."""
        t = torch.as_tensor(t).detach().float().reshape(-1).cpu()
        hit = t[:, None] == self.timesteps[None, :]
        found = hit.any(1)
        if not bool(found.all()):
            raise ValueError(f"flow timesteps must be points of the sampler grid {self.timesteps.tolist()}, got "
                             f"{t[~found].tolist()[:4]}")
        return hit.float().argmax(1)

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """float32 σ shaped to broadcast over ``like`` [B, ...], on its device."""
        sigma = torch.as_tensor(t).detach().float().reshape(-1)
        if bool(((sigma < 0) | (sigma > 1)).any()):
            raise ValueError(f"flow timesteps are σ in [0, 1], got {sigma.min().item()}..{sigma.max().item()}")
        return sigma.view(-1, *([1] * (like.ndim - 1))).to(like.device)

    def model_time(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).float() * MODEL_TIME_SCALE

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return flow_add_noise(x0, self._sigma(t, x0), noise)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def predict_x0(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        return flow_x0(x_t, model_output, self._sigma(t, x_t))

    def kernel(self, x_t: Tensor, t: Tensor, model_output: Tensor, noise: float) -> Kernel:
        """The SDE step with noise level a = ``noise`` (g and the std in float64, used in float32)."""
        index = self._index(t)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        g, std = sde_std(sigma, sigma_next, noise, self.sigma_cap)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        sigma, sigma_next, g, std = (v.float().view(shape).to(x_t.device) for v in (sigma, sigma_next, g, std))
        mean = sde_mean(x_t, model_output, sigma, sigma_next, g)
        return Kernel(mean, std, flow_x0(x_t.float(), model_output.float(), sigma))

    def snr(self, t: Tensor) -> Tensor:
        sigma = torch.as_tensor(t).detach().double().reshape(-1).cpu()
        return ((1 - sigma) / sigma).square()


def process_for(scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler, num_steps: int, image_seq_len: int,
                sigmas: np.ndarray | None = None) -> NoiseProcess:
    """The noise process of a model directory's scheduler with the sampler's ``num_steps``: DDIMScheduler →
    DDIMEpsilon, FlowMatchEulerDiscreteScheduler → FlowMatchingSDE (``image_seq_len`` and ``sigmas`` serve the
    flow's grid: see ``FlowMatchingSDE.from_scheduler``)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchingSDE.from_scheduler(scheduler, num_steps, image_seq_len, sigmas)
    if isinstance(scheduler, DDIMScheduler):
        return DDIMEpsilon.from_scheduler(scheduler, num_steps)
    raise TypeError(f"no noise process for {type(scheduler).__name__}; supported: DDIMScheduler, "
                    "FlowMatchEulerDiscreteScheduler")
