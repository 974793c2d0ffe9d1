"""Wiring: each call site that feeds a formula, checked away from z = 0 (policy ≠ reference).

At policy = reference every log-ratio is 0, and a term inside or outside the sigmoid, or winner and loser swapped,
give the same value and gradient: a wrong wiring passes there. Here each method runs on a stub ``MethodContext``
whose log-ratios and MSEs are large and known, and its loss is compared with a float64 formula of those inputs
(TailorPO Eq. 10, Rethinking-DPO Eq. 6, Dense-reward DPO Eq. 11, Diffusion-DPO Eq. 14); the directions are
checked by the sign of the gradient. Then the call sites outside the methods: which adapter the learner's
reference uses, the direction of the guidance η schedule, and forward noising against ``scheduler.add_noise``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import brightness_worker

from actors.records import PairBatch, from_table
from learner.methods import find_method
from learner.methods.context import MethodContext
from learner.time_weighting import TimeWeightConfig, TimeWeighting
from policy import POLICY
from policy.components import SD15_SCHEDULER
from policy.process import DDIMEpsilon

B, N = 6, 10  # pairs, sampler steps
PROCESS = DDIMEpsilon.from_scheduler(DDIMScheduler(**SD15_SCHEDULER), N)
MODES = [("uniform", "sample"), ("discount", "sample"), ("discount", "weight"), ("timestep_aware", "sample"),
         ("timestep_aware", "weight")]


def _logsigmoid64(z: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-z.double()))


class Stub:
    """Known log-ratios per (pair, grid step): the winner's far above the loser's for some pairs, below for
    others, so z = β s (Δ_w − Δ_l) is large and of both signs; they require grad, so the method's gradient
    direction can be read."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.lw = (3 * torch.randn(B, N, generator=gen, dtype=torch.float64)).requires_grad_()
        self.ll = (3 * torch.randn(B, N, generator=gen, dtype=torch.float64)).requires_grad_()
        self.step_index = torch.randint(0, N, (B,), generator=gen)

    def step_logratios(self, batch):
        rows = torch.arange(B)
        return self.lw[rows, batch.tensors["step_index"]], self.ll[rows, batch.tensors["step_index"]], {}

    def trajectory_logratios(self, batch, k):
        return self.lw.gather(1, k), self.ll.gather(1, k), {}

    def trajectory_logprobs(self, batch, k):  # log π_θ: the log-ratios' values reused, offset from log π_old
        return self.lw.gather(1, k) - 1.0, self.ll.gather(1, k) - 1.0


def _context(stub: Stub, mode: str, discount_as: str, seed: int = 1, **loss) -> MethodContext:
    tw = TimeWeighting(TimeWeightConfig(mode=mode, discount_as=discount_as, gamma=0.7), PROCESS)
    loss = SimpleNamespace(**{"beta": 2.0, "ratio_clip": None, "scale_c": 1.5, "kappa": 4.0, "num_step_samples": 3,
                              "chain_steps": None, **loss})
    return MethodContext(loss, tw, torch.Generator().manual_seed(seed), torch.device("cpu"), PROCESS,
                         None, stub.step_logratios, stub.trajectory_logratios, stub.trajectory_logprobs, None, None,
                         None)


def _batch(kind: str, stub: Stub) -> PairBatch:
    return PairBatch(kind, {"step_index": stub.step_index}, ["p"] * B)


