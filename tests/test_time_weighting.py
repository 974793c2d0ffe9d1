"""learner.time_weighting: discount probabilities, λ(t), step sampling and weighting."""

from __future__ import annotations

import math

import pytest
import torch

from learner.time_weighting import TimeWeightConfig, TimeWeighting, discount_probs, snr_lambda

F64 = torch.float64


def sd15_alphas_cumprod() -> torch.Tensor:
    """SD1.5's scaled-linear schedule, written out: β = linspace(√0.00085, √0.012, 1000)², ᾱ = Π(1 − β)."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


def ddim_grid(num: int, num_train: int = 1000) -> torch.Tensor:
    """SD1.5-style inference grid in generation order (981, 961, …, 1 for 50 steps)."""
    ratio = num_train // num
    return torch.arange(num - 1, -1, -1) * ratio + 1


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square 0.999 quantile for 9 degrees of freedom (10 grid cells)
CHI2_9_999 = 27.88


def test_discount_probs_closed_form_and_uniform_at_gamma_one():
    p = discount_probs(7, 0.8)
    z = sum(0.8**j for j in range(7))
    torch.testing.assert_close(p, torch.tensor([0.8**k / z for k in range(7)], dtype=F64), rtol=1e-12, atol=0)
    assert p.dtype == F64
    assert torch.equal(discount_probs(5, 1.0), torch.full((5,), 0.2, dtype=F64))


def test_discount_probs_strictly_decreasing_for_gamma_below_one():
    p = discount_probs(50, 0.9)
    assert (p[1:] < p[:-1]).all()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_discount_probs_over_one_step_is_certain_and_over_none_refused():
    assert torch.equal(discount_probs(1, 0.5), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match="num must be >= 1, got 0"):
        discount_probs(0, 0.5)


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.01])
def test_discount_probs_bad_gamma_raises(gamma):
    with pytest.raises(ValueError, match="gamma must be in \\(0, 1\\]"):
        discount_probs(5, gamma)


def test_snr_lambda_sd15_numbers_range_and_monotone():
    ac = sd15_alphas_cumprod()
    paper = {500: 1.11, 750: 1.28, 999: 2.00}  # docs/math.md §7
    for norm in ("minmax", "max"):
        lam = snr_lambda(ac, torch.tensor(list(paper)), norm)
        for value, expected in zip(lam.tolist(), paper.values(), strict=True):
            assert value == pytest.approx(expected, abs=0.01)
        all_t = snr_lambda(ac, torch.arange(1000), norm)
        assert all_t.min() >= 1 and all_t.max() <= 2
        assert (all_t[1:] >= all_t[:-1]).all()
    assert snr_lambda(ac, torch.tensor([0]), "minmax").item() == 1.0


def test_snr_lambda_closed_form_on_random_schedule():
    g = torch.Generator().manual_seed(0)
    ac = torch.cumprod(1 - torch.rand(100, generator=g, dtype=F64) * 0.05, 0)
    t = torch.randint(0, 100, (20,), generator=g)
    v = [math.sqrt((1 - a) / a) for a in ac.tolist()]
    mm = [1 + (v[i] - min(v)) / (max(v) - min(v)) for i in t.tolist()]
    mx = [1 + v[i] / max(v) for i in t.tolist()]
    torch.testing.assert_close(snr_lambda(ac, t, "minmax"), torch.tensor(mm, dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close(snr_lambda(ac, t, "max"), torch.tensor(mx, dtype=F64), rtol=1e-10, atol=0)


def test_snr_lambda_bad_input_raises():
    ac = sd15_alphas_cumprod()
    with pytest.raises(ValueError, match=r"norm must be one of \('minmax', 'max'\), got 'zscore'"):
        snr_lambda(ac, torch.tensor([1]), "zscore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timesteps must be in"):
        snr_lambda(ac, torch.tensor([1000]))


def make(mode: str, **kw) -> TimeWeighting:
    return TimeWeighting(TimeWeightConfig(mode=mode, **kw), sd15_alphas_cumprod(), ddim_grid(10))


@pytest.mark.parametrize(
    ("mode", "kw"),
    [("discount", {}), ("timestep_aware", {}), ("uniform", {}), ("discount", {"discount_as": "weight"})],
)
def test_sample_frequencies_match_probabilities(mode, kw):
    tw = make(mode, gamma=0.8, **kw)
    s = tw.sample(20000, torch.Generator().manual_seed(1))
    counts = torch.bincount(s.index, minlength=10).to(F64)
    drawn_by_cat = mode != "uniform" and kw.get("discount_as", "sample") == "sample"
    probs = discount_probs(10, 0.8) if drawn_by_cat else torch.full((10,), 0.1, dtype=F64)
    assert chi_square(counts, probs) < CHI2_9_999
    assert torch.equal(s.timestep, ddim_grid(10)[s.index])


def test_sample_weights_and_beta_scales_per_mode():
    g = torch.Generator().manual_seed(2)
    grid, ac = ddim_grid(10), sd15_alphas_cumprod()
    p = torch.tensor([0.8**k for k in range(10)], dtype=F64)
    p = p / p.sum()
    s = make("uniform").sample(50, g)
    assert (s.beta_scale == 1).all() and (s.weight == 1).all()
    s = make("discount", gamma=0.8).sample(50, g)
    assert (s.beta_scale == 1).all() and (s.weight == 1).all()
    s = make("discount", gamma=0.8, discount_as="weight").sample(50, g)
    torch.testing.assert_close(s.weight, 10 * p[s.index], rtol=1e-12, atol=0)
    assert (s.beta_scale == 1).all()
    s = make("timestep_aware", gamma=0.8).sample(50, g)
    v = ((1 - ac) / ac).sqrt()
    lam = 1 + (v[grid[s.index]] - v.min()) / (v.max() - v.min())
    torch.testing.assert_close(s.beta_scale, lam, rtol=1e-12, atol=0)
    assert (s.weight == 1).all()


def test_the_configured_lambda_norm_reaches_the_weights():
    tw = make("timestep_aware", lambda_norm="max")
    want = snr_lambda(sd15_alphas_cumprod(), ddim_grid(10), "max")
    assert torch.equal(tw.weigh(torch.arange(10))[0], want)
    assert not torch.equal(want, snr_lambda(sd15_alphas_cumprod(), ddim_grid(10), "minmax"))


def test_every_mode_returns_float64_scales_and_weights():
    """The losses widen to the widest dtype they meet: a float32 ``ones`` would round a float64 loss's β scale."""
    for kw in ({"mode": "uniform"}, {"mode": "discount"}, {"mode": "discount", "discount_as": "weight"},
               {"mode": "timestep_aware"}):
        tw = make(**kw)
        s = tw.sample(5, torch.Generator().manual_seed(0))
        assert s.beta_scale.dtype == s.weight.dtype == F64, kw
        assert all(v.dtype == F64 for v in tw.weigh(torch.arange(3))), kw


