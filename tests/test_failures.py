"""Failures on real Ray: a reward actor SIGKILLed by its OS pid mid-run (or between rounds) is restarted and the
run finishes its updates; what cannot be recovered names the checkpoint --resume would load; a resumed run's
summary covers the whole run; actors that do not fit the running Ray are refused before any starts; a local Ray
listens on 127.0.0.1. (The seeded chaos schedule over every role is tests/test_chaos.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import jsonl, kill_when

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore")


def _kill_by_pid(pattern: str, out: Path, after_steps: int, killed: list[int]) -> threading.Thread:
    """SIGKILL the process of the named actor matching ``pattern`` once ``after_steps`` updates are logged."""
    import ray

    def sigkill(name: str) -> None:
        pid = ray.get(ray.get_actor(name).__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    return kill_when(pattern, out, after_steps, sigkill, timeout_s=120)


def test_a_reward_actor_killed_by_pid_is_restarted_and_the_run_finishes(make_config):
    import ray

    from learner.main import WORKER_ENV, run

    # slowdown_s: each round sleeps ~1 s, so the run outlasts its first update and the kill lands inside it
    cfg = make_config(reward={"num_actors": 1}, rollout={"num_actors": 1, "prompts_per_task": 4, "slowdown_s": [0.05]},
                      train={"mode": "sync", "steps": 6, "batch_size": 4}, output={"checkpoint_every": 3})
    out = Path(cfg.output.dir)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    try:
        killed: list[int] = []
        thread = _kill_by_pid("-reward-0", out, after_steps=1, killed=killed)
        summary = run(cfg)
        thread.join(timeout=1)
    finally:
        ray.shutdown()
    assert killed, "the reward actor was never killed"
    assert summary["steps"] == 6 and summary["actor_failures"] >= 1
    events = jsonl(out / "events.jsonl")
    failed = [e["fields"] for e in events if e["kind"] == "actor_failed"]
    recovered = [e["fields"] for e in events if e["kind"] == "actor_recovered"]
    assert failed and all(f["role"] == "reward" for f in failed)
    assert len(recovered) == len(failed) and all(r["role"] == "reward" for r in recovered)
    steps = [m["step"] for m in jsonl(out / "metrics.jsonl") if "train/loss" in m["metrics"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # no update lost or done twice


def test_the_resume_hint_names_an_existing_checkpoint_or_says_there_is_none(make_config):
    from learner.checkpoint import save_checkpoint
    from learner.main import resume_hint

    cfg = make_config()
    assert "no checkpoint was written" in resume_hint(cfg) and "--resume" not in resume_hint(cfg)
    import torch

    path = save_checkpoint(Path(cfg.output.dir) / "checkpoints", 2, {"policy": {"w": torch.ones(1)}}, {"step": 2})
    assert resume_hint(cfg) == f"continue with --resume (it loads {path})"


def test_a_local_ray_listens_on_loopback_only():
    code = ("from learner.config import build_config; from learner.main import local_only, start_ray; "
            "cfg = build_config({}); local_only(cfg); start_ray(cfg); import ray; "
            "print({n['NodeManagerAddress'] for n in ray.nodes()})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "{'127.0.0.1'}"


def test_sync_resume_from_a_checkpoint_due_inside_a_round_is_bitwise(make_config, tmp_path):
    """3 updates per round (12 pairs, batch 4); checkpoint_every=2 falls inside the first round, so the save waits
    for the round's end (step 3), where nothing is buffered; resuming from it reproduces step 4 bit for bit."""
    import shutil

    import ray
    import torch

    from learner.checkpoint import load_checkpoint
    from learner.main import WORKER_ENV, run

    sections = {"pairs": {"kind": "step_branch", "branch_steps": [0, 2, 4]},
                "rollout": {"num_actors": 1, "prompts_per_task": 4}, "reward": {"num_actors": 0}}
    full = make_config(**sections, train={"mode": "sync", "steps": 4, "batch_size": 4},
                       output={"checkpoint_every": 2})
    out = Path(full.output.dir)
    resumed_dir = tmp_path / "resumed"
    ray.init(num_cpus=3, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    try:
        run(full)
        assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000004"]
        shutil.copytree(out / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003")
        resumed = make_config(**sections, train={"mode": "sync", "steps": 4, "batch_size": 4},
                              output={"checkpoint_every": 2, "dir": str(resumed_dir)})
        assert run(resumed, resume=True)["steps"] == 4
    finally:
        ray.shutdown()
    a, _ = load_checkpoint(out / "checkpoints" / "step-00000004")
    b, _ = load_checkpoint(resumed_dir / "checkpoints" / "step-00000004")
    assert a["policy"].keys() == b["policy"].keys()
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])


