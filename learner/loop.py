"""The driver: three loops that feed rollout records to the learner and publish weights back (on Ray).

Single controller: the actors are plain RPC targets and all scheduling lives here. The driver composes the
weight sync (learner.weights), the pair buffer (learner.buffer), evaluation (learner.report) and checkpoints
(learner.resume).
- async: every rollout actor always has one ``generate`` in flight; one learner ``update`` is in flight
  whenever enough pairs are buffered; every K updates (``train.broadcast_every``) a new version is published, and
  an actor's next ``generate`` carries it (learner.weights). Each ``generate`` names the version its actor will
  hold, and the buffer drops records staler than ``train.max_staleness``.
- sync: strict on-policy rounds (generate on all actors with the round's version → train on exactly those pairs →
  publish).
- offline: training from a trajectory log, without actors (the dense-reward paper's setting).
A rollout actor that fails is restarted by Ray, gets the weights again and its lost call is re-sent; a reward actor
that fails fails the rollout call it was serving, and once Ray has restarted it that call is re-sent (in sync mode
one restarted between rounds, when nobody called it, is noticed by its new process id and logged); the learner
is not restarted (it checkpoints instead) and its death ends the run with a ``--resume`` hint.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from actors.records import TrajectoryLog, iterate_batches
from actors.reward import RewardActorLost
from learner.buffer import PairBuffer, mean_age
from learner.checkpoint import latest_checkpoint
from learner.config import Config
from learner.group import LearnerGroup
from learner.metrics import RunLogger
from learner.report import Evaluator, RolloutStats
from learner.resume import RunCheckpoints
from learner.scheduling import PromptStream, ThroughputBalancer
from learner.weights import WeightSync, open_transport


class LearnerDiedError(RuntimeError):
    """The learner actor is gone; the run can only continue from a checkpoint."""


@dataclass
class Task:
    actor: int
    prompt_ids: list[int]
    prompts: list[str]
    seeds: list[int]
    round: int
    records: Any = None  # the ObjectRef of the last send's record batch (actors.stored)


@dataclass
class Counters:
    steps: int = 0
    rounds: int = 0
    chains: int = 0
    nonfinite_skipped: int = 0
    ref_recomputed: int = 0  # pairs whose actor-computed log π_ref was stale (or missing) and recomputed by the learner
    rollout_waits: int = 0  # async calls held back until the learner had room for their pairs
    actor_net_rows: int = 0  # latents through the rollout actors' networks (policy.DiffusionPolicy.net_rows)
    learner_net_rows: int = 0  # and through the (lead) learner's, in its updates


class Driver:
    def __init__(self, cfg: Config, learners: LearnerGroup, rollouts: list[Any], out: Path, train_prompts: list[str],
                 eval_prompts: list[str], logger: RunLogger, resume: bool = False, rewards: list[Any] | None = None):
        self.cfg, self.learners, self.rollouts, self.out, self.logger = cfg, learners, rollouts, out, logger
        learner = self.learner = learners.lead  # publishes, evaluates and checkpoints for the group
        self.rewards = rewards or []
        self.counters = Counters()
        self.stream = PromptStream(train_prompts, seed=cfg.train.seed)
        r, t = cfg.rollout, cfg.train
        self.balancer = ThroughputBalancer(len(rollouts), r.prompts_per_task, r.target_task_seconds,
                                           r.max_prompts_per_task, r.adapt_batch)
        self.buffer = PairBuffer(t.max_staleness)
        self.pairs_per_prompt: float | None = None
        self.traj_log = TrajectoryLog(out / "trajectories") if cfg.output.trajectory_log else None
        self.rollout_stats = RolloutStats(logger, cfg.sampler.num_steps)
        transport = open_transport(t.weight_sync, t.collective_backend, learner, rollouts,
                                   t.num_gpus >= 1 and r.num_gpus >= 1, logger)
        self.weights = WeightSync(transport, learner, rollouts, self._learner, logger)
        self.evaluator = Evaluator(learner, self._learner, eval_prompts, cfg.eval, out, logger)
        self.checkpoints = RunCheckpoints(learners, self._learner, out / "checkpoints", cfg.output.keep_checkpoints,
                                          logger)
        self.started = time.perf_counter()
        self.defer_checkpoints = cfg.train.mode == "sync" and not cfg.data.offline_dataset
        self.checkpoint_due = False
        if resume:
            self.weights.version = self.checkpoints.restore(self)
            if rollouts:
                self._publish(new_version=False)
                if self.weights.ref_version:
                    self.weights.publish_reference(self.weights.ref_version)

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps``; returns the final held-out evaluation."""
        if self.rollouts and self.counters.steps == 0:
            self._publish(new_version=False)
        self.weights.check(block=True)
        if self.counters.steps == 0:
            self.evaluator.evaluate("before", 0)
        loop = self._run_offline if self.cfg.data.offline_dataset else (
            self._run_sync if self.cfg.train.mode == "sync" else self._run_async)
        with tqdm(total=self.cfg.train.steps, initial=self.counters.steps, desc="learner updates",
                  unit="upd", dynamic_ncols=True) as bar:
            loop(bar)
        self.rollout_stats.log(self.counters.steps, self.buffer.dropped)  # those collected after the last update
        if self.checkpoints.last_step != self.counters.steps:
            self.checkpoints.save(self)
        final = self.evaluator.evaluate("after", self.counters.steps)
        self.logger.event("done", **vars(self.counters), pairs_seen=self.buffer.seen,
                          pairs_dropped_stale=self.buffer.dropped, actor_failures=self.weights.failures)
        return final

    # ---- the three loops --------------------------------------------------------------------------------------
    def _run_async(self, bar: tqdm) -> None:
        t = self.cfg.train
        inflight: dict[Any, Task] = {}
        waiting = dict.fromkeys(range(len(self.rollouts)), False)  # idle actor -> whether it has been held back
        update_ref = None
        while self.counters.steps < t.steps:
            if update_ref is None and self.buffer.ready(t.batch_size, self.weights.version):
                update_ref = self.learners.update(self.buffer.take(t.batch_size, self.counters.steps))
            for a in list(waiting):
                # with no update and no call running, the buffer cannot fill a batch: someone must generate
                size = self.balancer.size(a) if update_ref is None and not inflight else self.balancer.size_within(
                    a, self._room(inflight))
                if size:
                    self.counters.rollout_waits += waiting.pop(a)
                    ref, task = self._submit(a, size)
                    inflight[ref] = task
                else:
                    waiting[a] = True
            done = _ready([*inflight, *([update_ref] if update_ref is not None else [])])
            if update_ref in done:  # first, so that the rollouts re-sent below carry a version it publishes
                self._after_update(self._learner(update_ref), bar)
                update_ref = None
                if self.counters.steps % t.broadcast_every == 0:
                    self._publish()
                self.weights.check()
            for ref in done.intersection(inflight):
                task = inflight.pop(ref)
                if not self._collect(ref, task):  # re-send the same work to the restarted actor
                    inflight[self._send(task)] = task
                    continue
                self.counters.rounds += 1
                waiting[task.actor] = False
        if update_ref is not None:
            self._after_update(self._learner(update_ref), bar)
        for ref in inflight:  # let in-flight work finish so actors are idle at shutdown
            with contextlib.suppress(RayActorError, RayTaskError):
                ray.get(ref)

    def _run_sync(self, bar: tqdm) -> None:
        t = self.cfg.train
        while self.counters.steps < t.steps:
            self.weights.watch_rewards(self.rewards)
            sizes = self.balancer.split(self.cfg.rollout.prompts_per_task * len(self.rollouts))
            inflight = dict(self._submit(a, n) for a, n in enumerate(sizes) if n > 0)
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                task = inflight.pop(done[0])
                if not self._collect(done[0], task):
                    inflight[self._send(task)] = task
            self.counters.rounds += 1
            while len(self.buffer) >= t.batch_size and self.counters.steps < t.steps:
                batch = self.buffer.take(t.batch_size, self.counters.steps)
                self._after_update(self._learner(self.learners.update(batch)), bar)
            self.buffer.clear()  # on-policy: leftovers of this round are not reused
            self._publish()
            self.weights.check(block=True)
            if self.checkpoint_due:
                self.checkpoints.save(self)
                self.checkpoint_due = False

    def _run_offline(self, bar: tqdm) -> None:
        t = self.cfg.train
        table = TrajectoryLog(self.cfg.data.offline_dataset).read()
        self.logger.event("offline_dataset", path=self.cfg.data.offline_dataset, pairs=len(table))
        while self.counters.steps < t.steps:
            for batch in iterate_batches(table, t.batch_size, t.seed + self.counters.rounds):
                if self.counters.steps >= t.steps:
                    break
                if len(batch) < self.learners.size:  # a short last batch with fewer pairs than learners is skipped
                    continue
                self._after_update(self._learner(self.learners.update(batch)), bar)
            self.counters.rounds += 1

    # ---- rollouts and updates ---------------------------------------------------------------------------------
    def _room(self, inflight: dict[Any, Task]) -> float:
        """Prompts whose pairs the learner can still train on before they turn staler than
        ``train.max_staleness``: a new call's records wait behind the buffered ones and those of the calls in
        flight (the buffer serves the oldest first), and the learner uses ``batch_size`` per update."""
        t = self.cfg.train
        if self.pairs_per_prompt is None:  # nothing measured yet
            return math.inf
        window = (t.max_staleness + 1) * t.broadcast_every * t.batch_size
        ahead = len(self.buffer) + self.pairs_per_prompt * sum(len(task.prompts) for task in inflight.values())
        return (window - ahead) / self.pairs_per_prompt

    def _submit(self, actor: int, size: int) -> tuple[Any, Task]:
        ids, prompts, seeds = self.stream.take(size)
        task = Task(actor, ids, prompts, seeds, self.counters.rounds)
        return self._send(task), task

    def _publish(self, new_version: bool = True) -> None:
        self.weights.publish(new_version)
        self.buffer.published(self.weights.version, self.counters.steps)

    def _send(self, task: Task) -> Any:
        """Start ``task``; returns its statistics' ref (the records stay in the object store: ``task.records``)."""
        task.records, stats = self.rollouts[task.actor].generate.options(num_returns=2).remote(
            task.prompts, task.prompt_ids, task.seeds, self.weights.version, task.round,
            self.weights.attach(task.actor))
        return stats

    def _collect(self, ref: Any, task: Task) -> bool:
        """Buffer the records of a finished generate call; False after an actor failure (re-send the task)."""
        try:
            stats = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            if isinstance(e, RewardActorLost):  # the rollout actor is fine; a reward actor it called is not
                self.weights.recover_rewards(self.rewards, task.actor, e)
                return False
            if isinstance(e, RayTaskError) and "StaleWeightsError" not in str(e):
                raise
            self.weights.recover(task.actor, e)
            return False
        self.weights.landed(task.actor, stats.get("load"))
        self.balancer.observe(task.actor, stats["chains"], stats["seconds"], stats.get("cpu_seconds"))
        self.counters.chains += int(stats["chains"])
        self.counters.actor_net_rows += int(stats["net_rows"])
        self.pairs_per_prompt = stats["pairs"] / len(task.prompts)
        a, step = task.actor, self.counters.steps
        self.logger.log(step, {f"actor{a}/chains_per_s": stats["chains"] / stats["seconds"],
                               f"actor{a}/steps_per_s": stats["steps"] / stats["seconds"],
                               f"actor{a}/batch": float(len(task.prompts)),
                               **({f"actor{a}/cpu_s": stats["cpu_seconds"]} if "cpu_seconds" in stats else {})},
                        "rollout")
        if self.traj_log is not None:
            self.traj_log.write(ray.get(task.records), round=task.round, actor_id=a)
        staleness = self.buffer.accept(task.records, int(stats["pairs"]), stats["policy_version"], self.weights.version)
        self.rollout_stats.add(staleness, stats["summary"], stats.get("guide_moves"))
        return True

    def _learner(self, ref: Any) -> Any:
        """``ray.get`` of a learner call, turning the death of the learner (or of any rank of a learner group,
        which also fails the other ranks' collectives) into one actionable line."""
        try:
            return self.learners.get(ref)
        except (RayActorError, RayTaskError) as e:
            if not isinstance(e, RayActorError) and self.learners.alive():
                raise
            ckpt = latest_checkpoint(self.out / "checkpoints")
            where = f"the checkpoint at {ckpt}" if ckpt else "the start (no checkpoint was written yet)"
            who = "the learner actor" if self.learners.size == 1 else "a learner rank"
            raise LearnerDiedError(f"{who} died at update {self.counters.steps} (out of memory? see "
                                   f"Ray's logs); rerun with --resume to continue from {where}") from None

    def _after_update(self, metrics: dict[str, float], bar: tqdm) -> None:
        c, skipped = self.counters, bool(metrics.get("skipped_nonfinite"))
        self.rollout_stats.log(c.steps, self.buffer.dropped)  # the rollouts collected since the last update
        if skipped:
            c.nonfinite_skipped += 1
            self.logger.event("nonfinite_loss_skipped", step=c.steps, total=c.nonfinite_skipped)
        else:
            c.steps += 1
        c.ref_recomputed += int(metrics.get("ref_recomputed", 0))
        c.learner_net_rows += int(metrics.get("net_rows", 0))
        if metrics.get("ref_replaced") and self.rollouts and self.cfg.reference.compute_on == "actors":
            self.weights.publish_reference(int(metrics["ref_version"]))
        elapsed = time.perf_counter() - self.started
        metrics.update(images_per_s=c.chains / elapsed, steps_per_s=c.steps / elapsed,
                       buffered_pairs=float(len(self.buffer)), version=float(self.weights.version))
        self.logger.log(c.steps, metrics, "train")
        bar.update(0 if skipped else 1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}",
                        r_w=f"{metrics['reward_w']:.3f}", img_s=f"{metrics['images_per_s']:.1f}")
        if c.steps and c.steps % self.cfg.output.checkpoint_every == 0:
            if self.defer_checkpoints:  # sync: saved at the round's end, where no pair is buffered (exact resume)
                self.checkpoint_due = True
            else:
                self.checkpoints.save(self)
        if self.cfg.eval.every and c.steps and c.steps % self.cfg.eval.every == 0 and c.steps < self.cfg.train.steps:
            self.evaluator.evaluate("eval", c.steps)

    def summary(self) -> dict[str, Any]:
        """The run's counts for summary.json."""
        c = self.counters
        return {"steps": c.steps, "chains": c.chains, "actor_failures": self.weights.failures,
                "dropped_stale_pairs": self.buffer.dropped, "nonfinite_skipped": c.nonfinite_skipped,
                "ref_recomputed": c.ref_recomputed, "rollout_waits": c.rollout_waits,
                "net_rows": {"actors": c.actor_net_rows, "learner": c.learner_net_rows},
                "staleness": self.buffer.histogram,
                "trained_age": self.buffer.trained_age, "trained_age_mean": mean_age(self.buffer.trained_age),
                "guidance_accept_rate": (self.rollout_stats.guidance_accept_rate
                                         if self.cfg.guidance.kind == "reward_gradient" else None),
                **self.rollout_stats.guidance_delivery,
                "actor_chains_per_s": {str(a): r for a, r in self.balancer.rates.items()},
                "actor_batch": [self.balancer.size(a) for a in range(len(self.rollouts))],
                "actor_call_cost_s": {str(a): {"fixed": c.fixed, "per_chain": c.per_chain}
                                      for a in range(len(self.rollouts)) if (c := self.balancer.cost(a))}}


def _ready(refs: list[Any]) -> set[Any]:
    """Every ref of ``refs`` that is ready, once at least one is (all the calls that finished while the driver
    was busy are handled in one pass: one wait per pass, not per call)."""
    ray.wait(refs, num_returns=1)
    return set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
