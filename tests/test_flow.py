"""The rectified-flow SDE step (policy/flow.py) against a float64 transcription of Flow-GRPO's equations,
diffusers' Euler scheduler in the a → 0 limit, and its reason to exist: on data whose exact velocity is known, it
keeps the forward process's marginal at every step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from policy.flow import flow_add_noise, flow_x0, sde_mean, sde_std, shift_sigmas

F64 = torch.float64


def _paper_step(x, v, sigma, sigma_next, a, sigma_cap):
    """Flow-GRPO (arXiv 2505.05470) Eq. 9 as printed, expanded in x and v: std σ_t = a √(σ/(1−σ)), mean
    x (1 + σ_t² dt / (2σ)) + v (1 + σ_t² (1−σ) / (2σ)) dt, step std σ_t √(−dt); plain floats."""
    denominator = 1 - (sigma_cap if sigma == 1 else sigma)
    std_t = a * math.sqrt(sigma / denominator)
    dt = sigma_next - sigma
    mean = x * (1 + std_t**2 * dt / (2 * sigma)) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt)


@pytest.mark.parametrize(("sigma", "sigma_next"), [(1.0, 0.96), (0.9, 0.8), (0.5, 0.45), (0.1, 0.0)])
@pytest.mark.parametrize("a", [0.0, 0.7, 1.3])
def test_step_matches_the_papers_equation_in_float64(sigma, sigma_next, a):
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64)
    s, sn = torch.tensor(sigma, dtype=F64), torch.tensor(sigma_next, dtype=F64)
    g, std = sde_std(s, sn, a, sigma_cap=0.96)
    mean = sde_mean(x, v, s, sn, g)
    for i in range(3):
        for j in range(4):
            want_mean, want_std = _paper_step(float(x[i, j]), float(v[i, j]), sigma, sigma_next, a, 0.96)
            assert float(mean[i, j]) == pytest.approx(want_mean, rel=1e-12, abs=1e-12)
            assert float(std) == pytest.approx(want_std, rel=1e-12, abs=1e-15)


def test_no_noise_is_diffusers_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float32)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=gen, dtype=torch.float32)
        s, sn = sched.sigmas[i].double(), sched.sigmas[i + 1].double()
        euler = sched.step(v, t, x).prev_sample
        for a in (0.0, 1e-4):  # the limit, and close to it
            g, std = sde_std(s, sn, a, sigma_cap=sched.sigmas[1].double())
            assert torch.allclose(sde_mean(x, v, s, sn, g).float(), euler, atol=1e-4 if a else 1e-6)
            assert float(std) <= a * 20
        x = euler


def test_shift_and_forward_process_match_the_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    assert torch.allclose(shift_sigmas(unshifted, 3.0), sched.sigmas.double(), atol=1e-6)
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 8, generator=gen, dtype=F64), torch.randn(4, 8, generator=gen, dtype=F64)
    sigma = torch.tensor(0.3, dtype=F64)
    xs = flow_add_noise(x0, sigma, noise)
    assert torch.allclose(xs, sched.scale_noise(x0.float(), torch.tensor([300.0]), noise.float()).double(),
                          atol=1e-5)
    assert torch.allclose(flow_x0(xs, noise - x0, sigma), x0)  # the true velocity points to the true x_0


def _gaussian_velocity(x, sigma, mu0, s0):
    """E[ε − x_0 | x_σ = x] for x_0 ~ N(mu0, s0²), ε ~ N(0, 1) (jointly Gaussian, so linear in x)."""
    var = (1 - sigma) ** 2 * s0**2 + sigma**2
    centred = x - (1 - sigma) * mu0
    return sigma / var * centred - (mu0 + (1 - sigma) * s0**2 / var * centred)


def test_sde_keeps_the_forward_marginals_of_a_gaussian_with_its_exact_velocity():
    """x_0 ~ N(0.8, 0.5²): x_σ ~ N((1−σ)·0.8, (1−σ)²·0.25 + σ²). Sampled with the exact velocity, 10⁵ chains from
    σ = 0.98 (away from the σ = 1 singularity, where the substituted cap is an approximation) in 400 shifted
    steps keep that mean and variance at every checked step within 4 Monte-Carlo standard errors, plus the
    Euler–Maruyama bias of the variance (0.9 % at 400 steps, 0.2 % at 2000: the exact moment recursion of this
    linear case, docs/math.md)."""
    mu0, s0, a, n, steps = 0.8, 0.5, 0.7, 100_000, 400
    sigmas = torch.cat([shift_sigmas(torch.linspace(0.98, 1e-3, steps, dtype=F64), 3.0), torch.zeros(1, dtype=F64)])
    gen = torch.Generator().manual_seed(3)
    var0 = (1 - sigmas[0]) ** 2 * s0**2 + sigmas[0] ** 2
    x = (1 - sigmas[0]) * mu0 + var0.sqrt() * torch.randn(n, generator=gen, dtype=F64)
    for k in range(steps):
        s, sn = sigmas[k], sigmas[k + 1]
        g, std = sde_std(s, sn, a, sigma_cap=sigmas[1])
        x = sde_mean(x, _gaussian_velocity(x, s, mu0, s0), s, sn, g) + std * torch.randn(n, generator=gen, dtype=F64)
        if k % 40 == 39:
            want_mean, want_var = (1 - sn) * mu0, (1 - sn) ** 2 * s0**2 + sn**2
            assert abs(float(x.mean() - want_mean)) <= 4 * math.sqrt(float(want_var) / n)
            assert abs(float(x.var() / want_var) - 1) <= 4 * math.sqrt(2 / n) + 0.01
