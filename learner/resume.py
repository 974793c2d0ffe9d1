"""Checkpoint and resume of a whole run: the learner's own state (``Learner.checkpoint``/``restore``: adapters,
optimizer, RNG) plus the driver's, stored under the key ``driver`` of the same atomic checkpoint.

The driver's state is what a resumed run needs to continue the same schedule: the loop counters, the buffer's
staleness counts, actor failures, the prompt cursor, the per-actor throughput estimates, the held-out reward
curve, the trajectory log's position (rounds written after the checkpoint are dropped) and the elapsed time (a resumed
run's summary covers the whole run: its seconds add this piece's to the checkpoint's). The 'before' evaluation
(rewards and grid) is a tensor group of the checkpoint, for the resumed run's before/after line and image.
Buffered pairs are not saved: a sync run checkpoints at the end of a round, where none are buffered, so its
resume is exact; an async run's resume samples afresh with the restored policy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.group import LearnerGroup
from learner.metrics import RunLogger
from policy.transport import Getter


class RunCheckpoints:
    def __init__(self, learners: LearnerGroup, get: Getter, root: Path, keep: int, logger: RunLogger):
        self.learners, self.get, self.root, self.keep, self.logger = learners, get, root, keep, logger
        self.last_step = -1  # the step of the newest checkpoint this run wrote
        self.restored_elapsed = 0.0  # seconds the run had taken up to the checkpoint it resumed from

    def save(self, driver: Any) -> Path:
        """Write the learner's and ``driver``'s state at the driver's current step."""
        groups, state = self.learners.checkpoint(self.get)
        groups.update(driver.evaluator.state_tensors())
        state["driver"] = driver_state(driver)
        step = driver.counters.steps
        path = save_checkpoint(self.root, step, groups, state, keep=self.keep)
        self.last_step = step
        self.logger.event("checkpoint", step=step, path=str(path))
        return path

    def restore(self, driver: Any) -> int:
        """Load the newest complete checkpoint into every learner rank and ``driver``; returns the published
        version."""
        path = latest_checkpoint(self.root)
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.root}")
        tensors, state = load_checkpoint(path)
        driver.evaluator.load_state_dict(state["driver"], tensors)
        self.get(self.learners.restore(tensors, state))
        load_driver_state(driver, state["driver"])
        self.restored_elapsed = float(state["driver"]["elapsed"])
        self.logger.event("resumed", step=driver.counters.steps, path=str(path))
        return int(state["version"])


def driver_state(d: Any) -> dict[str, Any]:
    return {"counters": dataclasses.asdict(d.counters), "buffer": d.buffer.state_dict(),
            "actor_failures": d.weights.failures, "ref_version": d.weights.ref_version, "cursor": d.stream.cursor,
            "balancer": d.balancer.state_dict(), "guided": [d.rollout_stats.guided, d.rollout_stats.guidable],
            "guide_moved_sums": d.rollout_stats.moved_sums.tolist(),
            **d.evaluator.state_dict(),
            "trajectory_rounds": d.traj_log.position() if d.traj_log else 0,
            "elapsed": time.perf_counter() - d.started}


def load_driver_state(d: Any, state: dict[str, Any]) -> None:
    d.counters = dataclasses.replace(d.counters, **state["counters"])
    d.buffer.load_state_dict(state["buffer"])
    d.weights.failures = int(state["actor_failures"])
    d.weights.ref_version = int(state.get("ref_version", 0))  # absent in checkpoints from before it was broadcast
    d.stream.cursor = int(state["cursor"])
    d.rollout_stats.guided, d.rollout_stats.guidable = state.get("guided", (0, 0))  # absent: older checkpoints
    d.rollout_stats.moved_sums = np.asarray(state.get("guide_moved_sums", (0.0, 0.0)), dtype=np.float64)
    if "balancer" in state:  # absent in checkpoints from before calls were sized from their cost
        d.balancer.load_state_dict(state["balancer"])
    if d.traj_log is not None:
        d.traj_log.truncate_after(int(state["trajectory_rounds"]) - 1)
    d.started -= float(state["elapsed"])
