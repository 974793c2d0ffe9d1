"""learner.losses against float64 closed forms written here from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import (
    PairLoss,
    dense_dpo_loss,
    diffusion_dpo_loss,
    dpo_logprob_loss,
    group_advantages,
    ppo_clip_loss,
)

F64 = torch.float64


def neg_log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """−log σ(z) = log(1 + e^{−z}), written out (not torch.nn.functional.logsigmoid)."""
    return torch.log(1 + torch.exp(-z))


def rand(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def positive(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=F64) + 0.5


# ---------------------------------------------------------------- dpo_logprob_loss


def test_dpo_logprob_matches_closed_form_with_scale_and_weights():
    n, beta = 16, 0.7
    lw, ll, s, w = rand(n, seed=1), rand(n, seed=2), positive(n, 3), positive(n, 4)
    out = dpo_logprob_loss(lw, ll, beta, beta_scale=s, weights=w)
    assert isinstance(out, PairLoss)
    z = [beta * s[i].item() * (lw[i].item() - ll[i].item()) for i in range(n)]
    per = [math.log1p(math.exp(-zi)) for zi in z]
    expected = sum(w[i].item() * per[i] for i in range(n)) / n  # fixed weights: mean_i w_i L_i
    assert out.loss.dtype == F64 and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.margin, torch.tensor(z, dtype=F64), rtol=1e-6, atol=0)
    assert not out.margin.requires_grad


def test_dpo_logprob_gradient_matches_closed_form():
    n, beta = 8, 2.0
    lw, ll = rand(n, seed=5).requires_grad_(), rand(n, seed=6).requires_grad_()
    dpo_logprob_loss(lw, ll, beta).loss.backward()
    sig = 1 / (1 + torch.exp(-beta * (lw.detach() - ll.detach())))
    expected = -beta * (1 - sig) / n  # d/dz of −log σ(z) is −(1 − σ(z))
    torch.testing.assert_close(lw.grad, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(ll.grad, -expected, rtol=1e-6, atol=0)


def test_dpo_ratio_clip_matches_clamped_ratio():
    n, beta, eps = 32, 5.0, 0.1
    lw, ll = rand(n, scale=0.2, seed=7), rand(n, scale=0.2, seed=8)  # spans the band [log .9, log 1.1]
    out = dpo_logprob_loss(lw, ll, beta, ratio_clip=eps)
    rw = torch.exp(lw).clamp(1 - eps, 1 + eps)  # D3PO: clamp the RATIO, then take its log
    rl = torch.exp(ll).clamp(1 - eps, 1 + eps)
    z = beta * (torch.log(rw) - torch.log(rl))
    torch.testing.assert_close(out.loss, neg_log_sigmoid(z).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.margin, z, rtol=1e-6, atol=0)


def test_dpo_ratio_clip_zeroes_gradient_outside_band_only():
    eps = 0.1
    lw = torch.tensor([-0.5, -0.05, 0.0, 0.05, 0.5], dtype=F64, requires_grad=True)
    ll = torch.zeros(5, dtype=F64)
    dpo_logprob_loss(lw, ll, 1.0, ratio_clip=eps).loss.backward()
    inside = (lw.detach() > math.log(1 - eps)) & (lw.detach() < math.log(1 + eps))
    assert inside.tolist() == [False, True, True, True, False]
    assert (lw.grad[~inside] == 0).all()
    assert (lw.grad[inside] != 0).all()


def test_weights_none_equals_ones_and_beta_scale_ones_equals_none():
    n = 10
    lw, ll = rand(n, seed=9), rand(n, seed=10)
    base = dpo_logprob_loss(lw, ll, 0.5).loss
    ones = torch.ones(n, dtype=F64)
    torch.testing.assert_close(dpo_logprob_loss(lw, ll, 0.5, weights=ones).loss, base, rtol=1e-12, atol=0)
    torch.testing.assert_close(dpo_logprob_loss(lw, ll, 0.5, beta_scale=ones).loss, base, rtol=1e-12, atol=0)
    mw, mrw, ml, mrl = (rand(n, seed=s).abs() for s in (11, 12, 13, 14))
    d_base = diffusion_dpo_loss(mw, mrw, ml, mrl, 50.0)
    d_ones = diffusion_dpo_loss(mw, mrw, ml, mrl, 50.0, beta_scale=ones, weights=ones)
    torch.testing.assert_close(d_ones.loss, d_base.loss, rtol=1e-12, atol=0)


def test_low_precision_inputs_are_upcast():
    lw = torch.full((4,), 1e-3, dtype=torch.bfloat16)
    ll = torch.zeros(4, dtype=torch.bfloat16)
    out = dpo_logprob_loss(lw, ll, 100.0)
    assert out.loss.dtype == torch.float32 and out.margin.dtype == torch.float32
    z = 100.0 * float(lw[0])
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-6)


# ---------------------------------------------------------------- diffusion_dpo_loss


def test_diffusion_dpo_matches_closed_form():
    n, beta = 12, 500.0
    mw, mrw, ml, mrl = (rand(n, scale=0.01, seed=s).abs() + 0.1 for s in (20, 21, 22, 23))
    s, w = positive(n, 24), positive(n, 25)
    out = diffusion_dpo_loss(mw, mrw, ml, mrl, beta, beta_scale=s, weights=w)
    inside = -0.5 * beta * s * ((mw - mrw) - (ml - mrl))
    expected = (w * neg_log_sigmoid(inside)).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.margin, inside, rtol=1e-6, atol=0)


def test_diffusion_dpo_mean_is_outside_the_logsigmoid():
    """diffusers #6702 took logsigmoid(inside.mean()); by Jensen that differs on spread-out inputs."""
    n, beta = 16, 1000.0
    mw, mrw, ml, mrl = (rand(n, scale=0.01, seed=s).abs() for s in (30, 31, 32, 33))
    out = diffusion_dpo_loss(mw, mrw, ml, mrl, beta)
    inside = -0.5 * beta * ((mw - mrw) - (ml - mrl))
    assert inside.std() > 1  # the inputs really are spread out
    buggy = neg_log_sigmoid(inside.mean())
    torch.testing.assert_close(out.loss, neg_log_sigmoid(inside).mean(), rtol=1e-6, atol=0)
    assert abs(out.loss.item() - buggy.item()) > 1e-2