def test_mean_beta_scale_is_lambdas_mean_under_the_draw():
    """E[β scale] from the definitions in float64: Σ_k p_k λ(t_k) under Cat(γ^k), the plain mean of λ over the grid
    when steps are drawn uniformly, and 1 outside timestep-aware mode."""
    ac, grid = sd15_alphas_cumprod(), ddim_grid(10)
    v = ((1 - ac) / ac).sqrt()
    lam = 1 + (v[grid] - v.min()) / (v.max() - v.min())
    p = torch.tensor([0.8**k for k in range(10)], dtype=F64)
    assert make("timestep_aware", gamma=0.8).mean_beta_scale() == pytest.approx(float((p * lam).sum() / p.sum()),
                                                                                rel=1e-12)
    assert make("timestep_aware", gamma=0.8, discount_as="weight").mean_beta_scale() == pytest.approx(
        float(lam.mean()), rel=1e-12)
    assert make("uniform").mean_beta_scale() == make("discount", gamma=0.8).mean_beta_scale() == 1.0


def test_gamma_one_weights_are_exactly_uniform():
    tw = make("discount", gamma=1.0, discount_as="weight")
    assert torch.equal(tw.sample(30, torch.Generator().manual_seed(3)).weight, torch.ones(30, dtype=F64))
    assert torch.equal(tw.weigh(torch.arange(10))[1], torch.ones(10, dtype=F64))


def test_weigh_fixed_steps():
    idx = torch.tensor([0, 4, 8])
    p = torch.tensor([0.9**k for k in range(10)], dtype=F64)
    p = p / p.sum()
    bs, w = make("uniform").weigh(idx)
    assert (bs == 1).all() and (w == 1).all()
    bs, w = make("discount", gamma=0.9).weigh(idx)
    assert (bs == 1).all()
    torch.testing.assert_close(w, 10 * p[idx], rtol=1e-12, atol=0)
    assert (w[1:] < w[:-1]).all()
    bs, w = make("timestep_aware").weigh(idx)
    torch.testing.assert_close(bs, snr_lambda(sd15_alphas_cumprod(), ddim_grid(10)[idx]), rtol=1e-12, atol=0)
    assert (w == 1).all() and (bs[1:] < bs[:-1]).all()  # earlier step = larger t = larger λ
    with pytest.raises(ValueError, match="index must be grid positions"):
        make("uniform").weigh(torch.tensor([10]))


def test_train_grid_puts_almost_all_mass_on_high_t():
    """docs/math.md §7 reading (a): Cat(0.9^k) over 1000 training steps in generation order → > 99% on t ≥ 950."""
    tw = make("timestep_aware", grid="train")
    assert torch.equal(tw.grid, 999 - torch.arange(1000))  # k = T − 1 − t
    assert tw.probs[tw.grid >= 950].sum().item() > 0.99
    s = tw.sample(2000, torch.Generator().manual_seed(4))
    assert (s.timestep >= 900).float().mean().item() > 0.99


