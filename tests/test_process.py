"""policy.process: the DDIM ε-process against diffusers and float64 references written here from the formulas, the
rectified-flow SDE process against diffusers' flow scheduler and policy/flow.py, and the properties every noise
process must have (checked on both)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from learner.time_weighting import TimeWeightConfig, TimeWeighting, snr_lambda
from policy import DiffusionPolicy, SamplerConfig
from policy.components import FLUX_SCHEDULER, SD3_SCHEDULER
from policy.flow import flow_add_noise, sde_mean, sde_std
from policy.process import DDIMEpsilon, FlowMatchingSDE, NoiseProcess, process_for

T = 1000
F64 = torch.float64


def sd15_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         set_alpha_to_one=False, steps_offset=1, clip_sample=False)


def ddim(num_steps: int = 20) -> DDIMEpsilon:
    return DDIMEpsilon.from_scheduler(sd15_scheduler(), num_steps)


def sd3_flow(num_steps: int = 20) -> FlowMatchingSDE:
    """SD3.5-medium's scheduler (static shift 3) driven as StableDiffusion3Pipeline drives it."""
    return FlowMatchingSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), num_steps, 4096)


PROCESSES = [ddim(20), sd3_flow(20)]
PROCESS_IDS = ["ddim_epsilon", "flow_sde"]


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
@pytest.mark.parametrize("num_steps", [10, 20, 30, 50])  # 30 does not divide the 1000 training steps: stride 33
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