def test_diffusion_dpo_reference_terms_get_no_gradient():
    n = 4
    mw, mrw, ml, mrl = (rand(n, seed=s).abs().requires_grad_() for s in (40, 41, 42, 43))
    diffusion_dpo_loss(mw, mrw, ml, mrl, 10.0).loss.backward()
    assert mrw.grad is None and mrl.grad is None
    assert mw.grad is not None and (mw.grad > 0).all()  # a larger winner error raises the loss
    assert (ml.grad < 0).all()


# ---------------------------------------------------------------- dense_dpo_loss


def _dense_reference(lw, ll, c, kappa, w=None):
    if kappa is not None:
        lw, ll = lw.clamp(-kappa, kappa), ll.clamp(-kappa, kappa)
    if w is None:
        w = torch.ones_like(lw)
    w = w.expand_as(lw)
    l_w = c * (w * lw).mean(1)  # C · mean_m w_m clip_m with fixed weights
    l_l = c * (w * ll).mean(1)
    return neg_log_sigmoid(l_w - l_l).mean(), l_w - l_l


@pytest.mark.parametrize("kappa", [None, 1e-4, 0.3])
@pytest.mark.parametrize("weights", ["none", "per_step", "per_item"])
def test_dense_dpo_matches_closed_form(kappa, weights):
    b, m, c = 6, 3, 12.5
    scale = 2e-4 if kappa == 1e-4 else 0.5  # straddle the clip band
    lw, ll = rand(b, m, scale=scale, seed=50), rand(b, m, scale=scale, seed=51)
    w = {"none": None, "per_step": positive(m, 52), "per_item": positive(b * m, 53).view(b, m)}[weights]
    out = dense_dpo_loss(lw, ll, scale_c=c, kappa=kappa, step_weights=w)
    exp_loss, exp_margin = _dense_reference(lw, ll, c, kappa, w)
    torch.testing.assert_close(out.loss, exp_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.margin, exp_margin, rtol=1e-6, atol=0)


