"""learner.reference: divergence estimates and the stable reference-update rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learner.config import ConfigError, build_config
from learner.reference import (
    DEFAULT_DELTA,
    FrozenReference,
    ReferenceConfig,
    RefEvent,
    StableUpdateReference,
    build_reference,
    divergence_estimate,
    kernel_kl,
)

F64 = torch.float64


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- divergence estimates


def test_divergence_zero_for_identical_models():
    noise, eps = rand(3, 2, 4, 4, seed=0), rand(3, 2, 4, 4, seed=1)
    assert divergence_estimate(noise, eps, eps.clone()).item() == 0.0
    assert kernel_kl(eps, eps.clone()).item() == 0.0


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_divergence_and_kernel_kl_closed_form(reduce):
    b, shape = 3, (2, 4, 5)
    noise, cand, init = rand(b, *shape, seed=2), rand(b, *shape, seed=3), rand(b, *shape, seed=4)
    n_el = 2 * 4 * 5
    per_d, per_k = [], []
    for i in range(b):  # written element by element from the formula
        d = k = 0.0
        rows = (init[i].flatten().tolist(), cand[i].flatten().tolist(), noise[i].flatten().tolist())
        for e, c, z in zip(*rows, strict=True):
            d += (z - e) ** 2 - (z - c) ** 2
            k += (c - e) ** 2
        per_d.append(d / n_el if reduce == "mean" else d)
        per_k.append(k / n_el if reduce == "mean" else k)
    expected_d = torch.tensor(sum(per_d) / b, dtype=F64)
    expected_k = torch.tensor(sum(per_k) / b, dtype=F64)
    torch.testing.assert_close(divergence_estimate(noise, cand, init, reduce), expected_d, rtol=1e-6, atol=0)
    torch.testing.assert_close(kernel_kl(cand, init, reduce), expected_k, rtol=1e-6, atol=0)


def test_divergence_positive_when_candidate_explains_noise_better():
    noise, init = rand(4, 8, seed=5), rand(4, 8, seed=6)
    cand = noise + 0.1 * (init - noise)  # closer to the true noise than the initial model
    assert divergence_estimate(noise, cand, init).item() > 0
    assert divergence_estimate(noise, init, cand).item() < 0  # Eq. 7 sign: opposite direction is negative
    assert kernel_kl(cand, init).item() > 0 and kernel_kl(init, cand).item() > 0


@pytest.mark.parametrize("direction", ["fits_winners_better", "fits_winners_worse"])
def test_only_kernel_kl_caps_drift_in_both_directions(direction):
    """The cap exists to stop drift from the initial model. A candidate moving its ε̂ towards the true noise of the
    winners (fits them better) and one moving it away (fits them worse, reported for Diffusion-DPO) drift equally
    far: kernel_kl sees both and the stable reference freezes; Eq. 7's log-ratio is negative for the second, so a
    cap on it lets that drift through however large it gets."""
    noise, init = rand(16, 32, seed=7), rand(16, 32, seed=8)
    towards = 1.0 if direction == "fits_winners_better" else -1.0
    for size in (0.1, 0.5, 1.5):  # growing drift
        cand = init + towards * size * (noise - init)
        kkl = kernel_kl(cand, init).item()
        assert kkl == pytest.approx(size**2 * (noise - init).square().mean().item(), rel=1e-9)
        eq7 = divergence_estimate(noise, cand, init).item()
        assert (eq7 > 0) == (direction == "fits_winners_better")
        for measure, d in (("kernel_kl", kkl), ("log_ratio", eq7)):
            ref = StableUpdateReference(tau=1, delta=0.05)
            event = ref.maybe_update(1, policy(0), lambda _, d=d: d)
            blind = measure == "log_ratio" and direction == "fits_winners_worse"
            assert event.action == ("replaced" if blind or d <= 0.05 else "frozen"), (measure, size)
            if size == 1.5 and not blind:
                assert ref.frozen


def test_default_divergence_is_kernel_kl_and_default_delta_is_its_calibration():
    cfg = ReferenceConfig()
    assert cfg.divergence == "kernel_kl" and cfg.delta == DEFAULT_DELTA
    assert build_reference(ReferenceConfig(strategy="stable_update")).delta == DEFAULT_DELTA


def test_divergence_bad_input_raises():
    with pytest.raises(ValueError, match="share one batched shape"):
        divergence_estimate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduce must be"):
        kernel_kl(torch.zeros(2, 3), torch.zeros(2, 3), "max")  # type: ignore[arg-type]


def test_real_tiny_eps_predictors():
    """Two nn.Linear ε-predictors on noised data: identical → D = KL = 0; perturbed → KL > 0."""
    torch.manual_seed(0)
    init = nn.Linear(6, 6).double()
    same = nn.Linear(6, 6).double()
    same.load_state_dict(init.state_dict())
    x_t, noise = torch.randn(5, 6, dtype=F64), torch.randn(5, 6, dtype=F64)
    with torch.no_grad():
        assert divergence_estimate(noise, same(x_t), init(x_t)).item() == 0.0
        assert kernel_kl(same(x_t), init(x_t)).item() == 0.0
        same.weight.add_(0.05 * torch.randn_like(same.weight))
        assert kernel_kl(same(x_t), init(x_t)).item() > 0
        assert divergence_estimate(noise, same(x_t), init(x_t)).item() != 0


# ---------------------------------------------------------------- stable update


class CountingDivergence:
    """Returns scripted values and records the candidates it saw (cloned)."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.calls, self.seen = list(values), 0, []

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.calls += 1
        self.seen.append({k: v.clone() for k, v in state.items()})
        return self.values.pop(0)


