"""The DDIM step, its variance and log-prob against float64 references written here from the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from policy.schedule import (
    ddim_mean,
    gaussian_logprob,
    logprob_ratio,
    predict_x0,
    step_coefficients,
)

T = 1000
BETAS = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), T) ** 2  # SD-1.5 "scaled_linear"
ABAR = np.cumprod(1.0 - BETAS)
FINAL = ABAR[0]  # set_alpha_to_one=False


def reference_step(x, eps, t, t_prev, eta, x_prev):
    """Float64 numpy transcription of the math conventions of docs/math.md §1, one sample at a time."""
    a_t = ABAR[t]
    a_p = ABAR[t_prev] if t_prev >= 0 else FINAL
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    var = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    mean = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - var) * eps
    logp_dims = -((x_prev - mean) ** 2) / (2 * var) - 0.5 * np.log(2 * np.pi * var)
    return x0, mean, np.sqrt(var), logp_dims


def _case(rng, b, num_steps, dtype):
    stride = T // num_steps
    grid = np.arange(num_steps)[::-1] * stride + 1
    t = rng.choice(grid, size=b)
    shape = (b, 4, 3, 3)
    x, eps, noise = (rng.standard_normal(shape) for _ in range(3))
    return t, t - stride, x, eps, noise, shape


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("num_steps", [10, 20, 50])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_step_mean_sigma_logprob_match_reference(eta, num_steps, dtype, rtol):
    rng = np.random.default_rng(num_steps * 10 + int(eta * 10))
    t, tp, x, eps, noise, _ = _case(rng, 6, num_steps, dtype)
    c = step_coefficients(torch.tensor(ABAR), FINAL, torch.tensor(t), torch.tensor(tp), eta)
    xt, et = torch.tensor(x, dtype=dtype), torch.tensor(eps, dtype=dtype)
    mean, x0 = ddim_mean(xt, et, c)
    x_prev = mean + c.sigma * torch.tensor(noise, dtype=dtype)
    for i in range(len(t)):
        rx0, rmean, rsig, rlp = reference_step(x[i], eps[i], t[i], tp[i], eta, x_prev[i].double().numpy())
        np.testing.assert_allclose(x0[i].double().numpy(), rx0, rtol=rtol, atol=rtol * 1e-2)
        np.testing.assert_allclose(mean[i].double().numpy(), rmean, rtol=rtol, atol=rtol * 1e-2)
        np.testing.assert_allclose(float(c.sigma[i]), rsig, rtol=rtol)
        for reduce, ref in (("mean", rlp.mean()), ("sum", rlp.sum())):
            got = gaussian_logprob(x_prev[i : i + 1], mean[i : i + 1], c.sigma[i : i + 1], reduce)
            np.testing.assert_allclose(float(got), ref, rtol=rtol)


def test_last_step_uses_final_alpha_cumprod():
    c = step_coefficients(torch.tensor(ABAR), FINAL, torch.tensor([1]), torch.tensor([-49]), 1.0)
    assert float(c.alpha_prev) == pytest.approx(FINAL, rel=1e-12)
    a_t = ABAR[1]
    assert float(c.sigma) == pytest.approx(np.sqrt((1 - FINAL) / (1 - a_t) * (1 - a_t / FINAL)), rel=1e-10)


def test_prev_timestep_zero_gathers_alpha_zero_and_only_negative_ones_the_final_value():
    """diffusers' DDIM takes ᾱ[prev] for prev >= 0 (a grid with steps_offset = 0 ends its next-to-last step at
    t = 0) and the final ᾱ only below 0, kept in the schedule's float64."""
    final = 0.3  # not a float32 value: a final ᾱ rounded through float32 would differ
    c = step_coefficients(torch.tensor(ABAR), final, torch.tensor([50, 0]), torch.tensor([0, -50]), 1.0)
    assert c.alpha_prev.flatten().tolist() == [ABAR[0], final]


def test_half_precision_schedules_gather_in_float32():
    """A schedule held in float16 (a pipeline loaded in half precision) is widened before σ_t = √(var) is formed:
    the coefficients come out float32, as float32 arithmetic on its values gives them."""
    half = torch.tensor(ABAR).half()
    t, tp = torch.tensor([501, 1]), torch.tensor([451, -49])
    c = step_coefficients(half, float(half[0]), t, tp, 1.0)
    want = step_coefficients(half.float(), float(half[0]), t, tp, 1.0)
    assert c.sigma.dtype == torch.float32
    assert all(torch.equal(getattr(c, k), getattr(want, k)) for k in ("alpha_t", "alpha_prev", "sigma"))