@pytest.mark.parametrize("proc", PROCESSES, ids=PROCESS_IDS)
def test_noising_at_larger_t_leaves_less_signal(proc: NoiseProcess):
    """Empirical SNR of add_noise's output: regress x_t on x_0 (signal) and measure the residual (noise), where
    the SNR is large enough to measure from 10⁶ elements (a flow's last training σ has SNR ~1e-7)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(256, 4, 32, 32, generator=g)
    t = proc.train_timesteps.flip(0)[torch.linspace(0, len(proc.train_timesteps) - 1, 8).long()]  # increasing
    t = t[proc.snr(t) > 1e-3]
    empirical = []
    for ti in t:
        x_t = proc.add_noise(x0, ti.expand(len(x0)), torch.randn(x0.shape, generator=g)).double()
        coef = (x_t * x0).sum() / x0.square().sum()
        empirical.append(float(coef**2 * x0.square().mean() / (x_t - coef * x0).square().mean()))
    assert all(a > b for a, b in itertools.pairwise(empirical))
    torch.testing.assert_close(torch.tensor(empirical, dtype=F64), proc.snr(t), rtol=0.1, atol=0)


@pytest.mark.parametrize("proc", PROCESSES, ids=PROCESS_IDS)
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


def test_ddim_final_alpha_comes_from_the_scheduler():
    """set_alpha_to_one=True gives a final ᾱ of 1 (no fallback to ᾱ_0); an explicit value is kept; none means ᾱ_0."""
    one = DDIMScheduler.from_config(sd15_scheduler().config, set_alpha_to_one=True)
    assert DDIMEpsilon.from_scheduler(one, 20).final_alpha_cumprod == 1.0
    ac = ddim().alphas_cumprod
    assert DDIMEpsilon(ac).final_alpha_cumprod == float(ac[0])
    assert DDIMEpsilon(ac, final_alpha_cumprod=0.25).final_alpha_cumprod == 0.25


def test_ddim_sampler_grid_bounds():
    """A grid may end at t = 0 (diffusers' steps_offset = 0) and reach T − 1; it must strictly decrease everywhere,
    not only against its first value."""
    ac = ddim().alphas_cumprod
    zero_offset = DDIMScheduler.from_config(sd15_scheduler().config, steps_offset=0)
    assert DDIMEpsilon.from_scheduler(zero_offset, 20).timesteps[-1] == 0
    assert DDIMEpsilon(ac, torch.tensor([999, 0])).timesteps.tolist() == [999, 0]
    for bad in ([500, 500, 1], [900, 500, 700]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            DDIMEpsilon(ac, torch.tensor(bad))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        DDIMEpsilon(ac, torch.tensor([1000, 1]))


def test_ddim_kernel_broadcasts_over_latents_of_any_rank():
    """The kernel's coefficients take the latents' rank: a [B, D] batch gives what the same numbers as [B, D, 1, 1]
    give (a rank-4 shape for every input would broadcast [B, D] into [B, 1, B, D])."""
    proc = ddim()
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t = proc.timesteps[[0, 9, 19]]
    flat, square = proc.kernel(x, t, eps, 1.0), proc.kernel(x.view(3, 5, 1, 1), t, eps.view(3, 5, 1, 1), 1.0)
    assert flat.mean.shape == flat.x0.shape == (3, 5)
    torch.testing.assert_close(flat.mean, square.mean.view(3, 5), rtol=0, atol=0)


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


# ---------------------------------------------------------------- the rectified-flow SDE process


def test_flow_grids_are_the_schedulers_static_shift():
    """SD3: the sampler's σ are set_timesteps(N)'s (with its terminal 0), the model time is its timesteps bitwise,
    and training draws from the scheduler's 1000 shifted σ without σ = 1."""
    for n in (1, 10, 40):
        proc, sched = sd3_flow(n), FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
        train = sched.sigmas.clone()
        sched.set_timesteps(n)
        assert torch.equal(proc.sigmas, sched.sigmas.double()) and float(proc.sigmas[-1]) == 0
        assert torch.equal(proc.timesteps, sched.sigmas[:-1]) and proc.timesteps.dtype == torch.float32
        assert torch.equal(proc.model_time(proc.timesteps), sched.timesteps)
        assert float(proc.timesteps[0]) == 1.0 and torch.equal(proc.train_timesteps, train[1:])
        assert proc.sigma_cap == float(sched.sigmas[1])  # Flow-GRPO's stand-in for σ = 1 in 1 − σ


def test_flow_grids_follow_a_dynamic_shift():
    """FLUX.1-dev's scheduler shifts by the image size: FluxPipeline's grid linspace(1, 1/N, N) under
    μ = calculate_shift(image tokens), and the training σ shifted by the same μ (more noise for larger images)."""
    n, seq = 10, 1024  # 512 px: 64 × 64 latents in 2 × 2 patches
    sigmas = np.linspace(1.0, 1 / n, n)
    proc = FlowMatchingSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), n, seq, sigmas)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    train = sched.time_shift(mu, 1.0, sched.sigmas)
    sched.set_timesteps(n, sigmas=sigmas, mu=mu)
    assert torch.equal(proc.sigmas, sched.sigmas.double())
    assert torch.equal(proc.train_timesteps, train[1:].float())
    bigger = FlowMatchingSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), n, 4096, sigmas)
    assert bool((bigger.timesteps[1:] > proc.timesteps[1:]).all())