@pytest.mark.slow  # two runs (~25 s); test_sync_resume_from_a_checkpoint_due_inside_a_round_is_bitwise resumes
def test_a_resumed_run_summarizes_the_whole_run(make_config):
    """Run 2 updates, resume the same directory to 4: the summary counts both pieces' chains and seconds, keeps
    the 'before' evaluation from the checkpoint (paired gain) and writes before_after.png again."""
    import json

    import ray

    from learner.checkpoint import latest_checkpoint, load_checkpoint
    from learner.main import WORKER_ENV, run

    sections = {"rollout": {"num_actors": 1, "prompts_per_task": 4}, "output": {"checkpoint_every": 2}}
    first = make_config(**sections, train={"mode": "sync", "steps": 2, "batch_size": 12})
    out = Path(first.output.dir)
    ray.init(num_cpus=3, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    try:
        one = run(first)
        (out / "before_after.png").unlink()
        _, state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        two = run(make_config(**sections, train={"mode": "sync", "steps": 4, "batch_size": 12}), resume=True)
    finally:
        ray.shutdown()
    assert two["steps"] == 4 and two["chains"] == 2 * one["chains"]  # one round of 4 prompts per update
    assert two["seconds"] > state["driver"]["elapsed"]
    assert two["images_per_s"] == two["chains"] / two["seconds"]
    assert (two["before"], two["before_se"]) == (one["before"], one["before_se"])
    assert {"gain", "gain_se", "gain_in_se"} <= two.keys()
    assert json.loads((out / "summary.json").read_text()) == two
    assert (out / "before_after.png").is_file()
    memory = [e["fields"] for e in jsonl(out / "events.jsonl") if e["kind"] == "actor_memory"]
    assert len(memory) == 2 and all(m.keys() == {"learner", "rollout"} for m in memory)
    assert all(0 < m[r]["uss_mb"] <= m[r]["rss_mb"] for m in memory for r in m)


def test_a_reward_actor_restarted_between_rounds_is_logged(tmp_path):
    """Regression (found by the chaos test): a reward actor killed while nobody called it is restarted by Ray and
    no call fails, so the run never saw the failure; the per-round check notices its new process."""
    import ray

    from learner.metrics import RunLogger
    from learner.weights import WeightSync
    from policy.transport import OBJECT_STORE

    class Idle:
        pass

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        actor = ray.remote(Idle).options(max_restarts=-1, num_cpus=0).remote()
        with RunLogger(tmp_path, tensorboard=False) as logger:
            sync = WeightSync(OBJECT_STORE, None, [], ray.get, logger)
            sync.watch_rewards([actor])  # records the process
            sync.watch_rewards([actor])
            assert sync.failures == 0
            os.kill(ray.get(actor.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)
            sync.watch_rewards([actor])  # waits for Ray's restart
    finally:
        ray.shutdown()
    events = jsonl(tmp_path / "events.jsonl")
    assert sync.failures == 1
    assert [(e["kind"], e["fields"]["role"]) for e in events] == [("actor_failed", "reward"),
                                                                  ("actor_recovered", "reward")]


def test_actors_that_do_not_fit_a_running_ray_end_in_one_line_before_any_actor_starts(make_config):
    """Ray already running in this process (2 CPUs): 1 learner + 3 rollout actors ask for 4; the run names the
    largest --num-actors that fits and neither creates an actor nor writes anything."""
    import ray

    from learner.config import ConfigError
    from learner.main import run

    cfg = make_config(rollout={"num_actors": 3})
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with pytest.raises(ConfigError) as e:
            run(cfg)
        assert ray.util.list_named_actors() == []
    finally:
        ray.shutdown()
    assert str(e.value) == ("the actors ask for more than the Ray cluster has (CPU 4 > 2); use --num-actors 1 or "
                            "fewer, or add nodes")
    assert not Path(cfg.output.dir).exists()


def test_the_cluster_check_counts_gpus_and_custom_units_and_waits_for_an_autoscaler(make_config):
    """An 8-GPU node offering 1 learner unit and 7 rollout units. 16 one-GPU rollout actors fit 7."""
    from learner.config import ConfigError
    from learner.preflight import check_cluster

    cfg = make_config(train={"num_gpus": 1}, rollout={"num_actors": 16, "num_gpus": 1}, reward={"num_actors": 1})
    node = {"CPU": 32.0, "GPU": 8.0, "learner": 1.0, "rollout": 7.0, "memory": 1e12}
    with pytest.raises(ConfigError, match=r"\(GPU 17 > 8, rollout 16 > 7\); use --num-actors 7 or fewer"):
        check_cluster(cfg, node)
    check_cluster(cfg, node, autoscaling=True)  # the autoscaler adds L4 nodes: logged, not refused
    check_cluster(make_config(train={"num_gpus": 1}, rollout={"num_actors": 7, "num_gpus": 1}), node)
    with pytest.raises(ConfigError, match="the learner and reward actors alone do not fit"):
        check_cluster(cfg, {**node, "learner": 0.0})
