"""policy.guidance (TailorPO-G): the reward-gradient step, its acceptance rule and the η schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from policy.guidance import guidance_eta, reward_gradient_step

F64 = torch.float64


def concave_reward(a: torch.Tensor):
    """r(x) = −‖x − a‖² per sample; ∇r = −2(x − a)."""
    return lambda x: -((x - a) ** 2).flatten(1).sum(1)


def setup(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, 3, 3, generator=g, dtype=F64), torch.randn(b, 2, 3, 3, generator=g, dtype=F64)


@pytest.mark.parametrize("delta", [0.5, 0.2])
def test_step_equals_closed_form(delta):
    x, a = setup()
    eta = 0.3
    out = reward_gradient_step(x, concave_reward(a), eta, delta=delta)
    expected = x + 2 * eta * delta * (-2 * (x - a))
    assert out.accepted.all()
    torch.testing.assert_close(out.x, expected, rtol=1e-6, atol=1e-12)
    before = -((x - a) ** 2).sum(dim=(1, 2, 3))
    after = -((expected - a) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.reward_before, before, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.reward_after, after, rtol=1e-6, atol=0)


def test_overshooting_steps_are_rejected_per_sample():
    """x⁺ − a = (1 − 4ηδ)(x − a): with δ = 0.5 the reward rises iff 0 < η < 1."""
    x, a = setup()
    eta = torch.tensor([0.1, 1.5, 0.6, 2.0], dtype=F64)
    out = reward_gradient_step(x, concave_reward(a), eta)
    assert out.accepted.tolist() == [True, False, True, False]
    for i in (1, 3):  # rejected: returned bitwise unchanged, reward unchanged
        assert torch.equal(out.x[i], x[i])
        assert out.reward_after[i] == out.reward_before[i]
    for i in (0, 2):
        expected = x[i] + 2 * eta[i] * 0.5 * (-2 * (x[i] - a[i]))
        torch.testing.assert_close(out.x[i], expected, rtol=1e-6, atol=1e-12)
    assert (out.reward_after >= out.reward_before).all()


def test_zero_eta_is_rejected_as_no_improvement():
    x, a = setup()
    out = reward_gradient_step(x, concave_reward(a), 0.0)
    assert not out.accepted.any() and torch.equal(out.x, x)


def test_grad_norm_clip_caps_the_per_sample_step():
    x, a = setup()
    x = x.clone()
    x[0] = a[0] + 1e-3  # tiny gradient on sample 0: left unclipped
    eta, delta, cap = 0.05, 0.5, 0.5
    out = reward_gradient_step(x, concave_reward(a), eta, delta=delta, max_grad_norm=cap)
    grad = -2 * (x - a)
    norms = grad.flatten(1).norm(dim=1)
    assert norms[0] < cap and (norms[1:] > cap).all()
    step = (out.x - x).flatten(1).norm(dim=1)
    assert out.accepted.all()
    assert step[0].item() == pytest.approx(2 * eta * delta * norms[0].item(), rel=1e-6)
    for i in range(1, 4):
        assert step[i].item() == pytest.approx(2 * eta * delta * cap, rel=1e-6)
    expected = x + 2 * eta * delta * grad * (cap / norms).clamp(max=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.x, expected, rtol=1e-6, atol=1e-12)


def test_no_grad_state_left_behind():
    torch.manual_seed(0)
    head = nn.Linear(8, 1).double()
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    out = reward_gradient_step(x, lambda z: head(z).squeeze(1), 0.1)
    assert x.grad is None and x.requires_grad
    assert head.weight.grad is None and head.bias.grad is None
    for t in out:
        assert not t.requires_grad
    torch.testing.assert_close(out.x, x.detach() + 0.1 * head.weight.detach().expand(3, 8), rtol=1e-6, atol=0)


def test_low_precision_latents_keep_their_dtype():
    x, a = setup()
    out = reward_gradient_step(x.to(torch.bfloat16), concave_reward(a.to(torch.bfloat16)), 0.2)
    assert out.x.dtype == torch.bfloat16 and out.accepted.all()


def test_low_precision_latents_step_in_float32_and_round_once():
    """bf16 latents: the gradient, its norm clip and x + 2ηδ∇r are computed in float32 and rounded to bf16 once at
    the end (a step computed in bf16, or a norm taken in bf16, rounds the small step away or rescales it)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    out = reward_gradient_step(x, lambda z: (w * z).sum(1), 0.01, delta=0.5, max_grad_norm=3.0)
    grad = w.float()
    scale = (3.0 / grad.norm(dim=1)).clamp(max=1).view(-1, 1)
    proposal = (x.float() + 2 * 0.5 * 0.01 * grad * scale).to(torch.bfloat16)
    assert bool((proposal != x).any())  # the step survives the rounding
    assert torch.equal(out.x, torch.where(out.accepted.view(-1, 1), proposal, x))