def test_dynamic_shift_reads_every_shift_setting_from_the_config():
    """μ is linear in the image tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)
    (FLUX's formula, written out here): a config whose max_shift is not diffusers' default must shift by its own."""
    config = {**FLUX_SCHEDULER, "base_shift": 0.25, "max_shift": 2.0, "base_image_seq_len": 128,
              "max_image_seq_len": 2048}
    n, seq = 10, 1024
    sigmas = np.linspace(1.0, 1 / n, n)
    mu = 0.25 + (2.0 - 0.25) * (seq - 128) / (2048 - 128)
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(n, sigmas=sigmas, mu=mu)
    proc = FlowMatchingSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(**config), n, seq, sigmas)
    torch.testing.assert_close(proc.sigmas, sched.sigmas.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("a", [0.7, 1.2])
def test_flow_kernel_is_the_sde_step_between_neighbouring_grid_points(a):
    """Every step k of the grid: μ and σ are policy/flow.py's SDE step from σ_k to σ_{k+1} with the cap σ_1, and
    x̂_0 = x − σ v̂; float32 timesteps as records hold them find their grid point."""
    proc = sd3_flow(10)
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(10, 16, 4, 4, generator=g), torch.randn(10, 16, 4, 4, generator=g)
    mean, std, x0 = proc.kernel(x, proc.timesteps, v, a)
    for k in range(10):
        s, sn = proc.sigmas[k], proc.sigmas[k + 1]
        gk, want_std = sde_std(s, sn, a, sigma_cap=proc.sigmas[1])
        want_mean = sde_mean(x[k].double(), v[k].double(), s, sn, gk)
        torch.testing.assert_close(mean[k].double(), want_mean, rtol=1e-5, atol=1e-5)
        assert float(std[k]) == pytest.approx(float(want_std), rel=1e-6)
        torch.testing.assert_close(x0[k], x[k] - float(s) * v[k])
    stored = torch.tensor([float(t) for t in proc.timesteps], dtype=torch.float32)
    assert all(torch.equal(a_, b_) for a_, b_ in zip(proc.kernel(x, stored, v, a), (mean, std, x0), strict=True))


def test_every_flow_step_has_a_finite_positive_std_and_no_noise_is_diffusers_euler():
    """The σ = 1 step (capped) and the last step to σ = 0 (std g √σ_{N−1}) both have 0 < std < ∞, so each step has
    a log-prob; with a → 0 the kernel's mean is FlowMatchEulerDiscreteScheduler.step (the ODE)."""
    for proc in (sd3_flow(10), sd3_flow(40)):
        _, std, _ = proc.kernel(torch.zeros(len(proc.timesteps), 1), proc.timesteps, torch.zeros(len(proc.timesteps),
                                1), 0.7)
        assert bool(torch.isfinite(std).all()) and bool((std > 0).all())
        s = proc.sigmas[-2]
        assert float(std[-1]) == pytest.approx(float(0.7 * (s / (1 - s)).sqrt() * s.sqrt()), rel=1e-6)
    sched = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    sched.set_timesteps(10)
    proc = sd3_flow(10)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 4, 4, generator=g)
    for t, t_model in zip(proc.timesteps, sched.timesteps, strict=True):
        v = torch.randn(x.shape, generator=g)
        euler = sched.step(v, t_model, x).prev_sample
        torch.testing.assert_close(proc.kernel(x, t.expand(2), v, 1e-9).mean, euler, rtol=1e-5, atol=1e-5)
        x = euler


def test_flow_noising_target_and_snr():
    """add_noise is the scheduler's scale_noise, the target the velocity ε − x_0, SNR ((1−σ)/σ)² in float64."""
    proc, sched = sd3_flow(10), FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    t = proc.train_timesteps[[0, 100, 500, 998]]
    torch.testing.assert_close(proc.add_noise(x0, t, noise), sched.scale_noise(x0, proc.model_time(t), noise))
    assert torch.equal(proc.add_noise(x0, t, noise), flow_add_noise(x0, t.view(-1, 1, 1, 1), noise))
    assert torch.equal(proc.target(x0, noise, t), noise - x0)
    snr = proc.snr(t)
    assert snr.dtype == F64
    torch.testing.assert_close(snr, ((1 - t.double()) / t.double()) ** 2, rtol=1e-15, atol=0)
    assert float(proc.snr(torch.tensor([1.0]))) == 0.0
    assert torch.equal(proc.add_noise(x0[:1], torch.tensor([0.0]), noise[:1]), x0[:1])  # σ = 0: the clean latent


