"""The roles as plain Python objects (no Ray): rollout records, weight sync, every loss × pair kind × time
weighting × noise process (the tiny UNet with DDIM, tiny SD3 and FLUX with the flow SDE), reference strategies,
NaN handling and exact checkpoint resume."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from conftest import KINDS
from helpers import pair_logprobs, tolerance

from actors.records import from_table
from actors.rollout import RolloutWorker, StaleWeightsError
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.trainer import Learner, NonFiniteLossError

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow circle at the bottom"]


def _records(cfg, n: int = 4, seed0: int = 0) -> pa.RecordBatch:
    worker = RolloutWorker(cfg.rollout_settings())
    batch, stats = worker.generate(PROMPTS[:n], list(range(n)), [seed0 + i for i in range(n)], expected_version=0)
    assert stats["chains"] > 0 and stats["seconds"] > 0
    return batch


@pytest.mark.parametrize("kind", KINDS)
def test_step_records_and_the_learners_sanity_check(make_config, kind):
    cfg = make_config(kind)
    records = _records(cfg)
    batch = from_table(records)
    assert batch.kind == "step" and len(batch) == 4 * 3  # 3 branch steps per chain
    t = batch.tensors
    assert bool((t["reward_w"] >= t["reward_l"]).all())
    assert sorted(set(t["step_index"].tolist())) == [0, 2, 4]
    learner = Learner(cfg)
    lw, ll = pair_logprobs(learner.policy, batch)  # same weights as the sampler: stored log-probs are reproduced
    per_dim = t["x_t"][0].numel()
    gap = max((lw - t["logp_w"]).abs().max(), (ll - t["logp_l"]).abs().max()) / per_dim
    # float-order spread: max 1.9e-06 over 24 seeds (bench/tolerances.py); bound 1e-05 = 5x
    assert gap < tolerance("recomputed_logprob.per_dim")


def test_trajectory_records_share_x_T_and_rank_by_final_reward(make_config):
    cfg = make_config(pairs={"kind": "trajectory"})
    batch = from_table(_records(cfg, n=3))
    t = batch.tensors
    assert batch.kind == "trajectory" and len(batch) == 3
    assert t["latents_w"].shape == (3, 7, 4, 8, 8) and t["logps_w"].shape == (3, 6)
    assert torch.equal(t["latents_w"][:, 0], t["latents_l"][:, 0])  # same x_T (D3PO)
    assert not torch.equal(t["latents_w"][:, -1], t["latents_l"][:, -1])
    assert bool((t["reward_w"] >= t["reward_l"]).all())


def test_weight_sync_by_version_and_checksum(make_config):
    cfg = make_config()
    learner, worker = Learner(cfg), RolloutWorker(cfg.rollout_settings())
    learner.update(_records(cfg))
    state = learner.send_weights(1)
    assert state.version == 1
    with pytest.raises(StaleWeightsError, match="holds weights v0, asked for v1"):
        worker.generate(PROMPTS[:1], [0], [0], expected_version=1)
    report = worker.receive_weights(state)
    assert (report.version, report.checksum) == (1, state.checksum)
    batch = from_table(worker.generate(PROMPTS[:2], [0, 1], [5, 6], expected_version=1)[0])
    assert set(batch.tensors["policy_version"].tolist()) == {1}
    lw, _ = pair_logprobs(learner.policy, batch)  # the learner reproduces what the updated worker sampled
    # float-order spread: max 1.9e-06 over 24 seeds (bench/tolerances.py); bound 1e-05 = 5x
    assert (lw - batch.tensors["logp_w"]).abs().max() / 256 < tolerance("recomputed_logprob.per_dim")


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_raises_the_winner_log_prob_margin(make_config, kind):
    cfg = make_config(kind, train={"lr": 5e-2})
    batch = from_table(_records(cfg))
    learner = Learner(cfg)
    lw0, ll0 = pair_logprobs(learner.policy, batch)
    metrics = learner.update(batch)
    lw1, ll1 = pair_logprobs(learner.policy, batch)
    assert metrics["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert float((lw1 - ll1).mean()) > float((lw0 - ll0).mean())


COMBOS = [
    ("step_branch", "dpo_logprob", {"mode": "uniform"}, {"ratio_clip": 0.5}),
    ("step_branch", "dpo_logprob", {"mode": "discount", "gamma": 0.8}, {}),
    ("step_branch", "dpo_logprob", {"mode": "timestep_aware", "gamma": 0.9}, {}),
    ("step_branch", "dense_dpo", {"mode": "uniform"}, {"kappa": 10.0}),
    ("step_branch", "diffusion_dpo", {"mode": "timestep_aware", "grid": "train"}, {"beta": 50.0}),
    ("trajectory", "dpo_logprob", {"mode": "discount", "discount_as": "weight"}, {}),
    ("trajectory", "dense_dpo", {"mode": "discount", "gamma": 0.9}, {"kappa": 10.0, "num_step_samples": 3}),
    ("trajectory", "dense_dpo", {"mode": "discount", "discount_as": "weight"}, {"kappa": None}),
    ("trajectory", "diffusion_dpo", {"mode": "timestep_aware"}, {"beta": 50.0}),
    ("trajectory", "diffusion_dpo", {"mode": "uniform", "grid": "train"}, {"beta": 50.0}),
    ("trajectory", "ppo", {"mode": "uniform"}, {"clip_range": 0.2, "num_step_samples": 2}),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pairs,loss,time_weight,loss_opts", COMBOS)
def test_every_loss_pair_and_time_weighting_trains(make_config, pairs, loss, time_weight, loss_opts, kind):
    cfg = make_config(kind, pairs={"kind": pairs}, loss={"kind": loss, **loss_opts}, time_weight=time_weight,
                      train={"lr": 2e-2})
    records = _records(cfg, n=3)
    learner = Learner(cfg)
    before = {k: v.clone() for k, v in learner.policy_tensors().items()}
    m1 = learner.update(records)
    m2 = learner.update(records)
    drift = "kl_old" if loss == "ppo" else "kl_ref"  # ppo has no reference: its drift from the sampler's policy
    assert all(torch.isfinite(torch.tensor(m[k])) for m in (m1, m2) for k in ("loss", "grad_norm", drift))
    assert any(not torch.equal(before[k], v) for k, v in learner.policy_tensors().items())
    if pairs == "step_branch" and loss != "diffusion_dpo":  # no random step/noise draw: same loss terms
        assert m2["loss"] < m1["loss"]  # the same batch twice: the second step sees the first's progress


@pytest.mark.parametrize("kind", KINDS)
def test_stable_update_reference_replaces_then_freezes(make_config, kind):
    cfg = make_config(kind, reference={"strategy": "stable_update", "tau": 1, "delta": 1e9,
                                       "divergence": "kernel_kl"}, train={"lr": 5e-2})
    records = _records(cfg)
    learner = Learner(cfg)
    assert learner.ref_adapter is None  # the initial model until the first replacement
    m = learner.update(records)
    assert m["ref_replaced"] == 1.0 and learner.ref_adapter == "ref"
    ref_params = {k.replace(".ref.", "."): p for k, p in learner.policy.unet.named_parameters() if ".ref." in k}
    for k, v in learner.policy_tensors().items():
        assert torch.equal(ref_params[k], v)  # the reference equals the policy right after a replacement
    learner.reference.delta = 1e-12  # now every candidate is too far from the initial model
    m = learner.update(records)
    assert m["ref_frozen"] == 1.0 and m["ref_replaced"] == 0.0 and m["ref_divergence"] > 1e-12
    assert m["ref_divergence"] == m["ref_divergence_kernel_kl"]  # the configured one decides; both are logged
    assert math.isfinite(m["ref_divergence_log_ratio"])
    frozen = {k: v.clone() for k, v in learner.reference.state.items()}
    learner.update(records)
    assert all(torch.equal(frozen[k], v) for k, v in learner.reference.state.items())


def test_a_reinit_reference_trains_against_the_initial_model_again(make_config):
    """past_cap=reinit: once a candidate is past δ the learner's reference is the base model again (no adapter)."""
    cfg = make_config(reference={"strategy": "stable_update", "tau": 1, "delta": 1e9, "past_cap": "reinit"},
                      train={"lr": 5e-2})
    records = _records(cfg)
    learner = Learner(cfg)
    assert learner.update(records)["ref_replaced"] == 1.0 and learner.ref_adapter == "ref"
    learner.reference.delta = 1e-12
    m = learner.update(records)
    assert (m["ref_reinit"], m["ref_replaced"], m["ref_frozen"]) == (1.0, 0.0, 0.0)
    assert learner.ref_adapter is None and learner.method_context().ref_adapter is None


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_kl_divergence_is_zero_for_the_initial_model(make_config, kind):
    """The divergence compares the two models' outputs (velocities on a flow model) on noised winners."""
    cfg = make_config(kind, reference={"strategy": "stable_update", "tau": 1, "divergence": "kernel_kl"})
    learner = Learner(cfg)
    learner._remember_winners(from_table(_records(cfg, n=2)))
    zero = {k: torch.zeros_like(v) for k, v in learner.policy_tensors().items()}
    assert learner.divergence(zero) == 0.0
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in zero.items()}
    assert learner.divergence(moved) > 0