@pytest.mark.parametrize(("mode", "discount_as"), MODES)
def test_dpo_on_step_pairs_puts_lambda_inside_the_sigmoid_and_the_discount_outside(mode, discount_as):
    stub = Stub()
    ctx = _context(stub, mode, discount_as)
    loss = find_method("dpo_logprob", "step")(ctx, _batch("step", stub))[0].loss
    s, w = ctx.time_weighting.weigh(stub.step_index)
    rows = torch.arange(B)
    z = 2.0 * s * (stub.lw[rows, stub.step_index] - stub.ll[rows, stub.step_index])
    expected = -(w * _logsigmoid64(z)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert (stub.lw.grad[rows, stub.step_index] < 0).all() and (stub.ll.grad[rows, stub.step_index] > 0).all()


@pytest.mark.parametrize(("mode", "discount_as"), MODES)
def test_dpo_on_trajectory_pairs_trains_the_step_the_time_weighting_draws(mode, discount_as):
    stub = Stub()
    ctx = _context(stub, mode, discount_as, seed=5)
    loss = find_method("dpo_logprob", "trajectory")(ctx, _batch("trajectory", stub))[0].loss
    steps = ctx.time_weighting.sample(B, torch.Generator().manual_seed(5))  # the same draw
    rows = torch.arange(B)
    z = 2.0 * steps.beta_scale * (stub.lw[rows, steps.index] - stub.ll[rows, steps.index])
    assert float(loss.detach()) == pytest.approx(float(-(steps.weight * _logsigmoid64(z)).mean().detach()), rel=1e-6)


@pytest.mark.parametrize(("mode", "discount_as"), MODES)
def test_dpo_on_trajectory_pairs_trains_every_chain_step_it_names_with_the_chains_label(mode, discount_as):
    stub, positions = Stub(), (0, 3, 7)
    ctx = _context(stub, mode, discount_as, chain_steps=positions)
    loss, metrics = find_method("dpo_logprob", "trajectory")(ctx, _batch("trajectory", stub))
    k = torch.tensor(positions)
    s, w = ctx.time_weighting.weigh(k)  # each term weighed at its own position, λ inside and discount outside
    z = 2.0 * s * (stub.lw[:, k] - stub.ll[:, k])
    assert float(loss.loss.detach()) == pytest.approx(float(-(w * _logsigmoid64(z)).mean().detach()), rel=1e-6)
    assert metrics["step_terms"] == 3 and metrics["trained_step"] == pytest.approx(10 / 3)
    loss.loss.backward()
    untrained = [j for j in range(N) if j not in positions]
    assert (stub.lw.grad[:, k] < 0).all() and (stub.lw.grad[:, untrained] == 0).all()


@pytest.mark.parametrize(("mode", "discount_as"), [("discount", "sample"), ("discount", "weight"),
                                                   ("uniform", "sample")])
def test_dense_dpo_clips_scales_and_discounts_the_shared_steps(mode, discount_as):
    stub = Stub()
    ctx = _context(stub, mode, discount_as, seed=7)
    loss = find_method("dense_dpo", "trajectory")(ctx, _batch("trajectory", stub))[0].loss
    steps = ctx.time_weighting.sample(3, torch.Generator().manual_seed(7))  # M = 3 steps, shared by every pair
    w = steps.weight if discount_as == "weight" else torch.ones(3, dtype=torch.float64)
    lw, ll = (x[:, steps.index].clamp(-4.0, 4.0) for x in (stub.lw, stub.ll))
    z = 1.5 * ((w * lw).mean(1) - (w * ll).mean(1))
    assert float(loss.detach()) == pytest.approx(float(-_logsigmoid64(z).mean().detach()), rel=1e-6)
    if mode == "discount" and discount_as == "weight":
        assert not torch.allclose(w, torch.ones(3, dtype=torch.float64))  # the weights really entered


def test_dense_dpo_on_step_pairs_weighs_each_pair_by_its_branching_steps_discount():
    stub = Stub()
    ctx = _context(stub, "discount", "weight")
    loss = find_method("dense_dpo", "step")(ctx, _batch("step", stub))[0].loss
    _, w = ctx.time_weighting.weigh(stub.step_index)
    rows = torch.arange(B)
    lw, ll = (x[rows, stub.step_index].clamp(-4.0, 4.0) for x in (stub.lw, stub.ll))
    assert float(loss.detach()) == pytest.approx(float(-_logsigmoid64(1.5 * w * (lw - ll)).mean().detach()), rel=1e-6)


@pytest.mark.parametrize("ref_adapter", [None, "ref"])
@pytest.mark.parametrize("mode", ["uniform", "timestep_aware"])
def test_diffusion_dpo_noises_both_children_alike_and_compares_with_the_reference_it_is_given(ref_adapter, mode):
    gen = torch.Generator().manual_seed(3)
    x0_w, x0_l = torch.randn(B, 4, 2, 2, generator=gen), torch.randn(B, 4, 2, 2, generator=gen)
    scale = {POLICY: 1.0, None: 1.7, "ref": 0.6}  # each adapter's model is off by its own factor
    seen = []

    def mse(x_t, t, emb, target, adapter):
        seen.append((x_t, t, target, adapter))
        return scale[adapter] * (x_t - target).square().flatten(1).mean(1)

    stub = Stub()
    tw = TimeWeighting(TimeWeightConfig(mode=mode), PROCESS)
    ctx = MethodContext(SimpleNamespace(beta=50.0), tw, torch.Generator().manual_seed(9), torch.device("cpu"),
                        PROCESS, ref_adapter, stub.step_logratios, stub.trajectory_logratios,
                        stub.trajectory_logprobs, lambda batch: (x0_w, x0_l), mse, lambda prompts: None)
    loss = find_method("diffusion_dpo", "step")(ctx, PairBatch("step", {}, ["p"] * B))[0].loss
    (x_t, t, target, ref_seen), (_, _, _, policy_seen) = seen
    assert (ref_seen, policy_seen) == (ref_adapter, POLICY)
    assert torch.equal(t[:B], t[B:]) and torch.equal(target[:B], target[B:])  # same t and ε for the pair
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    x0 = torch.cat([x0_w, x0_l])
    assert torch.allclose(x_t, scheduler.add_noise(x0, target, t.long()), atol=1e-6)  # forward noising, ε target
    steps = tw.sample(B, torch.Generator().manual_seed(9))
    base = (x_t - target).double().square().flatten(1).mean(1)
    d_w = (1.0 - scale[ref_adapter]) * base[:B]
    d_l = (1.0 - scale[ref_adapter]) * base[B:]
    z = -0.5 * 50.0 * steps.beta_scale * (d_w - d_l)
    assert float(loss.detach()) == pytest.approx(float(-_logsigmoid64(z).mean()), rel=1e-5)


def test_the_learners_reference_is_the_adapter_it_names(make_config):
    """Log-ratios against the reference: the base model while the reference is the initial one; the REF adapter
    once a stable reference was replaced (a learner that kept the base would train against the wrong model)."""
    from learner.trainer import Learner
    from policy import REF

    learner = Learner(make_config(reference={"strategy": "stable_update", "tau": 1, "delta": 1e9}))
    pol = learner.policy

    def nudge() -> None:
        with torch.no_grad():
            for p in learner.params:
                p.add_(0.05 * torch.randn_like(p))

    assert learner.method_context().ref_adapter is None  # no replacement yet: the initial model
    nudge()
    learner.reference.state = learner.policy_tensors()
    pol.copy_into(REF, learner.reference.state, 1)
    nudge()  # policy, reference and base are now three different models
    assert learner.method_context().ref_adapter == REF
    gen = torch.Generator().manual_seed(0)
    x, x_prev = (torch.randn(2, *pol.latent_shape, generator=gen) for _ in range(2))
    t = pol.timesteps[:1].repeat(2)
    emb = pol.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        (got,) = learner._logratios(x, t, emb, x_prev)
        mu, sigma, _ = pol.mean(x, t, emb, adapter=POLICY)
        want, base = (pol.logratio(x_prev, mu, pol.mean(x, t, emb, adapter=a)[0], sigma) for a in (REF, None))
    assert torch.allclose(got, want) and not torch.allclose(got, base, atol=1e-4)


def test_guidance_eta_rises_from_lo_at_the_first_step_to_hi_at_the_last(make_config, monkeypatch):
    """TailorPO-G: 'higher for smaller t' — the rollout passes η(k) of generation step k (k = 0: largest t)."""
    import actors.rollout as rollout

    seen = []
    original = rollout.reward_gradient_step

    def spy(x, reward_fn, eta, **kw):
        seen.append(eta)
        return original(x, reward_fn, eta, **kw)

    monkeypatch.setattr(rollout, "reward_gradient_step", spy)
    cfg = make_config(pairs={"kind": "step_branch", "branch_steps": [0, 2, 5]},
                      guidance={"kind": "reward_gradient", "eta_lo": 0.1, "eta_hi": 0.9})
    worker = brightness_worker(cfg)
    worker.generate(["a red circle"], [0], [0], 0, 0)
    n = cfg.sampler.num_steps
    expected = [0.1 + 0.8 * (1 - math.cos(math.pi * k / (n - 1))) / 2 for k in (0, 2, 5)]
    assert seen == pytest.approx(expected) and seen[0] == pytest.approx(0.1) and seen == sorted(seen)


def test_ppo_trains_each_chain_against_its_samplers_log_probs_with_the_group_advantage():
    """DDPO/GRPO: ρ = exp(log π_θ − log π_old) at the drawn transitions, A = ±1 within each prompt's pair (the
    better chain +1 even when stored as the loser would be a swap), −min(ρA, clip(ρ)A); the gradient raises the
    better chain's log-prob."""
    stub = Stub()
    gen = torch.Generator().manual_seed(11)
    old_w, old_l = (x.detach() - 1.0 + 1e-5 * torch.randn(B, N, generator=gen, dtype=torch.float64)
                    for x in (stub.lw, stub.ll))  # the sampler's: near the policy's, so inside the clip band
    reward_w, reward_l = torch.rand(B, generator=gen) + 1.0, torch.rand(B, generator=gen)
    reward_l[0] = reward_w[0] = 0.5  # a tie: advantage 0, no gradient
    batch = PairBatch("trajectory", {"logps_w": old_w, "logps_l": old_l, "reward_w": reward_w,
                                     "reward_l": reward_l}, ["p"] * B)
    ctx = _context(stub, "uniform", "sample", seed=13, clip_range=0.2, num_step_samples=2)
    loss, metrics = find_method("ppo", "trajectory")(ctx, batch)
    k = ctx.time_weighting.sample(B * 2, torch.Generator().manual_seed(13)).index.view(B, 2)
    adv_w = torch.where(reward_w > reward_l, 1.0, 0.0).double()  # (r − mean) / (std + 1e-4): ±1, 0 for the tie
    expected = 0.0
    for new, old, a in ((stub.lw.gather(1, k) - 1.0, old_w.gather(1, k), adv_w),
                        (stub.ll.gather(1, k) - 1.0, old_l.gather(1, k), -adv_w)):
        rho = torch.exp(new - old)
        expected = expected - torch.minimum(rho * a[:, None], rho.clamp(0.8, 1.2) * a[:, None]).sum()
    assert float(loss.loss.detach()) == pytest.approx(float(expected.detach()) / (2 * B * 2), rel=1e-3, abs=1e-6)
    loss.loss.backward()
    assert (stub.lw.grad[1:].sum(1) < 0).all() and (stub.ll.grad[1:].sum(1) > 0).all()  # descent raises the winner
    assert stub.lw.grad[0].abs().sum() == 0 and stub.ll.grad[0].abs().sum() == 0
    assert metrics["step_terms"] == 2.0


def test_guidance_gets_the_configured_step_and_the_prompts_reach_the_reward(make_config, monkeypatch):
    """The rollout passes guidance.delta and guidance.max_grad_norm to the step, and the reward it climbs is
    scored on the chains' own prompts."""
    import actors.rollout as rollout

    seen: list[dict] = []
    original = rollout.reward_gradient_step

    def spy(x, reward_fn, eta, **kw):
        seen.append(kw)
        return original(x, reward_fn, eta, **kw)

    monkeypatch.setattr(rollout, "reward_gradient_step", spy)
    cfg = make_config(pairs={"kind": "step_branch", "branch_steps": [0]},
                      guidance={"kind": "reward_gradient", "delta": 0.25, "max_grad_norm": 7.0})
    worker = brightness_worker(cfg)
    prompts_seen = []
    local = worker.reward.local
    monkeypatch.setattr(worker.reward, "local", lambda images, prompts: prompts_seen.append(list(prompts))
                        or local(images, prompts))
    worker.generate(["a red circle", "a blue square"], [0, 1], [0, 1], 0, 0)
    assert seen == [{"delta": 0.25, "max_grad_norm": 7.0}]
    prompts = ["a red circle", "a blue square"]
    assert prompts_seen[0] == prompts * 2 and prompts_seen[1:] == [prompts, prompts]  # rank both children; guide


@pytest.mark.parametrize("pairs", [{"kind": "trajectory"}, {"kind": "step_branch", "branch_steps": [0, 3]}])
def test_generate_reports_to_the_driver_what_the_call_made(make_config, pairs):
    """The stats a generate call returns size the driver's batches and fill its reports: chains sampled (two a
    trajectory pair), denoising steps, pairs, network rows, elapsed and CPU seconds, the version and summary of the
    records; each record carries its prompt id, version, actor and round; guided calls add [moved, 2] rows."""
    import time

    from actors.reward import RewardClient
    from actors.rollout import SECOND_CHAIN_SEED_OFFSET
    from actors.stored import record_summary

    guided = pairs["kind"] == "step_branch"
    cfg = make_config(pairs=pairs, **({"guidance": {"kind": "reward_gradient"}} if guided else {}))
    worker = brightness_worker(cfg)
    if not guided:  # the pair's second chain always scores higher, so it must be the winner
        worker.reward = RewardClient(lambda images, prompts: torch.arange(len(images), dtype=torch.float32))
    first, _ = worker.generate(["a red circle"], [7], [0], 0)  # the round defaults to 0; the network rows now > 0
    rows0, t0, cpu0 = worker.policy.net_rows, time.perf_counter(), time.process_time()
    prompts = ["a red circle", "a blue square", "a green triangle", "a blue circle"]
    batch, stats = worker.generate(prompts, [7, 3, 1, 2], [0, 1, 2, 3], 0, round_index=5)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert set(first.column("round").to_pylist()) == {0} and rows0 > 0
    n, steps = len(prompts), cfg.sampler.num_steps
    assert stats["chains"] == (2 * n if pairs["kind"] == "trajectory" else n) and stats["steps"] == n * steps
    assert stats["pairs"] == batch.num_rows and stats["net_rows"] == worker.policy.net_rows - rows0 > 0
    assert 0 < stats["seconds"] <= elapsed and 0 < stats["cpu_seconds"] <= cpu and stats["ref_seconds"] == 0.0
    assert stats["policy_version"] == 0 and "load" not in stats
    assert stats["summary"].keys() == record_summary(batch).keys()
    assert all((stats["summary"][k] == v).all() for k, v in record_summary(batch).items())
    columns = batch.to_pydict()
    assert columns["prompt_id"] == [7, 3, 1, 2] * (batch.num_rows // n) and set(columns["round"]) == {5}
    assert set(columns["policy_version"]) == {0} and "ref_version" not in columns
    assert all(w >= lo for w, lo in zip(columns["reward_w"], columns["reward_l"], strict=True))  # the winner won
    if pairs["kind"] == "trajectory":  # D3PO: both chains of a pair start from one x_T
        tensors = from_table(batch).tensors
        assert torch.equal(tensors["latents_w"][:, 0], tensors["latents_l"][:, 0])
        assert not torch.equal(tensors["latents_w"][:, -1], tensors["latents_l"][:, -1])
        assert columns["seed_w"] == [s + SECOND_CHAIN_SEED_OFFSET for s in range(n)]
    if guided:
        moves = stats["guide_moves"]
        assert moves.ndim == 2 and moves.shape[1] == 2 and len(moves) == sum(columns["guided"])
    else:
        assert "guide_moves" not in stats


def test_simulated_slow_hardware_sleeps_per_chain_and_step_of_its_actor(make_config, monkeypatch):
    """``rollout.slowdown_s`` (the scheduling tests' slower actors): actor i sleeps slowdown_s[i mod len] seconds a
    chain and denoising step of each call."""
    import actors.rollout as rollout

    slept: list[float] = []
    monkeypatch.setattr(rollout.time, "sleep", slept.append)
    cfg = make_config(pairs={"kind": "trajectory"}, rollout={"slowdown_s": [0.5, 0.25]})
    worker = brightness_worker(cfg)
    worker.actor_id = 3
    worker.generate(["a red circle"], [0], [0], 0)
    assert slept == [pytest.approx(0.25 * 2 * cfg.sampler.num_steps)]


def test_a_guided_call_that_moved_no_winner_reports_no_moves(make_config, monkeypatch):
    """Guidance that accepts no step (its reward never rose) still reports its delivery, as zero [0, 2] rows."""
    import actors.rollout as rollout

    original = rollout.reward_gradient_step

    def refuse_all(x, reward_fn, eta, **kw):
        res = original(x, reward_fn, eta, **kw)
        return res._replace(accepted=torch.zeros_like(res.accepted))

    monkeypatch.setattr(rollout, "reward_gradient_step", refuse_all)
    cfg = make_config(pairs={"kind": "step_branch", "branch_steps": [0, 2]}, guidance={"kind": "reward_gradient"})
    batch, stats = brightness_worker(cfg).generate(["a red circle"], [0], [0], 0)
    assert stats["guide_moves"].shape == (0, 2) and not any(batch.column("guided").to_pylist())