def test_flow_lambda_is_finite_and_grows_with_sigma():
    """λ(t) = 1 + norm(1/√SNR) = 1 + norm(σ/(1−σ)): normalised over the training σ (without 1); the sampler's
    σ = 1 has SNR 0 and takes λ's top, 2. With shift 3 the training grid's last σ (1/√SNR ≈ 3000) sets the scale,
    so λ stays within 1 % of 1 below σ = 0.96: timestep-aware training barely reweighs a flow model's steps."""
    proc = sd3_flow(10)
    for grid in (proc.timesteps, proc.train_timesteps):
        lam = snr_lambda(proc, grid)
        assert bool(torch.isfinite(lam).all()) and bool(((lam >= 1) & (lam <= 2)).all())
        assert bool((lam[1:] <= lam[:-1]).all())  # generation order: σ falls, so does λ
    assert float(snr_lambda(proc, proc.timesteps[:1])) == 2.0
    lam_train = snr_lambda(proc, proc.train_timesteps)
    assert float(lam_train.max()) == 2.0 and float(lam_train.min()) == 1.0
    assert float(snr_lambda(proc, torch.tensor([0.96]))) < 1.01
    assert float(snr_lambda(proc, torch.tensor([1e-5]))) == 1.0  # below the training σ: λ of that end, not below 1
    tw = TimeWeighting(TimeWeightConfig(mode="timestep_aware"), proc)
    assert torch.equal(tw.weigh(torch.arange(10))[0], snr_lambda(proc, proc.timesteps))


def test_flow_timesteps_off_the_grid_are_refused():
    proc = sd3_flow(10)
    with pytest.raises(ValueError, match="points of the sampler grid") as info:  # one stray t in a batch is enough
        proc.kernel(torch.zeros(2, 4), torch.tensor([float(proc.timesteps[0]), 0.5]), torch.zeros(2, 4), 0.7)
    assert str(info.value).endswith("got [0.5]")  # names the stray t, not the good one
    with pytest.raises(ValueError, match="points of the sampler grid") as info:
        proc.kernel(torch.zeros(5, 4), torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125]), torch.zeros(5, 4), 0.7)
    assert str(info.value).endswith("got [0.5, 0.25, 0.125, 0.0625]")  # the first four
    with pytest.raises(ValueError, match=r"σ in \[0, 1\]"):
        proc.add_noise(torch.zeros(1, 4), torch.tensor([1.5]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="terminal 0"):
        FlowMatchingSDE(torch.tensor([1.0, 0.5]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="1-D"):
        FlowMatchingSDE(torch.tensor([[1.0, 0.0], [0.5, 0.0]]), torch.tensor([0.5]))
    for bad in ([0.5, 0.8, 0.0], [1.5, 0.5, 0.0], [1.0, 0.5, 0.5, 0.0], [1.0, 0.3, 0.6, 0.0], [1.0, -0.5, 0.0]):
        with pytest.raises(ValueError, match="decrease from at most 1"):
            FlowMatchingSDE(torch.tensor(bad), torch.tensor([0.5]))
    with pytest.raises(TypeError, match=r"^no noise process for object; supported: DDIMScheduler, "
                                        r"FlowMatchEulerDiscreteScheduler$"):
        process_for(object(), 10, 16)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_policy_picks_the_flow_process_from_the_scheduler(kind, request):
    """A FlowMatchEulerDiscreteScheduler in the model directory gives the flow process, on the grid its pipeline
    uses for the sampler's resolution; the kernel's noise is sampler.noise_level, not eta."""
    root = request.getfixturevalue(f"tiny_{kind}_dir")
    pol = DiffusionPolicy.from_pretrained(root, sampler=SamplerConfig(num_steps=8, resolution=64, noise_level=0.5,
                                                                      eta=0.1))
    assert isinstance(pol.process, FlowMatchingSDE) and pol.noise == 0.5
    assert pol.latent_shape == (16, 16, 16)  # 64 px through the tiny VAE's factor 4
    sched = FlowMatchEulerDiscreteScheduler.from_config(pol.c.scheduler.config)
    if kind == "flux":
        sched.set_timesteps(8, sigmas=np.linspace(1.0, 1 / 8, 8), mu=calculate_shift(64, 256, 4096, 0.5, 1.15))
    else:
        sched.set_timesteps(8)
    assert torch.equal(pol.timesteps, sched.sigmas[:-1])