def test_nonfinite_losses_are_skipped_then_stop_the_run(make_config):
    cfg = make_config(train={"max_nan_steps": 2})
    records = _records(cfg, n=2)
    learner = Learner(cfg)
    bad = from_table(records)
    bad.tensors["x_w"] = torch.full_like(bad.tensors["x_w"], float("nan"))
    before = {k: v.clone() for k, v in learner.policy_tensors().items()}
    m = learner.update(bad)
    assert m["skipped_nonfinite"] == 1.0 and learner.step == 0
    assert all(torch.equal(before[k], v) for k, v in learner.policy_tensors().items())
    with pytest.raises(NonFiniteLossError,
                       match=r"2 steps in a row with a non-finite loss or gradient \(the last: its loss"):
        learner.update(bad)


def test_a_nonfinite_gradient_is_named_as_such(make_config, monkeypatch):
    cfg = make_config(train={"max_nan_steps": 1})
    learner = Learner(cfg)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient \(the last: its gradient\)"):
        learner.update(from_table(_records(cfg, n=2)))


def test_checkpoint_resume_is_exact(make_config, tmp_path):
    cfg = make_config(reference={"strategy": "stable_update", "tau": 1, "delta": 1e9},
                      pairs={"kind": "trajectory"}, loss={"kind": "dense_dpo", "kappa": 10.0},
                      time_weight={"mode": "discount"})
    records = _records(cfg, n=3)
    a = Learner(cfg)
    a.update(records)
    groups, state = a.checkpoint()
    path = save_checkpoint(tmp_path / "ck", a.step, groups, state)
    a.update(records)
    a.update(records)
    b = Learner(cfg)
    tensors, loaded = load_checkpoint(path)
    assert b.restore(tensors, loaded) == 1
    b.update(records)
    b.update(records)
    for k, v in a.policy_tensors().items():
        assert torch.equal(v, b.policy_tensors()[k])
    assert a.reference.version == b.reference.version == 3


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_moves_winners_up_the_reward(make_config, kind):
    """TailorPO-G: the gradient goes through x̂_0 (x_t − σ v̂ on a flow model), the VAE and the reward."""
    cfg = make_config(kind, guidance={"kind": "reward_gradient", "eta_lo": 0.5, "eta_hi": 1.0,
                                      "max_grad_norm": 50.0})
    worker = RolloutWorker(cfg.rollout_settings())
    records, stats = worker.generate(PROMPTS, [0, 1, 2, 3], [0, 1, 2, 3], expected_version=0)
    batch = from_table(records)
    t = batch.tensors
    assert t["guided"].any(), "some winners should have been moved"
    # what it delivered, one row per moved winner: a step (in units of the sampling noise) and the log π it cost
    moves = stats["guide_moves"]
    assert moves.shape == (int(t["guided"].sum()), 2) and (moves[:, 0] > 0).all()
    # a guided winner's stored log-prob is its density under the Gaussian it was pushed away from
    learner = Learner(cfg)
    lw, _ = pair_logprobs(learner.policy, batch)
    # float-order spread: max 1.9e-06 over 24 seeds (bench/tolerances.py); bound 1e-05 = 5x
    assert (lw - t["logp_w"]).abs().max() / t["x_t"][0].numel() < tolerance("recomputed_logprob.per_dim")
    assert bool((t["reward_w"] >= t["reward_l"]).all())