def policy(seed: int) -> dict[str, torch.Tensor]:
    return {"a.lora_A": rand(2, 3, seed=seed), "a.lora_B": rand(3, 2, seed=seed + 100)}


def test_frozen_reference_never_moves():
    ref = FrozenReference()
    div = CountingDivergence([])
    assert ref.maybe_update(1, policy(0), div) is None
    assert ref.state is None and ref.moves is False and div.calls == 0


def test_stable_update_replaces_every_tau_then_freezes_forever():
    ref = StableUpdateReference(tau=2, delta=0.01)
    div = CountingDivergence([0.001, 0.005, 0.02])
    assert ref.state is None and ref.version == 0 and ref.moves is True
    pol = policy(1)
    assert ref.maybe_update(1, pol, div) is None and div.calls == 0  # not a multiple of tau

    ev = ref.maybe_update(2, pol, div)
    assert ev == RefEvent(2, 0.001, "replaced") and ref.version == 1
    for k in pol:
        assert torch.equal(ref.state[k], pol[k]) and ref.state[k].data_ptr() != pol[k].data_ptr()
    snapshot = {k: v.clone() for k, v in ref.state.items()}

    for v in pol.values():  # the optimizer mutates the policy in place
        v.add_(1.0)
    assert ref.maybe_update(3, pol, div) is None
    for k in pol:  # bitwise unchanged between replacements
        assert torch.equal(ref.state[k], snapshot[k])

    assert ref.maybe_update(4, pol, div) == RefEvent(4, 0.005, "replaced")
    for k in pol:
        assert torch.equal(ref.state[k], pol[k])
    kept = {k: v.clone() for k, v in ref.state.items()}

    for v in pol.values():
        v.add_(1.0)
    assert ref.maybe_update(6, pol, div) == RefEvent(6, 0.02, "frozen")
    assert ref.frozen and ref.version == 2
    for k in pol:  # the last candidate within delta is kept
        assert torch.equal(ref.state[k], kept[k])
    for step in range(7, 20):
        assert ref.maybe_update(step, pol, div) is None
    assert div.calls == 3
    assert [e.action for e in ref.history] == ["replaced", "replaced", "frozen"]


def test_reinit_sends_the_reference_back_to_the_initial_model_and_keeps_checking():
    """The paper's Re-Init variant: a candidate past δ resets the reference to the initial model (state None, a new
    version), nothing freezes, and a later candidate within δ is taken again."""
    ref = StableUpdateReference(tau=1, delta=0.01, reinit=True)
    div = CountingDivergence([0.001, 0.02, 0.03, 0.004])
    assert ref.maybe_update(1, policy(1), div) == RefEvent(1, 0.001, "replaced") and ref.version == 1
    assert ref.maybe_update(2, policy(1), div) == RefEvent(2, 0.02, "reinit")
    assert ref.state is None and ref.version == 2 and not ref.frozen
    assert ref.maybe_update(3, policy(1), div) == RefEvent(3, 0.03, "reinit") and ref.version == 2  # already there
    assert ref.maybe_update(4, policy(2), div).action == "replaced" and ref.version == 3
    assert build_reference(ReferenceConfig(strategy="stable_update", past_cap="reinit")).reinit


def test_divergence_at_exactly_delta_replaces():
    ref = StableUpdateReference(tau=1, delta=0.5)
    assert ref.maybe_update(1, policy(2), CountingDivergence([0.5])).action == "replaced"


def test_nan_divergence_raises():
    ref = StableUpdateReference(tau=1, delta=0.5)
    with pytest.raises(ValueError, match="divergence returned nan"):
        ref.maybe_update(1, policy(2), CountingDivergence([float("nan")]))


