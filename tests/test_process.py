"""policy.process: the DDIM ε-process against diffusers and float64 references written here from the formulas,
and the properties every noise process must have (checked on the one implemented)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from learner.time_weighting import TimeWeightConfig, TimeWeighting, snr_lambda
from policy import DiffusionPolicy, SamplerConfig
from policy.process import DDIMEpsilon, NoiseProcess

T = 1000
F64 = torch.float64


def sd15_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         set_alpha_to_one=False, steps_offset=1, clip_sample=False)


def ddim(num_steps: int = 20) -> DDIMEpsilon:
    return DDIMEpsilon.from_scheduler(sd15_scheduler(), num_steps)


def reference_kernel(abar: np.ndarray, final: float, t: int, t_prev: int, eta: float, x: np.ndarray,
                     eps: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Float64 (μ, σ, x̂_0) of the DDIM step (docs/math.md §1), one sample: what the policy computed before."""
    a_t = abar[t]
    a_p = abar[t_prev] if t_prev >= 0 else final
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    var = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    return np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - var) * eps, float(np.sqrt(var)), x0


def test_add_noise_equals_diffusers():
    sched, proc = sd15_scheduler(), ddim()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 981, 999])
    want = sched.add_noise(x0, noise, t)
    assert torch.equal(proc.add_noise(x0, t, noise), want)
    assert torch.equal(proc.add_noise(x0, t.float(), noise), want)  # t as the records hold it


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("num_steps", [10, 20, 50])
def test_kernel_matches_the_float64_ddim_formula(eta, num_steps):
    proc = ddim(num_steps)
    abar = proc.alphas_cumprod.numpy()
    rng = np.random.default_rng(num_steps)
    t = torch.as_tensor(rng.choice(proc.timesteps.numpy(), size=6))
    x, eps = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((6, 4, 3, 3))
    mean, sigma, x0 = proc.kernel(torch.tensor(x, dtype=torch.float32), t, torch.tensor(eps, dtype=torch.float32),
                                  eta)
    for i, ti in enumerate(t.tolist()):
        r_mean, r_sigma, r_x0 = reference_kernel(abar, proc.final_alpha_cumprod, ti, ti - T // num_steps, eta, x[i],
                                                 eps[i])
        np.testing.assert_allclose(mean[i].double().numpy(), r_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(sigma[i]), r_sigma, rtol=1e-5)
        np.testing.assert_allclose(x0[i].double().numpy(), r_x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proc.predict_x0(torch.tensor(x, dtype=torch.float32), t,
                                               torch.tensor(eps, dtype=torch.float32)), x0, rtol=0, atol=0)


def test_kernel_equals_diffusers_ddim_step():
    sched = sd15_scheduler()
    proc = DDIMEpsilon.from_scheduler(sched, 20)
    g = torch.Generator().manual_seed(1)
    for t in proc.timesteps[[0, 7, 19]]:
        x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        mean, sigma, _ = proc.kernel(x, t.expand(2), eps, 1.0)
        want = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(mean + sigma * z, want, rtol=1e-5, atol=1e-5)


def test_float32_timesteps_give_what_integer_ones_give():
    """Records store t as float32; the DDIM process reads it back as the integer index."""
    proc = ddim(20)
    g = torch.Generator().manual_seed(2)
    x0, noise, out = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = proc.timesteps[[0, 10, 19]]
    tf = t.float()
    assert torch.equal(proc.add_noise(x0, tf, noise), proc.add_noise(x0, t, noise))
    for a, b in zip(proc.kernel(x0, tf, out, 1.0), proc.kernel(x0, t, out, 1.0), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(proc.snr(tf), proc.snr(t))
    assert proc.model_time(tf).dtype == torch.long and torch.equal(proc.model_time(tf), t)


def test_snr_and_lambda():
    proc = ddim(50)
    abar = proc.alphas_cumprod
    torch.testing.assert_close(proc.snr(torch.arange(T)), abar / (1 - abar), rtol=1e-15, atol=0)
    assert proc.snr(torch.arange(T)).dtype == F64
    # λ(t) as before the process existed: 1 + minmax(√((1−ᾱ)/ᾱ)) over all T; float32 (what the losses use) exact
    v = ((1 - abar) / abar).sqrt()
    before = 1 + (v - v.min()) / (v.max() - v.min())
    lam = snr_lambda(proc, torch.arange(T))
    torch.testing.assert_close(lam, before, rtol=1e-15, atol=0)
    assert torch.equal(lam.float(), before.float())
    tw = TimeWeighting(TimeWeightConfig(mode="timestep_aware"), proc)
    shorthand = TimeWeighting(TimeWeightConfig(mode="timestep_aware"), abar, proc.timesteps)
    assert torch.equal(tw.grid, proc.timesteps) and torch.equal(tw.grid, shorthand.grid)
    assert torch.equal(tw.weigh(torch.arange(50))[0].float(), before[proc.timesteps].float())


@pytest.mark.parametrize("proc", [ddim(20)], ids=["ddim_epsilon"])
def test_noising_at_larger_t_leaves_less_signal(proc: NoiseProcess):
    """Empirical SNR of add_noise's output: regress x_t on x_0 (signal) and measure the residual (noise)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(256, 4, 32, 32, generator=g)
    t = proc.train_timesteps.flip(0)[torch.linspace(0, len(proc.train_timesteps) - 1, 8).long()]  # increasing
    empirical = []
    for ti in t:
        x_t = proc.add_noise(x0, ti.expand(len(x0)), torch.randn(x0.shape, generator=g)).double()
        coef = (x_t * x0).sum() / x0.square().sum()
        empirical.append(float(coef**2 * x0.square().mean() / (x_t - coef * x0).square().mean()))
    assert all(a > b for a, b in itertools.pairwise(empirical))
    torch.testing.assert_close(torch.tensor(empirical, dtype=F64), proc.snr(t), rtol=0.1, atol=0)


@pytest.mark.parametrize("proc", [ddim(20)], ids=["ddim_epsilon"])
def test_the_target_is_what_recovers_x0(proc: NoiseProcess):
    """A model that outputs the training target exactly denoises exactly: x̂_0 from it is x_0, at every kernel."""
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = proc.timesteps[[0, 5, 10, 19]]
    x_t = proc.add_noise(x0, t, noise)
    target = proc.target(x0, noise, t)
    torch.testing.assert_close(proc.predict_x0(x_t, t, target), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(proc.kernel(x_t, t, target, 1.0).x0, x0, rtol=1e-4, atol=1e-4)


def test_policy_owns_the_schedulers_process(tiny_model_dir):
    pol = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=8))
    sched = pol.c.scheduler
    assert isinstance(pol.process, DDIMEpsilon)
    assert torch.equal(pol.timesteps, sched.timesteps.long()) and pol.timesteps is pol.process.timesteps
    assert torch.equal(pol.process.alphas_cumprod, sched.alphas_cumprod.double())
    assert pol.process.stride == T // 8 and pol.process.final_alpha_cumprod == float(sched.final_alpha_cumprod)


def test_bad_timesteps_raise():
    proc = ddim(10)
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 1000\), got -1\.\.5"):
        proc.snr(torch.tensor([-1, 5]))
    with pytest.raises(ValueError, match="timesteps must be in"):
        proc.add_noise(torch.zeros(1, 4), torch.tensor([1000]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="strictly decreasing"):
        DDIMEpsilon(proc.alphas_cumprod, torch.tensor([1, 501]))
    with pytest.raises(ValueError, match="non-empty and 1-D"):
        DDIMEpsilon(proc.alphas_cumprod, torch.tensor([], dtype=torch.long))