def test_inference_grid_reading_b_numbers():
    """docs/math.md §7 reading (b): 50-step DDIM grid, γ = 0.9 → P(t ≥ 901) = 0.41, P(t ≥ 601) = 0.88."""
    tw = TimeWeighting(TimeWeightConfig(mode="timestep_aware"), sd15_alphas_cumprod(), ddim_grid(50))
    assert tw.grid[0].item() == 981 and tw.grid[-1].item() == 1
    assert tw.probs[tw.grid >= 901].sum().item() == pytest.approx(0.41, abs=0.01)
    assert tw.probs[tw.grid >= 601].sum().item() == pytest.approx(0.88, abs=0.01)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"mode": "exponential"}, "mode"),
        ({"mode": "discount", "discount_as": "both"}, "discount_as"),
        ({"mode": "discount", "grid": "ddpm"}, "grid"),
        ({"mode": "timestep_aware", "lambda_norm": "zscore"}, "lambda_norm"),
    ],
)
def test_bad_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=f"(?s){field}\n  Input should be"):
        TimeWeightConfig(**kw)


def test_bad_gamma_and_grid_raise():
    with pytest.raises(ValueError, match=r"(?s)gamma.*greater than 0"):
        TimeWeightConfig(mode="discount", gamma=0.0)
    ac = sd15_alphas_cumprod()
    cfg = TimeWeightConfig(mode="discount")
    with pytest.raises(ValueError, match="strictly decreasing"):
        TimeWeighting(cfg, ac, torch.arange(1, 1000, 100))
    with pytest.raises(ValueError, match="must lie in"):
        TimeWeighting(cfg, ac, torch.tensor([1200, 500]))
    with pytest.raises(ValueError, match="n must be >= 1"):
        TimeWeighting(cfg, ac, ddim_grid(10)).sample(0)


# ---------------------------------------------------------------- the discount's two forms agree in expectation

# A per-step log-ratio margin that changes sign along the chain, so that which steps are weighted matters.
STEP_MARGIN = torch.tensor([0.8, 0.6, 0.3, 0.1, -0.1, -0.3, -0.5, -0.6, -0.7, -0.8], dtype=F64)


def _monte_carlo(estimate, draws: int, seed: int) -> tuple[float, float]:
    """Mean and standard error of ``estimate(generator)`` over ``draws`` independent draws."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([estimate(g) for _ in range(draws)], dtype=F64)
    return x.mean().item(), x.std().item() / math.sqrt(draws)


@pytest.mark.parametrize("m", [1, 3])
def test_dense_weight_form_has_the_sample_forms_expectation(m):
    """E[C · mean_m w_m clip_m] with k uniform and fixed weights equals E[C · mean_m clip_m] with k ~ Cat(γ^k),
    = C Σ_k p_k margin_k, and both differ from the undiscounted C · mean_k margin_k (at M = 1 a renormalised
    weight would cancel exactly and give the undiscounted value)."""
    from learner.losses import dense_dpo_loss

    c, gamma = 10.0, 0.7
    exact = c * float((discount_probs(10, gamma) * STEP_MARGIN).sum())
    undiscounted = c * float(STEP_MARGIN.mean())
    assert abs(exact - undiscounted) > 2.0

    def form(tw: TimeWeighting):
        def estimate(g: torch.Generator) -> float:
            s = tw.sample(m, g)
            weights = s.weight if tw.cfg.discount_as == "weight" else None
            lw = STEP_MARGIN[s.index].view(1, m)
            return dense_dpo_loss(lw, torch.zeros_like(lw), scale_c=c, kappa=None, step_weights=weights).margin.item()
        return estimate

    sample = make("discount", gamma=gamma, discount_as="sample")
    weight = make("discount", gamma=gamma, discount_as="weight")
    for tw, seed in ((sample, 0), (weight, 1)):
        mean, se = _monte_carlo(form(tw), 2000, seed)
        assert abs(mean - exact) < 4 * se + 1e-9, (tw.cfg.discount_as, mean, exact, se)
        assert abs(mean - undiscounted) > 8 * se


@pytest.mark.parametrize("batch", [1, 4])
def test_weighted_pair_loss_has_the_sample_forms_expectation(batch):
    """The same for the per-pair losses (weights outside the log-sigmoid): E[mean_i w_i L(k_i)] with k uniform
    equals E[mean_i L(k_i)] with k ~ Cat(γ^k), for a batch of one as for larger ones."""
    from learner.losses import dpo_logprob_loss

    gamma = 0.7
    per_step = -torch.nn.functional.logsigmoid(3.0 * STEP_MARGIN)
    exact = float((discount_probs(10, gamma) * per_step).sum())
    undiscounted = float(per_step.mean())

    def form(tw: TimeWeighting):
        def estimate(g: torch.Generator) -> float:
            s = tw.sample(batch, g)
            lw = STEP_MARGIN[s.index]
            return dpo_logprob_loss(lw, torch.zeros_like(lw), 3.0, weights=s.weight).loss.item()
        return estimate

    for tw, seed in ((make("discount", gamma=gamma), 2), (make("discount", gamma=gamma, discount_as="weight"), 3)):
        mean, se = _monte_carlo(form(tw), 2000, seed)
        assert abs(mean - exact) < 4 * se, (tw.cfg.discount_as, mean, exact, se)
        assert abs(mean - undiscounted) > 8 * se
