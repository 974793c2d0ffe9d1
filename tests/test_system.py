"""The whole system on real Ray actors (CPU): async/sync loops, both pair kinds, guidance, reference strategies,
actor death and recovery, heterogeneous actor speeds, resume, off-policy training, clear failures."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import ray
from helpers import jsonl, kill_when

from learner.main import WORKER_ENV, main, run

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    yield
    ray.shutdown()


def _events(out: Path) -> list[str]:
    return [e["kind"] for e in jsonl(out / "events.jsonl")]


def _kill_when(pattern: str, out: Path, after_steps: int = 1) -> threading.Thread:
    """ray.kill the named actor matching ``pattern`` once the run has made ``after_steps`` learner updates."""
    return kill_when(pattern, out, after_steps,
                     lambda name: ray.kill(ray.get_actor(name), no_restart=pattern.endswith("learner")))


def test_async_step_branch_survives_a_killed_rollout_actor(make_config):
    # rewards scored in the rollout actors here and below: one process fewer to start (reward actors:
    # test_failures.py, test_reward_env.py). Each call sleeps ~1 s (slowdown_s) so that the run outlasts its first
    # update by several calls: without it the whole run took 2 s and could end before the kill landed.
    cfg = make_config(
        rollout={"num_actors": 2, "prompts_per_task": 4, "slowdown_s": [0.05]}, reward={"num_actors": 0},
        train={"mode": "async", "steps": 6, "batch_size": 8, "max_staleness": 2},
        reference={"strategy": "stable_update", "tau": 2, "delta": 1e9, "divergence": "kernel_kl"},
        time_weight={"mode": "timestep_aware"}, output={"trajectory_log": True, "checkpoint_every": 3},
    )
    out = Path(cfg.output.dir)
    killer = _kill_when("-rollout-0", out)
    summary = run(cfg)
    killer.join(timeout=1)
    assert summary["steps"] == 6  # the run still made every update
    assert summary["actor_failures"] >= 1
    events = _events(out)
    assert "actor_failed" in events and "actor_recovered" in events
    metrics = jsonl(out / "metrics.jsonl")
    assert any(m["metrics"].get("train/ref_replaced") == 1.0 for m in metrics)
    assert any("rollout/staleness_mean" in m["metrics"] for m in metrics)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]
    assert list((out / "trajectories").rglob("*.parquet"))
    for png in ("before_after.png", "reward_curve.png"):
        assert (out / png).stat().st_size > 0
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_sync_trajectory_dense_dpo_balances_heterogeneous_actors(make_config):
    cfg = make_config(
        pairs={"kind": "trajectory"}, loss={"kind": "dense_dpo", "kappa": 10.0, "num_step_samples": 2},
        time_weight={"mode": "discount", "gamma": 0.9},
        rollout={"num_actors": 2, "prompts_per_task": 6, "slowdown_s": [0.0, 0.02]}, reward={"num_actors": 0},
        train={"mode": "sync", "steps": 6, "batch_size": 4},
    )
    summary = run(cfg)
    assert summary["steps"] == 6 and summary["dropped_stale_pairs"] == 0  # on-policy rounds
    rates = summary["actor_chains_per_s"]
    assert rates["0"] > rates["1"]
    batches = {}
    for m in jsonl(Path(cfg.output.dir) / "metrics.jsonl"):
        for a in (0, 1):
            if f"rollout/actor{a}/batch" in m["metrics"]:
                batches[a] = m["metrics"][f"rollout/actor{a}/batch"]
    assert batches[1] < batches[0], f"the slow actor should get less work per round: {batches}"


# Slow: three runs (~25 s). The default suite resumes in test_failures.py; this is its only offline-training run.
@pytest.mark.slow
def test_guidance_with_resume_then_off_policy_training(make_config, tmp_path):
    cfg = make_config(
        guidance={"kind": "reward_gradient", "eta_lo": 0.3, "eta_hi": 0.6, "max_grad_norm": 20.0},
        train={"mode": "sync", "steps": 2, "batch_size": 6}, output={"checkpoint_every": 1, "trajectory_log": True},
    )
    out = Path(cfg.output.dir)
    assert run(cfg)["steps"] == 2
    resumed = make_config(
        guidance={"kind": "reward_gradient", "eta_lo": 0.3, "eta_hi": 0.6, "max_grad_norm": 20.0},
        train={"mode": "sync", "steps": 3, "batch_size": 6}, output={"checkpoint_every": 1, "trajectory_log": True},
    )
    assert run(resumed, resume=True)["steps"] == 3
    assert _events(out).count("resumed") == 1
    offline = make_config(data={"offline_dataset": str(out / "trajectories")}, train={"steps": 2, "batch_size": 4},
                          output={"dir": str(tmp_path / "offline")})
    summary = run(offline)
    assert summary["steps"] == 2 and summary["chains"] == 0  # no rollout actor ran


def test_nonfinite_losses_stop_the_run_with_one_line(make_config, capsys, tmp_path):
    cfg_path = tmp_path / "nan.yaml"
    base = make_config(train={"steps": 6, "lr": 1e30, "max_nan_steps": 2, "mode": "sync", "batch_size": 4})
    import yaml

    cfg_path.write_text(yaml.safe_dump(base.model_dump(mode="json")))
    assert main(["--config", str(cfg_path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the progress bar
    assert last.startswith("error: ") and "non-finite loss or gradient" in last and "lower train.lr" in last


def test_a_dead_learner_is_reported_with_the_resume_hint(make_config, capsys, tmp_path):
    cfg_path = tmp_path / "dead.yaml"
    base = make_config(train={"steps": 400, "mode": "sync", "batch_size": 4}, output={"checkpoint_every": 1})
    import yaml

    cfg_path.write_text(yaml.safe_dump(base.model_dump(mode="json")))
    killer = _kill_when("-learner", Path(base.output.dir), after_steps=2)
    assert main(["--config", str(cfg_path)]) == 2
    killer.join(timeout=1)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the learner actor died") and "--resume" in last


def test_collective_weight_broadcast_with_gloo(make_config):
    cfg = make_config(rollout={"num_actors": 2, "prompts_per_task": 4}, reward={"num_actors": 0},
                      train={"mode": "async", "steps": 4, "batch_size": 8, "max_staleness": 3,
                             "weight_sync": "collective", "collective_backend": "auto"})
    summary = run(cfg)
    assert summary["steps"] == 4 and summary["actor_failures"] == 0
    events = jsonl(Path(cfg.output.dir) / "events.jsonl")
    group = [e["fields"] for e in events if e["kind"] == "collective_group"]
    assert group and group[0]["backend"] == "gloo" and group[0]["size"] == 3
    versions = set()
    for m in jsonl(Path(cfg.output.dir) / "metrics.jsonl"):
        versions.add(m["metrics"].get("train/version"))
    assert max(v for v in versions if v is not None) >= 3  # published over the group; checksums verified