def test_dense_dpo_clip_zeroes_gradient_outside_band_only():
    kappa = 1e-3
    lw = torch.tensor([[-5e-3, 5e-4, 5e-3]], dtype=F64, requires_grad=True)
    ll = torch.zeros(1, 3, dtype=F64)
    dense_dpo_loss(lw, ll, scale_c=10.0, kappa=kappa).loss.backward()
    assert lw.grad[0, 0] == 0 and lw.grad[0, 2] == 0 and lw.grad[0, 1] != 0


def test_fixed_weights_are_not_renormalised_by_the_batch():
    """A discount weight must survive a batch of one (and one step): renormalising cancels it exactly."""
    lw, ll, w = torch.tensor([0.3], dtype=F64), torch.tensor([-0.2], dtype=F64), torch.tensor([0.25], dtype=F64)
    plain = dpo_logprob_loss(lw, ll, 1.0).loss
    torch.testing.assert_close(dpo_logprob_loss(lw, ll, 1.0, weights=w).loss, 0.25 * plain, rtol=1e-12, atol=0)
    dense = dense_dpo_loss(lw[:, None], ll[:, None], scale_c=2.0, kappa=None, step_weights=w[:, None])
    torch.testing.assert_close(dense.margin, 2.0 * 0.25 * (lw - ll), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_bad_beta_raises(beta):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_logprob_loss(x, x, beta)
    with pytest.raises(ValueError, match="beta must be > 0"):
        diffusion_dpo_loss(x, x, x, x, beta)


@pytest.mark.parametrize("eps", [0.0, 1.0, 1.5, -0.1])
def test_bad_ratio_clip_raises(eps):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="ratio_clip must be in"):
        dpo_logprob_loss(x, x, 1.0, ratio_clip=eps)


def test_bad_shapes_and_weights_raise():
    x3, x4 = torch.zeros(3), torch.zeros(4)
    with pytest.raises(ValueError, match="logratio_l has shape"):
        dpo_logprob_loss(x3, x4, 1.0)
    with pytest.raises(ValueError, match="must have 1 dim"):
        dpo_logprob_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="mse_ref_l has shape"):
        diffusion_dpo_loss(x3, x3, x3, x4, 1.0)
    with pytest.raises(ValueError, match="weights has shape"):
        dpo_logprob_loss(x3, x3, 1.0, weights=x4 + 1)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        dpo_logprob_loss(x3, x3, 1.0, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="positive sum"):
        dpo_logprob_loss(x3, x3, 1.0, weights=torch.zeros(3))
    with pytest.raises(ValueError, match="beta_scale has shape"):
        dpo_logprob_loss(x3, x3, 1.0, beta_scale=x4 + 1)
    with pytest.raises(ValueError, match="beta_scale must be finite and > 0"):
        dpo_logprob_loss(x3, x3, 1.0, beta_scale=torch.tensor([1.0, -1.0, 1.0]))


def test_dense_bad_input_raises():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must have 2 dim"):
        dense_dpo_loss(torch.zeros(3), torch.zeros(3), scale_c=1.0, kappa=None)
    with pytest.raises(ValueError, match="kappa must be > 0"):
        dense_dpo_loss(x, x, scale_c=1.0, kappa=0.0)
    with pytest.raises(ValueError, match="scale_c must be > 0"):
        dense_dpo_loss(x, x, scale_c=-1.0, kappa=None)
    with pytest.raises(ValueError, match="step_weights has shape"):
        dense_dpo_loss(x, x, scale_c=1.0, kappa=None, step_weights=torch.ones(2))
    with pytest.raises(ValueError, match="positive sum"):
        dense_dpo_loss(x, x, scale_c=1.0, kappa=None, step_weights=torch.tensor([[1.0, 1, 1], [0, 0, 0]]))