def test_ema_blend_formula():
    ema = 0.25
    ref = StableUpdateReference(tau=1, delta=1.0, ema=ema)
    p1, p2 = policy(3), policy(4)
    ref.maybe_update(1, p1, CountingDivergence([0.0]))
    for k in p1:  # current_ref None = zero LoRA delta
        torch.testing.assert_close(ref.state[k], ema * p1[k] + (1 - ema) * torch.zeros_like(p1[k]))
    first = {k: v.clone() for k, v in ref.state.items()}
    div = CountingDivergence([0.0])
    ref.maybe_update(2, p2, div)
    for k in p2:
        expected = ema * p2[k] + (1 - ema) * first[k]
        torch.testing.assert_close(ref.state[k], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(div.seen[0][k], expected, rtol=1e-12, atol=0)  # D is taken of the blend
    with pytest.raises(ValueError, match=r"policy keys differ from the reference's: \['a\.lora_B', 'other'\]$"):
        ref.maybe_update(3, {"a.lora_A": p2["a.lora_A"], "other": torch.zeros(1)}, CountingDivergence([0.0]))


def test_state_dict_round_trip():
    ref = StableUpdateReference(tau=1, delta=0.1)
    pol = policy(5)
    ref.maybe_update(1, pol, CountingDivergence([0.05]))
    ref.maybe_update(2, pol, CountingDivergence([0.5]))
    sd = ref.state_dict()
    other = StableUpdateReference(tau=1, delta=0.1)
    other.load_state_dict(sd)
    assert other.version == 1 and other.frozen and other.history == ref.history
    for k in pol:
        assert torch.equal(other.state[k], ref.state[k])
        assert other.state[k].data_ptr() != ref.state[k].data_ptr()
    div = CountingDivergence([0.0])
    assert other.maybe_update(3, pol, div) is None and div.calls == 0


def test_a_reference_still_at_the_initial_model_round_trips():
    """Before its first replacement, and after a re-init, the reference holds no state (the initial model): a
    checkpoint taken then must load as that, not fail on the missing tensors."""
    fresh = StableUpdateReference(tau=4, delta=0.1)
    back = StableUpdateReference(tau=1, delta=0.01, reinit=True)
    back.maybe_update(1, policy(3), CountingDivergence([0.001]))
    back.maybe_update(2, policy(3), CountingDivergence([0.5]))
    for ref in (fresh, back):
        sd = ref.state_dict()
        assert sd["state"] is None
        other = StableUpdateReference(tau=ref.tau, delta=ref.delta, reinit=ref.reinit)
        other.load_state_dict(sd)
        assert other.state is None and other.version == ref.version and other.history == ref.history


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"tau": 0, "delta": 0.1}, r"^reference\.tau must be >= 1, got 0$"),
        ({"tau": 1.5, "delta": 0.1}, r"^reference\.tau must be an integer, got 1\.5$"),
        ({"tau": 2, "delta": 0.0}, r"^reference\.delta must be > 0, got 0\.0$"),
        ({"tau": 2, "delta": 0.1, "ema": 0.0}, r"^reference\.ema must be in \(0, 1\], got 0\.0$"),
        ({"tau": 2, "delta": 0.1, "ema": 1.5}, r"^reference\.ema must be in \(0, 1\], got 1\.5$"),
    ],
)
def test_bad_parameters_raise(kw, msg):
    """The reference section is checked once, by the config, in one line naming the key."""
    with pytest.raises(ConfigError, match=msg):
        build_config({"reference": {"strategy": "stable_update", **kw}})


def test_step_counted_from_one():
    with pytest.raises(ValueError, match="counted from 1"):
        StableUpdateReference(tau=1, delta=0.1).maybe_update(0, policy(0), CountingDivergence([0.0]))


def test_build_reference():
    assert isinstance(build_reference(ReferenceConfig(strategy="frozen")), FrozenReference)
    cfg = build_config({"reference": {"strategy": "stable_update", "tau": 16, "delta": 0.002, "ema": 0.5}})
    ref = build_reference(cfg.reference)
    assert isinstance(ref, StableUpdateReference) and (ref.tau, ref.delta, ref.ema) == (16, 0.002, 0.5)
    strategies = r"^reference\.strategy must be one of 'frozen' or 'stable_update', got 'ema'$"
    with pytest.raises(ConfigError, match=strategies):
        build_config({"reference": {"strategy": "ema"}})
    with pytest.raises(ConfigError, match=r"^unknown config key 'reference\.tua'; did you mean 'reference\.tau'\?$"):
        build_config({"reference": {"strategy": "frozen", "tua": 3}})


def test_divergences_compute_in_at_least_float32_and_take_one_value_per_sample():
    """bfloat16 model outputs are widened before the squares (the divergence is a small difference of large
    terms); outputs of one vector per sample are a batch, one number per sample is not."""
    gen = torch.Generator().manual_seed(0)
    a, b, target = (torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3))
    half = [x.to(torch.bfloat16) for x in (a, b, target)]
    exact_kl = kernel_kl(*(x.double() for x in half[:2]))
    assert kernel_kl(*half[:2]).dtype == torch.float32
    assert float(kernel_kl(*half[:2])) == pytest.approx(float(exact_kl), rel=1e-6)
    exact_eq7 = divergence_estimate(*(x.double() for x in (half[2], half[0], half[1])))
    assert float(divergence_estimate(half[2], half[0], half[1])) == pytest.approx(float(exact_eq7), rel=1e-5)
    vectors = kernel_kl(a[:, 0, 0], b[:, 0, 0])
    assert float(vectors) == pytest.approx(float((a[:, 0, 0] - b[:, 0, 0]).double().square().mean()))
    with pytest.raises(ValueError, match=r"must share one batched shape \[B, \.\.\.\], got \[\(4,\), \(4,\)\]"):
        kernel_kl(a[:, 0, 0, 0], b[:, 0, 0, 0])