def test_gradient_accumulation_takes_the_same_step_as_the_whole_batch(make_config):
    """train.grad_accum splits the batch into micro-batches; their share-weighted gradients add up to the whole
    batch's mean-loss gradient, so the parameters after the step match one whole-batch step (DPO on step pairs with
    uniform weighting has no random draws). A sum of the micro-batch means would triple the gradient norm."""
    cfg = make_config()
    records = _records(cfg)
    learners = [Learner(make_config(train={"grad_accum": k})) for k in (1, 3)]
    metrics = [learner.update(records) for learner in learners]
    # float-order spread: max 0 over 24 seeds (bench/tolerances.py); bound 1e-06 = 8 float32 ulps
    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], rel=tolerance("grad_accum.loss"))
    # float-order spread: max 2.7e-07 over 24 seeds (bench/tolerances.py); bound 2e-06 = 7x
    assert metrics[1]["grad_norm"] == pytest.approx(metrics[0]["grad_norm"], rel=tolerance("grad_accum.grad_norm"))
    for (name, a), b in zip(learners[0].policy_tensors().items(), learners[1].policy_tensors().values(), strict=True):
        # float-order spread: max 7.3e-06 over 24 seeds (bench/tolerances.py); bound 5e-05 = 7x
        torch.testing.assert_close(b, a, rtol=0, atol=tolerance("grad_accum.parameters"), msg=name)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_diffusion_dpo_on_a_flow_model_regresses_the_velocity(make_config, kind, monkeypatch):
    """Flow form of Diffusion-DPO: winner and loser noised at the same σ with the same ε, against the velocity
    target ε − x_0, so x_σ − σ·target gives back each clean latent (an ε target would not)."""
    cfg = make_config(kind, pairs={"kind": "trajectory"}, loss={"kind": "diffusion_dpo", "beta": 50.0})
    batch = from_table(_records(cfg, n=3))
    learner = Learner(cfg)
    seen = []
    mse = learner.denoising_mse
    monkeypatch.setattr(learner, "denoising_mse", lambda x_t, t, emb, target, adapter: seen.append(
        (x_t, t, target)) or mse(x_t, t, emb, target, adapter))
    learner.update(batch)
    x_t, t, target = seen[0]
    x0 = torch.cat([batch.tensors["latents_w"][:, -1], batch.tensors["latents_l"][:, -1]])
    torch.testing.assert_close(x_t - t.view(-1, 1, 1, 1) * target, x0, rtol=1e-5, atol=1e-5)
    assert torch.equal(t[:3], t[3:])  # the same σ and the same ε for winner and loser
    torch.testing.assert_close((target + x0)[:3], (target + x0)[3:])