def test_predict_x0_inverts_forward_noising():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 4, 4)), rng.standard_normal((2, 4, 4, 4))
    a = ABAR[[100, 800]].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    got = predict_x0(torch.tensor(x_t), torch.tensor(eps), torch.tensor(a))
    np.testing.assert_allclose(got.numpy(), x0, rtol=1e-9, atol=1e-9)


def test_logprob_ratio_is_difference_of_logprobs_and_resolves_float32():
    rng = np.random.default_rng(1)
    x, m_a = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8, 8))
    m_b = m_a + 1e-4 * rng.standard_normal(m_a.shape)  # two nearly equal policies, as in DPO
    sigma = np.array([0.3, 0.05]).reshape(-1, 1, 1, 1)
    ref = (((x - m_b) ** 2 - (x - m_a) ** 2) / (2 * sigma**2)).reshape(2, -1)
    for reduce, r in (("mean", ref.mean(1)), ("sum", ref.sum(1))):
        f32 = logprob_ratio(*(torch.tensor(v, dtype=torch.float32) for v in (x, m_a, m_b, sigma)), reduce)
        np.testing.assert_allclose(f32.double().numpy(), r, rtol=1e-3)
        f64 = [gaussian_logprob(*(torch.tensor(v) for v in (x, m, sigma)), reduce) for m in (m_a, m_b)]
        np.testing.assert_allclose((f64[0] - f64[1]).numpy(), r, rtol=1e-6)


def test_matches_diffusers_ddim_step():
    """Our step equals diffusers' DDIMScheduler.step given the same variance noise."""
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 7, 19]]:
        x, eps, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        expected = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        c = step_coefficients(sched.alphas_cumprod.double(), sched.final_alpha_cumprod, t, t - 50, 1.0)
        mean, _ = ddim_mean(x, eps, c)
        torch.testing.assert_close(mean + c.sigma * z, expected, rtol=1e-5, atol=1e-6)


def test_eta_zero_has_no_logprob():
    c = step_coefficients(torch.tensor(ABAR), FINAL, torch.tensor([501]), torch.tensor([451]), 0.0)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta") as info:
        gaussian_logprob(x, x, c.sigma, "mean")
    message = str(info.value)  # names both causes of σ = 0, from its first word to its last
    assert message.startswith("log-probability needs sigma > 0: DDIM with eta=0 is deterministic")
    assert message.endswith("(and a scheduler with set_alpha_to_one=False, whose last step keeps sigma > 0)")
    with pytest.raises(ValueError, match="eta"):
        logprob_ratio(x, x, x, c.sigma, "mean")


def test_set_alpha_to_one_names_the_real_cause():
    """ᾱ_prev = 1 at the last step (set_alpha_to_one=True) gives σ = 0 for any η > 0: the error must say so
    instead of blaming η = 0. Interior steps of the same schedule stay valid."""
    t, prev = torch.tensor([51, 1]), torch.tensor([1, -49])
    with pytest.raises(ValueError, match="set_alpha_to_one=False") as info:
        step_coefficients(torch.tensor(ABAR), 1.0, t, prev, 1.0)
    assert "eta = 1.0" in str(info.value) and "[1]" in str(info.value)
    message = str(info.value)
    assert "lands on alpha_cumprod = 1 (a scheduler with set_alpha_to_one=True makes the last DDIM step" in message
    assert message.endswith("load the scheduler with set_alpha_to_one=False")
    c = step_coefficients(torch.tensor(ABAR), 1.0, t[:1], prev[:1], 1.0)
    assert float(c.sigma) > 0
    deterministic = step_coefficients(torch.tensor(ABAR), 1.0, t, prev, 0.0)  # η = 0 (plain DDIM) may land on ᾱ = 1
    assert deterministic.sigma.flatten().tolist() == [0.0, 0.0]


def test_bad_reduce_and_negative_eta():
    with pytest.raises(ValueError, match="logprob_reduce"):
        gaussian_logprob(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 1), "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta"):
        step_coefficients(torch.tensor(ABAR), FINAL, torch.tensor([1]), torch.tensor([0]), -1.0)
