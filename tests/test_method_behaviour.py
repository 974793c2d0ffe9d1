"""What each method is FOR, not only its formula: a wrong copy of the code fails here even where the unit tests of
the formulas still pass. On the tiny random models (the UNet with DDIM, SD3 and FLUX with the flow SDE) with a stub
reward (image brightness), so each test is quick.

- TailorPO: the preferred child continues the chain (Sec. 3.3, Alg. 1 line 11), so greedy selection raises the
  final image's reward;
- TailorPO-G: the guidance step only ever raises the reward it is given (Eq. 14, accepted only if r rises);
- discounting (dense-reward DPO): γ < 1 shifts training towards early steps, and the gradient follows;
- the stable reference (Rethinking-DPO): replaced every τ steps until D > δ, then frozen for good, for drift in
  either direction.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from conftest import KINDS
from helpers import Brightness, brightness_worker, tolerance

from actors.records import from_table
from actors.rollout import RolloutWorker
from learner.trainer import Learner
from policy import POLICY
from policy.guidance import reward_gradient_step

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow circle at the bottom"]
NUM_STEPS = 6


def _generate(worker: RolloutWorker, seeds: list[int]) -> pa.RecordBatch:
    prompts = [PROMPTS[s % len(PROMPTS)] for s in seeds]
    return worker.generate(prompts, list(range(len(seeds))), seeds, expected_version=0)[0]


# ---------------------------------------------------------------- TailorPO: the winner continues


@pytest.mark.parametrize("kind", KINDS)
def test_the_winning_child_continues_the_chain_and_raises_the_final_reward(make_config, kind):
    cfg = make_config(kind, pairs={"branch_steps": list(range(NUM_STEPS))})
    worker = brightness_worker(cfg)
    seeds = list(range(8 if kind == "ddim" else 24))  # the flow models are cheap: more seeds, a firmer test
    t = from_table(_generate(worker, seeds)).tensors
    n = len(seeds)
    for k in range(NUM_STEPS - 1):  # rows are grouped by step: the chain's next x_t is this step's winner
        now, nxt = slice(k * n, (k + 1) * n), slice((k + 1) * n, (k + 2) * n)
        assert torch.equal(t["x_t"][nxt], t["x_w"][now]), f"step {k}: the next x_t is not the winner"
        assert not torch.equal(t["x_t"][nxt], t["x_l"][now])
    # The final image is the last step's winner; greedy selection at every step beats plain sampling, paired by
    # seed (the same x_T), on average over seeds.
    final = t["reward_w"][-n:]
    plain = Brightness()(worker.policy.sample([PROMPTS[s % 4] for s in seeds], seeds, decode=True).images, None)
    assert bool((t["reward_w"] >= t["reward_l"]).all())
    assert float((final - plain).mean()) > 2 * float((final - plain).std()) / n**0.5, (final, plain)


# ---------------------------------------------------------------- TailorPO-G: guidance never lowers the reward


def test_guidance_never_lowers_the_reward_it_is_given():
    """Per sample, accepted or restored: r(result) ≥ r(x), with some steps overshooting a non-concave reward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)

    def reward(z: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * z).flatten(1).mean(1) - 0.1 * z.square().flatten(1).mean(1)

    eta = torch.logspace(-2, 2, 16, dtype=torch.float64)  # small steps help, large ones overshoot
    res = reward_gradient_step(x, reward, eta)
    after = reward(res.x)
    assert bool(res.accepted.any()) and bool((~res.accepted).any())  # both outcomes are exercised
    assert bool((after >= reward(x)).all())
    assert bool((after[res.accepted] > reward(x)[res.accepted]).all())
    assert torch.equal(res.x[~res.accepted], x[~res.accepted])  # a rejected step restores the sample
    torch.testing.assert_close(res.reward_after, after, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_guided_rollout_records_the_reward_of_the_sample_it_keeps(make_config, kind):
    cfg = make_config(kind, guidance={"kind": "reward_gradient", "eta_lo": 0.5, "eta_hi": 1.0,
                                      "max_grad_norm": 50.0})
    worker = brightness_worker(cfg)
    t = from_table(_generate(worker, [0, 1, 2, 3])).tensors
    assert bool(t["guided"].any())
    kept = Brightness()(worker.policy.decode(t["x0_w"]), None)  # the reward of the winner actually stored
    # float-order spread: max 8.9e-08 over 24 seeds (bench/tolerances.py); bound 5e-07 = 6x
    torch.testing.assert_close(t["reward_w"], kept.cpu(), rtol=0, atol=tolerance("guided_reward.stored_vs_recomputed"))
    assert bool((t["reward_w"] >= t["reward_l"]).all())


# ---------------------------------------------------------------- discounting changes which steps are trained


def _first_grad_norm(cfg, records) -> float:
    return Learner(cfg).update(records)["grad_norm"]


@pytest.mark.parametrize("kind", KINDS)
def test_discount_shifts_the_gradient_towards_early_steps(make_config, kind):
    """On step pairs at a single step k, the gradient under γ = 0.5 is w_k = G γ^k/Σγ^j times the undiscounted one
    (policy = reference at the first update, so also inside dense_dpo's sigmoid): larger than 1 at the first
    step, smaller at a late one, for the per-pair DPO loss and for dense_dpo alike."""
    gamma = 0.5
    weights = torch.tensor([gamma**k for k in range(NUM_STEPS)], dtype=torch.float64)
    weights = NUM_STEPS * weights / weights.sum()
    for loss in ({"kind": "dpo_logprob", "beta": 1.0}, {"kind": "dense_dpo", "kappa": None}):
        base = make_config(kind, loss=loss, train={"grad_clip": 1e9})
        records = _generate(brightness_worker(base), [0, 1, 2, 3])
        disc = make_config(kind, loss=loss, train={"grad_clip": 1e9},
                           time_weight={"mode": "discount", "gamma": gamma})
        for k in (0, 4):
            at_k = records.filter(pc.equal(records["step_index"], k))
            ratio = _first_grad_norm(disc, at_k) / _first_grad_norm(base, at_k)
            assert abs(ratio - float(weights[k])) < 1e-3 * float(weights[k]), (loss["kind"], k, ratio)


def test_discount_draws_early_steps_more_often(make_config):
    cfg = make_config(pairs={"kind": "trajectory"}, loss={"kind": "dense_dpo"},
                      time_weight={"mode": "discount", "gamma": 0.5})
    tw = Learner(cfg).time_weighting
    drawn = tw.sample(4000, torch.Generator().manual_seed(0)).index.double()
    assert drawn.mean() < 1.2  # Cat(0.5^k) over 6 steps has mean ≈ 0.9; uniform would be 2.5
    assert (drawn == 0).double().mean() > 0.45


# ---------------------------------------------------------------- the stable reference


def _reference_events(cfg, records, updates: int) -> tuple[list[dict], Learner]:
    learner = Learner(cfg)
    return [learner.update(records) for _ in range(updates)], learner


@pytest.mark.parametrize("kind", KINDS)
def test_stable_reference_moves_every_tau_steps_until_the_cap_then_freezes_for_good(make_config, kind):
    ref = {"strategy": "stable_update", "tau": 2}
    probe = make_config(kind, reference={**ref, "delta": 1e9}, train={"lr": 5e-2})
    records = _generate(brightness_worker(probe), [0, 1, 2, 3])
    metrics, _ = _reference_events(probe, records, 8)
    d = [m["ref_divergence"] for m in metrics if "ref_divergence" in m]
    assert [i + 1 for i, m in enumerate(metrics) if "ref_divergence" in m] == [2, 4, 6, 8]  # logged every check
    assert d[0] > 0 and d[1] < d[2]
    cfg = make_config(kind, reference={**ref, "delta": (d[1] + d[2]) / 2}, train={"lr": 5e-2})
    metrics, learner = _reference_events(cfg, records, 8)
    moves = [(i + 1, m["ref_replaced"]) for i, m in enumerate(metrics) if "ref_replaced" in m]
    assert moves == [(2, 1.0), (4, 1.0), (6, 0.0)]  # replaced at τ, 2τ; frozen at 3τ; never checked again
    assert learner.reference.frozen and learner.reference.version == 2
    ref_params = {k.replace(".ref.", "."): p for k, p in learner.policy.unet.named_parameters() if ".ref." in k}
    frozen = {k: v.clone() for k, v in ref_params.items()}
    for _ in range(4):
        learner.update(records)
    assert all(torch.equal(frozen[k], v) for k, v in ref_params.items())


@pytest.mark.parametrize("kind", KINDS)
def test_default_divergence_freezes_drift_in_either_direction(make_config, kind):
    """A candidate trained to fit the winners better (denoising-MSE descent on them: ε or velocity) and one trained
    to fit them worse (ascent) both drift from the initial model: the default divergence is > 0 for both and the cap
    freezes both. Eq. 7's log-ratio is negative for the second, so a cap on it would let that drift through."""
    cfg = make_config(kind, reference={"strategy": "stable_update", "tau": 1})
    records = _generate(brightness_worker(cfg), [0, 1, 2, 3])
    learner = Learner(cfg)
    batch = from_table(records)
    learner._remember_winners(batch)
    x0, emb = batch.tensors["x0_w"], learner.policy.encode_prompts(batch.prompts)
    initial = {k: v.clone() for k, v in learner.policy_tensors().items()}

    def fitted(sign: float) -> dict[str, torch.Tensor]:
        learner.policy.copy_into(POLICY, initial)
        opt = torch.optim.SGD(learner.params, lr=0.2)
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            ts = learner.policy.timesteps[torch.randint(0, NUM_STEPS, (len(x0),), generator=g)]
            noise = torch.randn(x0.shape, generator=g)
            out = learner.policy.eps(learner._noised(x0, ts, noise), ts, emb, adapter=POLICY, guidance_scale=1.0)
            opt.zero_grad()
            (sign * (out - learner.policy.process.target(x0, noise, ts)).square().mean()).backward()
            opt.step()
        return {k: v.clone() for k, v in learner.policy_tensors().items()}

    eq7 = Learner(make_config(kind, reference={"strategy": "stable_update", "tau": 1, "divergence": "log_ratio"}))
    eq7._remember_winners(batch)
    for name, cand in (("better", fitted(1.0)), ("worse", fitted(-1.0))):
        d = learner.divergence(cand)
        assert d > 0, name
        assert (eq7.divergence(cand) > 0) == (name == "better"), name  # the one-sided estimate misses "worse"
        learner.reference.delta = d / 2
        event = learner.reference.maybe_update(1, cand, learner.divergence)
        assert event.action == "frozen", name
        learner.reference.frozen = False
