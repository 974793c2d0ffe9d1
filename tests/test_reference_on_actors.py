"""reference.compute_on=actors: the rollout actors store float64 log π_ref with every transition, the learner uses
it instead of its own reference forward when it is fresh, recomputes (and counts) it when the reference moved
since, and a moved reference reaches every rollout actor with a verified checksum."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    LEARNER_SIDE_CASES,
    jsonl,
    kill_when,
    loss_both_ways,
    moved_learner,
    stored_and_float64_ref_logprobs,
    tolerance,
    without_reference,
)

from actors.records import PairBatch, TrajectoryLog, from_table, reference_columns, to_record_batch
from actors.rollout import RolloutWorker
from learner.config import ConfigError
from learner.trainer import Learner
from policy import POLICY, REF
from policy.transport import OBJECT_STORE

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow circle at the bottom"]
ON_ACTORS = {"compute_on": "actors"}
MOVING = {"compute_on": "actors", "strategy": "stable_update", "tau": 1, "delta": 1e9}


def _generate(worker: RolloutWorker, n: int = 4, version: int = 0) -> PairBatch:
    records, _ = worker.generate(PROMPTS[:n], list(range(n)), list(range(n)), expected_version=version)
    return from_table(records)


# ---- (1) what the actors store ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pairs", ["step_branch", "trajectory"])
def test_stored_reference_logprob_is_the_float64_gaussian_density(make_config, pairs):
    cfg = make_config(pairs={"kind": pairs}, reference=ON_ACTORS)
    worker = RolloutWorker(cfg.rollout_settings())
    with torch.no_grad():
        worker.policy.copy_into(POLICY, {k: torch.randn_like(p) * 0.05  # a policy unlike the reference
                                         for k, p in worker.policy.adapter_parameters(POLICY).items()})
        records, stats = worker.generate(PROMPTS[:3], [0, 1, 2], [0, 1, 2], expected_version=0)
        batch = from_table(records)
        stored, want = stored_and_float64_ref_logprobs(worker.policy, batch)
    assert 0 < stats["ref_seconds"] < stats["seconds"]  # the driver's log π_ref cost, within the call's time
    t = batch.tensors
    if pairs == "trajectory":
        policy_logps = torch.cat([t["logps_w"], t["logps_l"]])
        assert (stored - policy_logps).abs().max() > 1e-3  # the reference's, not the sampling policy's
    assert stored.dtype == torch.float64 and bool((t["ref_version"] == 0).all())
    # float-order spread: max 9.3e-04 over 24 seeds (bench/tolerances.py); bound 5e-03 = 5x
    torch.testing.assert_close(stored, want, rtol=0, atol=tolerance("reference_on_actors.stored_logprob"))



def test_the_actors_reference_seconds_add_up_over_its_evaluations(make_config, monkeypatch):
    """``ref_seconds`` sums every log π_ref evaluation of a call (one a branch step), on a clock that ticks once a
    reading."""
    import actors.rollout as rollout

    ticks = iter(range(10**6))
    monkeypatch.setattr(rollout, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                         process_time=lambda: 0.0))
    cfg = make_config(pairs={"kind": "step_branch", "branch_steps": [0, 2, 3]}, reference=ON_ACTORS)
    _, stats = RolloutWorker(cfg.rollout_settings()).generate(PROMPTS[:2], [0, 1], [0, 1], expected_version=0)
    assert stats["ref_seconds"] == 3.0


def test_an_actor_without_a_moving_reference_refuses_one(make_config):
    """A REF broadcast to an actor that holds no moving reference is a wiring error: one line that says why."""
    cfg = make_config(reference=ON_ACTORS)  # the frozen reference: the actor keeps the initial model
    learner, worker = Learner(cfg), RolloutWorker(cfg.rollout_settings())
    why = (r"^actor 0 holds no moving reference \(reference\.compute_on=actors with strategy stable_update\), "
           r"so it cannot load one$")
    with pytest.raises(ValueError, match=why):
        worker.receive_weights(learner.send_weights(0), OBJECT_STORE, REF)

def test_reference_columns_are_all_or_none_and_old_records_still_read(make_config):
    cfg = make_config(reference=ON_ACTORS)
    batch = _generate(RolloutWorker(cfg.rollout_settings()), n=2)
    columns = {k: v for k, v in batch.tensors.items() if k != "ref_logp_l"}
    with pytest.raises(ValueError, match=r"missing columns \['ref_logp_l'\]"):
        to_record_batch("step", {**columns, "prompt": batch.prompts})
    old = to_record_batch("step", {**without_reference(batch).tensors, "prompt": batch.prompts})
    assert not set(reference_columns("step")) & set(from_table(old).tensors)


def test_compute_on_actors_with_diffusion_dpo_is_one_config_line(make_config):
    with pytest.raises(ConfigError, match="compute_on=actors") as err:
        make_config(loss={"kind": "diffusion_dpo"}, reference=ON_ACTORS)
    assert "\n" not in str(err.value)


# ---- (2) the learner's result equals its own reference forward's ----------------------------------------------
def _same_as_learner_side(learner: Learner, batch: PairBatch) -> None:
    """Log-ratios, loss and gradient from the stored log π_ref equal those of the learner's reference forward, up
    to float order: the actor's float32 UNet call (another batch) and the learner's round differently."""
    (loss_a, margin_a, kl_a, grad_a), (loss_b, margin_b, kl_b, grad_b) = loss_both_ways(learner, batch)
    # float-order spread: max 7.3e-04 over 24 seeds (bench/tolerances.py); bound 5e-03 = 7x
    torch.testing.assert_close(margin_a, margin_b, rtol=0, atol=tolerance("reference_on_actors.margin"))
    # float-order spread: max 8.2e-05 over 24 seeds (bench/tolerances.py); bound 5e-04 = 6x
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=tolerance("reference_on_actors.loss"))
    # float-order spread: max 1.8e-04 over 24 seeds (bench/tolerances.py); bound 2e-03 = 11x
    assert kl_a == pytest.approx(kl_b, rel=0, abs=tolerance("reference_on_actors.kl_ref"))
    # float-order spread: max 1.0e-03 over 24 seeds (bench/tolerances.py); bound 5e-03 = 5x
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=tolerance("reference_on_actors.gradient"))


@pytest.mark.parametrize("case", list(LEARNER_SIDE_CASES.values()), ids=list(LEARNER_SIDE_CASES))
def test_stored_reference_gives_the_learner_side_loss(make_config, case):
    cfg = make_config(reference=ON_ACTORS, **case)
    batch = _generate(RolloutWorker(cfg.rollout_settings()))
    if "guidance" in case:
        assert bool(batch.tensors["guided"].any())  # some winners moved: their stored log π_ref is at the moved x_w
    _same_as_learner_side(moved_learner(cfg), batch)


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_a_moving_reference_broadcast_to_the_actor_gives_the_learner_side_loss(make_config, trainable):
    cfg = make_config(reference={**MOVING, "tau": 2}, train={"trainable": trainable})
    worker, learner = RolloutWorker(cfg.rollout_settings()), Learner(cfg)
    metrics = [learner.update(_generate(worker)) for _ in range(3)]  # the reference moves at 2, the policy goes on
    assert metrics[1]["ref_replaced"] == 1.0 and metrics[1]["ref_version"] == 1.0
    assert metrics[1]["ref_recomputed"] == 0 and metrics[2]["ref_recomputed"] == len(_generate(worker))
    policy = worker.receive_weights(learner.send_weights(1))
    ref = worker.receive_weights(learner.send_weights(1, OBJECT_STORE, REF), OBJECT_STORE, REF)
    assert (policy.version, ref.version, worker.ref_version) == (1, 1, 1)
    assert ref.checksum == OBJECT_STORE.send(learner.reference.state, 1, None).checksum
    batch = _generate(worker, version=1)
    assert bool((batch.tensors["ref_version"] == 1).all())
    _same_as_learner_side(learner, batch)


# ---- (3) fresh rows skip the reference forward, stale rows are recomputed and counted ---------------------------
def _count_reference_forwards(monkeypatch, learner: Learner) -> list[object]:
    calls: list[object] = []
    mean = learner.policy.mean

    def counting(x_t, t, emb, adapter=None, eps=None):
        if adapter != POLICY:
            calls.append(adapter)
        return mean(x_t, t, emb, adapter=adapter, eps=eps)

    monkeypatch.setattr(learner.policy, "mean", counting)
    return calls


def test_fresh_rows_skip_the_reference_forward(make_config, monkeypatch):
    cfg = make_config(reference=ON_ACTORS)
    batch = _generate(RolloutWorker(cfg.rollout_settings()))
    learner = Learner(cfg)
    calls = _count_reference_forwards(monkeypatch, learner)
    metrics = learner.update(batch)
    assert calls == [] and metrics["ref_recomputed"] == 0
    learner.update(without_reference(batch))  # records without the columns (an old log) are recomputed, counted
    assert calls == [None]


def test_stale_rows_are_recomputed_and_counted(make_config, monkeypatch):
    cfg = make_config(reference=MOVING, train={"batch_size": 12})
    worker, learner = RolloutWorker(cfg.rollout_settings()), Learner(cfg)
    learner.update(_generate(worker))  # the reference moves to v1; the worker still holds v0
    stale = _generate(worker)
    assert bool((stale.tensors["ref_version"] == 0).all())
    expected = [x.detach() for x in learner.step_logratios(without_reference(stale))[:2]]
    kept, count = learner._stored_reference(stale)
    assert count == len(stale) and not set(reference_columns("step")) & set(kept.tensors)
    got = learner.step_logratios(kept)[:2]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.detach(), b)
    mixed = PairBatch("step", {k: v.clone() for k, v in stale.tensors.items()}, stale.prompts)
    mixed.tensors["ref_version"][:5] = 1  # some rows fresh, some stale: the whole batch is recomputed
    calls = _count_reference_forwards(monkeypatch, learner)
    metrics = learner.update(mixed)
    assert metrics["ref_recomputed"] == len(mixed) - 5 and calls == [REF]


def test_compute_on_learner_ignores_stored_columns(make_config, monkeypatch):
    batch = _generate(RolloutWorker(make_config(reference=ON_ACTORS).rollout_settings()))
    learner = Learner(make_config())
    calls = _count_reference_forwards(monkeypatch, learner)
    metrics = learner.update(batch)
    assert calls == [None] and "ref_recomputed" not in metrics


# ---- (4) real Ray: the moved reference reaches every actor, a restarted one too ----------------------------------
@pytest.mark.slow  # ~1 min (two runs, a restarted actor); the in-process tests above check the same broadcast
def test_moving_reference_reaches_every_actor_on_ray(make_config):
    import ray

    from learner.main import WORKER_ENV, run

    def config(steps: int):
        # slowdown_s: each round sleeps ~0.6 s, so the kill after update 2 lands before the run's last round
        return make_config(rollout={"num_actors": 2, "prompts_per_task": 2, "slowdown_s": [0.05]},
                           reward={"num_actors": 0},
                           train={"mode": "sync", "steps": steps, "batch_size": 12},
                           reference=MOVING, output={"trajectory_log": True, "checkpoint_every": 10})

    cfg = config(4)
    out = Path(cfg.output.dir)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    try:
        killer = kill_when("-rollout-0", out, 2, lambda name: ray.kill(ray.get_actor(name), no_restart=False))
        summary = run(cfg)
        killer.join(timeout=1)
        resumed = run(config(5), resume=True)  # fresh actors get reference v4 from the checkpoint before sampling
    finally:
        ray.shutdown()
    assert summary["steps"] == 4 and summary["actor_failures"] >= 1
    everything = jsonl(out / "events.jsonl")
    cut = next(i for i, e in enumerate(everything) if e["kind"] == "resumed")
    events = everything[:cut]  # the first run's
    recovered = next(i for i, e in enumerate(events) if e["kind"] == "actor_recovered")
    latest = [e["fields"]["version"] for e in events[:recovered] if e["kind"] == "reference_published"][-1]
    resent = [e["fields"] for e in events[:recovered] if e["kind"] == "reference_loaded"][-1]
    assert resent["actor"] == 0 and resent["version"] == latest >= 2  # before it sampled
    published = [e["fields"] for e in events if e["kind"] == "reference_published"]
    loaded = [e["fields"] for e in events if e["kind"] == "reference_loaded"]
    assert [e["version"] for e in published] == [1, 2, 3, 4]
    for p in published:  # every actor loaded every version, and its checksum was the one sent
        got = [e for e in loaded if e["version"] == p["version"]]
        assert {e["actor"] for e in got} == {0, 1}
        assert all(e["checksum"] == p["checksum"] for e in got)
    table = TrajectoryLog(out / "trajectories").read()
    assert sorted(set(table.column("ref_version").to_pylist())) == [0, 1, 2, 3, 4]  # the rounds after each move
    done = next(e["fields"] for e in events if e["kind"] == "done")
    assert done["ref_recomputed"] == 0  # one update per round: every row was fresh, the restarted actor's too
    assert resumed["steps"] == 5 and resumed["ref_recomputed"] == 0
    after = [e["fields"] for e in everything[cut:] if e["kind"] in ("reference_published", "reference_loaded")]
    assert after[0] == {"version": 4, "checksum": published[-1]["checksum"]}
    assert {e["actor"] for e in after[1:3]} == {0, 1} and all(e["version"] == 4 for e in after[1:3])
