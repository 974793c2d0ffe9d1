"""Evaluation and the run's report: fixed-seed held-out samples, image grids, the reward curve, before/after.

Held-out prompts are sampled with the same seeds at every evaluation, so two evaluations differ only by the
policy, and the before/after gain is a paired difference with its own standard error.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.config import EvalConfig
from learner.metrics import RunLogger, bucket_stats, summary_stats
from learner.plots import save_comparison_grid, save_image_grid, save_reward_curve
from policy.transport import Getter

LOG = logging.getLogger("dpr")
EVAL_SEED = 123_457
BEFORE_GROUP = "eval_before"  # the checkpoint tensor group holding the 'before' evaluation


class Evaluator:
    def __init__(self, learner: Any, get: Getter, prompts: list[str], cfg: EvalConfig, out: Path, logger: RunLogger):
        self.learner, self.get, self.out, self.logger = learner, get, out, logger
        self.prompts = [prompts[i % len(prompts)] for i in range(cfg.num_prompts)] * cfg.seeds_per_prompt
        self.seeds = [EVAL_SEED + i for i in range(len(self.prompts))]
        self.grid_prompts = cfg.grid_prompts
        self.curve: list[tuple[int, float, float]] = []  # (step, mean, s.e.)
        self.results: dict[str, dict[str, Any]] = {}  # tag -> the last evaluation under that tag
        self.before_images: torch.Tensor | None = None

    def evaluate(self, tag: str, step: int) -> dict[str, Any]:
        """Held-out rewards of the current policy; updates the curve and writes the sample grids."""
        out = self.get(self.learner.evaluate.remote(self.prompts, self.seeds))
        rewards = out["rewards"]
        stats = summary_stats(rewards, "heldout_reward")
        self.logger.log(step, stats, "eval")
        self.curve.append((step, stats["heldout_reward_mean"], stats["heldout_reward_sem"]))
        save_reward_curve({"held-out reward (mean ± s.e.)": self.curve}, self.out / "reward_curve.png")
        n = self.grid_prompts
        if n:
            grid, captions = out["images"][:n], self.prompts[:n]
            save_image_grid(grid, captions, self.out / f"samples_{tag}_step{step:05d}.png", ncol=min(8, n))
            if tag == "before":
                self.before_images = grid
            elif tag == "after" and self.before_images is not None:
                save_comparison_grid({"before": self.before_images, "after": grid}, captions,
                                     self.out / "before_after.png")
        LOG.info("[eval %s] step=%d held-out reward %.4f ± %.4f (n=%d)", tag, step, stats["heldout_reward_mean"],
                 stats["heldout_reward_sem"], len(rewards))
        self.results[tag] = {"step": step, "rewards": rewards, **stats}
        return self.results[tag]

    def state_dict(self) -> dict[str, Any]:
        """The reward curve in strict JSON: an undefined s.e. (one evaluation sample) is stored as null."""
        return {"eval_curve": [[s, m, e if math.isfinite(e) else None] for s, m, e in self.curve]}

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The 'before' evaluation's rewards and sample grid as a checkpoint tensor group, so that a resumed run
        still reports the paired before/after gain and draws before_after.png."""
        before = self.results.get("before")
        if before is None:
            return {}
        images = {} if self.before_images is None else {"images": self.before_images}
        return {BEFORE_GROUP: {"rewards": before["rewards"], **images}}

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        self.curve = [(s, m, math.nan if e is None else e) for s, m, e in state["eval_curve"]]
        before = tensors.get(BEFORE_GROUP)
        if before is not None:
            rewards = before["rewards"]
            self.results["before"] = {"step": 0, "rewards": rewards, **summary_stats(rewards, "heldout_reward")}
            self.before_images = before.get("images")


class RolloutStats:
    """Staleness and training-reward statistics of the rollout records accepted between two learner updates (per
    step bucket for step pairs), logged once per update: one summary per update instead of one per rollout call,
    which at 64 actors cost the driver ~2 ms a call."""

    def __init__(self, logger: RunLogger, num_steps: int):
        self.logger, self.num_steps = logger, num_steps
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]] = []
        self.guided = self.guidable = 0  # winners guidance moved, of the step pairs of a guided run, all run long
        self.moved_sums = np.zeros(2)  # Σ over the moved winners of (‖x⁺ − x‖/(σ√D), log π deficit), all run long

    def add(self, staleness: int, summary: dict[str, np.ndarray], guide_moves: np.ndarray | None = None) -> None:
        """One call's ``actors.stored.record_summary``, all of its records ``staleness`` versions old, and for a
        guided run the call's ``actors.rollout.guidance_delivery`` rows of its moved winners."""
        rewards = summary["reward_w"]
        self.parts.append((np.full(len(rewards), staleness), rewards, summary.get("step_index"),
                           summary.get("guided"), guide_moves))

    @property
    def guidance_accept_rate(self) -> float | None:
        """The share of step pairs whose winner guidance moved (TailorPO-G's manipulation check); None without
        guidance records."""
        return self.guided / self.guidable if self.guidable else None

    @property
    def guidance_delivery(self) -> dict[str, float | None]:
        """How far guidance moved the winners it moved, in units of the sampling noise, and the log π that cost
        them, each the mean over those winners (None where none moved)."""
        names = ("guidance_shift", "guidance_logp_deficit")
        if not self.guided:
            return dict.fromkeys(names)
        return {name: float(mean) for name, mean in zip(names, self.moved_sums / self.guided, strict=True)}

    def log(self, step: int, dropped: int) -> None:
        """Log what was added since the last call (nothing when nothing was)."""
        if not self.parts:
            return
        staleness, rewards, steps, guided, moves = (None if col[0] is None else np.concatenate(col)
                                                    for col in zip(*self.parts, strict=True))
        self.parts = []
        r = torch.from_numpy(rewards.astype(np.float64))
        metrics = {"staleness_mean": float(staleness.mean()), "dropped_stale_total": float(dropped),
                   **summary_stats(r, "train_reward_w")}
        if steps is not None:
            metrics.update(bucket_stats(r, torch.from_numpy(steps.astype(np.int64)), min(4, self.num_steps),
                                        self.num_steps, name="reward_w"))
        if guided is not None:
            self.guided, self.guidable = self.guided + int(guided.sum()), self.guidable + len(guided)
            metrics["guided_rate"] = float(guided.mean())
        if moves is not None and len(moves):
            self.moved_sums += moves.sum(axis=0)
            metrics["guide_shift"], metrics["guide_logp_deficit"] = (float(v) for v in moves.mean(axis=0))
        self.logger.log(step, metrics, "rollout")


def held_out_summary(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Before/after held-out means with standard errors, and the paired improvement in units of its s.e."""
    diff = after["rewards"] - before["rewards"]
    se = float(diff.std(correction=1) / math.sqrt(len(diff)))
    return {"before": before["heldout_reward_mean"], "before_se": before["heldout_reward_sem"],
            "after": after["heldout_reward_mean"], "after_se": after["heldout_reward_sem"],
            "gain": float(diff.mean()), "gain_se": se, "gain_in_se": float(diff.mean()) / se if se else math.inf}