def test_bad_input_raises():
    x, a = setup()
    r = concave_reward(a)
    with pytest.raises(ValueError, match="delta must be > 0"):
        reward_gradient_step(x, r, 0.1, delta=0.0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        reward_gradient_step(x, r, 0.1, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="eta must be a float or a \\[4\\] tensor"):
        reward_gradient_step(x, r, torch.ones(3))
    with pytest.raises(ValueError, match="eta must be finite and >= 0"):
        reward_gradient_step(x, r, -0.1)
    with pytest.raises(ValueError, match="reward_fn must return shape"):
        reward_gradient_step(x, lambda z: r(z).sum(), 0.1)


def test_eta_schedule_endpoints_monotone_and_formula():
    n = 20
    etas = [guidance_eta(k, n) for k in range(n)]
    assert etas[0] == pytest.approx(0.1, abs=1e-15) and etas[-1] == pytest.approx(0.2, abs=1e-15)
    assert all(b > a for a, b in itertools.pairwise(etas))
    k = 7
    assert etas[k] == pytest.approx(0.1 + 0.1 * (1 - math.cos(math.pi * k / (n - 1))) / 2, rel=1e-12)
    assert etas[(n - 1) // 2] < 0.15 < etas[n // 2]  # the cosine's midpoint sits at mid-schedule
    assert guidance_eta(0, 1) == 0.1
    assert guidance_eta(4, 5, lo=0.3, hi=0.7) == pytest.approx(0.7)
    assert [guidance_eta(k, 2, lo=0.0, hi=2.0) for k in (0, 1)] == [0.0, 2.0]  # two steps: lo, then hi; lo may be 0


def test_eta_schedule_bad_input_raises():
    with pytest.raises(ValueError, match="step_index must be in"):
        guidance_eta(5, 5)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        guidance_eta(0, 0)
    with pytest.raises(ValueError, match="lo <= hi"):
        guidance_eta(0, 5, lo=0.3, hi=0.2)


def test_guidance_delivery_measures_the_move_against_the_sampling_noise_and_its_log_prob_cost():
    """float64 reference from the definitions: ‖x⁺ − x‖/(σ√D) per sample and log π(x) − log π(x⁺) under the step's
    Gaussian. A move of one noise draw, σ·z, reads ≈ 1; a move toward the mean costs negative log π (it gains)."""
    from actors.rollout import guidance_delivery
    from policy.schedule import gaussian_logprob

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 16, 16, generator=g)
    sigma = torch.tensor(0.3)
    x = mean + sigma * torch.randn(mean.shape, generator=g)
    moved = torch.stack([x[0] + sigma * torch.randn(x[0].shape, generator=g), mean[1], x[2]])
    logp, moved_logp = (gaussian_logprob(v, mean, sigma, "sum") for v in (x, moved))
    out = guidance_delivery(x, moved, sigma, logp, moved_logp)
    d = x[0].numel()
    for i in range(3):
        step = math.sqrt(sum(float(v) ** 2 for v in (moved[i].double() - x[i].double()).flatten()))
        want = step / (0.3 * math.sqrt(d))
        assert float(out[i, 0]) == pytest.approx(want, rel=1e-6)
    assert 0.9 < float(out[0, 0]) < 1.1  # one draw of the sampler's own noise
    assert float(out[1, 1]) < 0  # back to the mean: more likely
    assert float(out[0, 1]) > 0 and float(out[2, 0]) == float(out[2, 1]) == 0  # off it: less likely; unmoved: 0
    # the deficit is the difference of the Gaussian's log-densities, written out in float64
    var = 0.3**2
    log_density = [-0.5 * float(((v.double() - mean[0].double()) ** 2).sum()) / var for v in (x[0], moved[0])]
    assert float(out[0, 1]) == pytest.approx(log_density[0] - log_density[1], rel=1e-4)