def test_group_advantages_standardise_within_each_prompt():
    r = torch.tensor([[1.0, 3.0, 2.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    a = group_advantages(r)
    mean, std = r.double().mean(1, keepdim=True), r.double().std(1, unbiased=False, keepdim=True)
    assert torch.allclose(a, (r.double() - mean) / (std + 1e-4))
    assert torch.allclose(a[0].mean(), torch.zeros((), dtype=torch.float64), atol=1e-12) and a[1].abs().max() == 0
    assert torch.allclose(group_advantages(torch.tensor([[0.2, 0.9], [0.7, 0.1]])),
                          torch.tensor([[-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), atol=1e-3)  # pairs: ±1
    with pytest.raises(ValueError, match="groups, samples >= 2"):
        group_advantages(torch.ones(4))


def test_ppo_clip_matches_the_float64_surrogate_and_stops_the_gradient_past_the_band():
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    delta = torch.tensor([[0.0, 0.05, 0.5], [0.0, -0.05, -0.5], [0.3, -0.3, 0.01], [0.0, 0.0, 0.0]],
                         dtype=torch.float64)
    new = (old + delta).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    loss = ppo_clip_loss(new, old, adv, clip_range=0.1)
    rho = torch.exp(delta)
    expected = -torch.minimum(rho * adv[:, None], rho.clamp(0.9, 1.1) * adv[:, None]).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    loss.backward()
    g = new.grad
    assert g[0, 2] == 0 and g[0, 0] < 0 and g[0, 1] < 0  # A > 0: ρ = e^0.5 past 1 + ε gets no more push
    assert g[1, 2] < 0  # ρ below 1 − ε with A > 0: min keeps the unclipped term, which still pulls it up
    assert g[2, 0] > 0 and g[2, 1] == 0  # A < 0: mirrored: below 1 − ε no more push down; above, still pushed
    assert (g[3] == 0).all()  # no advantage, no gradient
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(new, old, adv, clip_range=1.5)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_clip_loss(new, old, adv[:2], clip_range=0.1)


# ---- what every loss checks of its inputs, and the precision it computes in (mutation testing, docs/testing.md) --
def _losses_by_input() -> dict[str, tuple]:
    """Each loss as (call on its tensor inputs, the names of those inputs in order, input shape)."""
    adv = torch.tensor([1.0, -1.0, 0.5])
    return {
        "dpo_logprob": (lambda w, l: dpo_logprob_loss(w, l, 2.0, ratio_clip=0.5).loss, ("logratio_w", "logratio_l"),
                        (3,)),
        "diffusion_dpo": (lambda w, rw, l, rl: diffusion_dpo_loss(w, rw, l, rl, 3.0).loss,
                          ("mse_w", "mse_ref_w", "mse_l", "mse_ref_l"), (3,)),
        "dense_dpo": (lambda w, l: dense_dpo_loss(w, l, scale_c=2.0, kappa=None).loss, ("logratio_w", "logratio_l"),
                      (3, 2)),
        "ppo_clip": (lambda n, o: ppo_clip_loss(n, o, adv, 0.3), ("logp", "logp_old"), (3, 2)),
    }


@pytest.mark.parametrize("loss", sorted(_losses_by_input()))
def test_every_input_of_a_loss_is_shape_checked_by_name(loss):
    call, names, shape = _losses_by_input()[loss]
    for i, name in enumerate(names):
        args = [torch.rand(shape) for _ in names]
        args[i] = torch.rand(shape[0] + 1, *shape[1:])
        first = names[1] if i == 0 else names[0]
        expected = rf"^{name} has shape \({shape[0] + 1},.*expected \({shape[0]},.*like {first}$"
        if i == 0:  # the first input sets the shape: the second is then the one that differs
            expected = rf"^{names[1]} has shape \({shape[0]},.*expected \({shape[0] + 1},.*like {name}$"
        with pytest.raises(ValueError, match=expected):
            call(*args)


@pytest.mark.parametrize("loss", sorted(_losses_by_input()))
def test_a_loss_computes_in_the_widest_dtype_of_its_inputs_and_at_least_float32(loss):
    """One float64 input, wherever it is, makes the whole loss float64 (equal to the all-float64 loss); bfloat16
    inputs are computed in float32, not rounded to bfloat16 on the way."""
    call, names, shape = _losses_by_input()[loss]
    gen = torch.Generator().manual_seed(3)
    values = [torch.rand(shape, generator=gen, dtype=F64) * 0.8 for _ in names]  # some past the dpo clamp (0.41)
    exact = call(*values)
    for i in range(len(names)):
        mixed = [v.float() for v in values]
        mixed[i] = values[i]
        out = call(*mixed)
        assert out.dtype == F64, names[i]
        assert float(out) == pytest.approx(float(call(*[v.double() for v in mixed])), abs=1e-15), names[i]
    half = [v.to(torch.bfloat16) for v in values]
    out = call(*half)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(call(*[v.double() for v in half])), rel=1e-6)
    assert abs(float(exact) - float(out)) < 0.05  # the bfloat16 rounding of the inputs only


def test_beta_scale_and_clip_range_bounds_are_exclusive():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^beta_scale must be finite and > 0$"):
        dpo_logprob_loss(x, x, 1.0, beta_scale=torch.tensor([1.0, 0.0, 1.0]))
    logp = torch.zeros(3, 2)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"^clip_range must be in \(0, 1\)"):
            ppo_clip_loss(logp, logp, torch.zeros(3), bad)
    with pytest.raises(ValueError, match=r"^advantages has shape \(2,\), expected \(3,\)$"):
        ppo_clip_loss(logp, logp, torch.zeros(2), 0.2)


def test_float64_advantages_and_float32_beta_scales_are_not_rounded_to_the_narrower_input():
    """PPO's advantages count in the dtype (float64 advantages, float32 log-probs: a float64 loss), and a float32
    β(t) scale multiplies in the logits' float64, not after rounding β·s to float32."""
    logp = torch.full((2, 1), 0.1)
    adv = torch.tensor([1 / 3, -2 / 3], dtype=F64)
    out = ppo_clip_loss(logp, torch.zeros(2, 1), adv, 0.2)
    assert out.dtype == F64
    assert float(out) == pytest.approx(-float((torch.exp(torch.tensor(0.1, dtype=F64).float().double())
                                                * adv).mean()), abs=1e-15)
    lw, ll = torch.tensor([0.3, 0.1], dtype=F64), torch.tensor([0.2, 0.4], dtype=F64)
    scale = torch.tensor([1 / 3, 2 / 3])  # float32
    got = dpo_logprob_loss(lw, ll, 0.1, beta_scale=scale).loss
    logits = 0.1 * scale.double() * (lw - ll)
    assert float(got) == pytest.approx(float(-torch.nn.functional.logsigmoid(logits).mean()), rel=1e-14)
    mse = [torch.tensor(v, dtype=F64) for v in ([0.3, 0.1], [0.2, 0.2], [0.25, 0.4], [0.2, 0.2])]
    got = diffusion_dpo_loss(*mse, 0.1, beta_scale=scale).loss
    logits = -0.5 * 0.1 * scale.double() * ((mse[0] - mse[1]) - (mse[2] - mse[3]))
    assert float(got) == pytest.approx(float(-torch.nn.functional.logsigmoid(logits).mean()), rel=1e-14)
