"""The driver: one loop that feeds rollout records to the learner and publishes weights back (on Ray).

Single controller (veRL's pattern, docs/design.md §1): the actors are dumb RPC targets; all scheduling lives here.
- async mode: every rollout actor always has one ``generate`` in flight; one learner ``update`` is in flight
  whenever enough pairs are buffered; every K updates the policy is published: one ``ray.put`` of the adapter
  bytes, the same ref passed to every actor. An actor runs its calls in order, so a ``set_weights`` sent after
  its in-flight ``generate`` lands exactly at the rollout boundary, and its next call names the new version.
  Records older than ``max_staleness`` published versions are dropped and counted.
- sync mode: strict on-policy rounds (generate on all actors → train on exactly those pairs → publish).
- every load returns (version, keys, checksum) and the driver refuses to go on when a checksum disagrees.
- a rollout actor that dies (Ray restarts it: ``max_restarts=-1``, ``max_task_retries=0``) gets the current
  weights again and its lost call is re-queued; the learner is not restarted — it checkpoints instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from actors.records import TrajectoryLog, iterate_batches
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.config import Config
from learner.metrics import RunLogger, bucket_stats, summary_stats
from learner.plots import save_comparison_grid, save_image_grid, save_reward_curve
from learner.scheduling import PromptStream, ThroughputBalancer

LOG = logging.getLogger("dpr")
EVAL_SEED = 123_457


class WeightSyncError(RuntimeError):
    """An actor reports weights that differ from what was published (a silent no-op sync)."""


class LearnerDiedError(RuntimeError):
    """The learner actor is gone; the run can only continue from a checkpoint."""


@dataclass
class Task:
    actor: int
    prompt_ids: list[int]
    prompts: list[str]
    seeds: list[int]
    version: int
    round: int


@dataclass
class Counters:
    steps: int = 0
    rounds: int = 0
    pairs_seen: int = 0
    pairs_dropped_stale: int = 0
    actor_failures: int = 0
    chains: int = 0
    nonfinite_skipped: int = 0
    staleness_hist: dict[str, int] = field(default_factory=dict)


class Orchestrator:
    def __init__(self, cfg: Config, learner: Any, rollouts: list[Any], rewards: list[Any], out_dir: Path,
                 train_prompts: list[str], eval_prompts: list[str], logger: RunLogger, resume: bool = False):
        self.cfg, self.learner, self.rollouts, self.rewards = cfg, learner, rollouts, rewards
        self.out = out_dir
        self.logger = logger
        self.stream = PromptStream(train_prompts, seed=cfg.train.seed)
        r = cfg.rollout
        self.balancer = ThroughputBalancer(len(rollouts), r.prompts_per_task, r.target_task_seconds,
                                           r.max_prompts_per_task, r.adapt_batch)
        self.eval_prompts = [eval_prompts[i % len(eval_prompts)] for i in range(cfg.eval.num_prompts)]
        self.counters = Counters()
        self.traj_log = TrajectoryLog(out_dir / "trajectories") if cfg.output.trajectory_log else None
        self.buffer: list[pa.RecordBatch] = []
        self.version = 0
        self.state_ref: Any = None
        self.state_checksum = ""
        self.actor_version = [0] * len(rollouts)
        self.pending_syncs: list[tuple[int, Any]] = []
        self.eval_curve: list[tuple[int, float, float]] = []
        self.eval_results: dict[str, dict[str, Any]] = {}
        self.last_checkpoint_step = -1
        self.group: str | None = None  # the collective group when train.weight_sync = collective
        if cfg.train.weight_sync == "collective" and rollouts:
            self._make_group()
        self.before_images: torch.Tensor | None = None
        self.started = time.perf_counter()
        if resume:
            self._resume()

    # ---- weights --------------------------------------------------------------------------------------------------
    def _make_group(self) -> None:
        """A collective group of the learner (rank 0) and every rollout actor: gloo on CPU, nccl on whole GPUs."""
        import ray.util.collective as col

        backend = self.cfg.train.collective_backend
        if backend == "auto":
            on_gpus = self.cfg.train.num_gpus >= 1 and self.cfg.rollout.num_gpus >= 1
            backend = "nccl" if on_gpus else "gloo"
        self.group = f"dpr-weights-{id(self):x}-{self.counters.actor_failures}"
        members = [self.learner, *self.rollouts]
        col.create_collective_group(members, world_size=len(members), ranks=list(range(len(members))),
                                    backend=backend, group_name=self.group)
        self.logger.event("collective_group", name=self.group, backend=backend, size=len(members))

    def _broadcast(self, new_version: bool) -> None:
        """Publish over the collective group: a barrier behind every actor's in-flight rollout."""
        version = self.version + int(new_version)
        refs = [(i, a.receive_weights.remote(self.group, version)) for i, a in enumerate(self.rollouts)]
        sent = self.learner.broadcast_weights.remote(self.group, new_version)
        self.version, self.state_checksum = self._learner(sent)
        self.state_ref = None  # made on demand, for an actor that needs the weights again
        self.pending_syncs.extend(refs)
        self.actor_version = [version] * len(self.rollouts)

    def _publish(self, new_version: bool) -> None:
        if self.group is not None:
            self._broadcast(new_version)
            return
        state = self._learner(self.learner.publish.remote() if new_version else self.learner.current_weights.remote())
        self.version, self.state_checksum = state.version, state.checksum
        self.state_ref = ray.put(state)  # one copy in the object store, the same ref to every actor
        for i, actor in enumerate(self.rollouts):
            self.pending_syncs.append((i, actor.set_weights.remote(self.state_ref)))
            self.actor_version[i] = self.version

    def _check_syncs(self, block: bool = False) -> None:
        """Verify finished weight loads: every actor must report the published checksum."""
        if not self.pending_syncs:
            return
        refs = [ref for _, ref in self.pending_syncs]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        done_set = set(done)
        keep = []
        for i, ref in self.pending_syncs:
            if ref not in done_set:
                keep.append((i, ref))
                continue
            try:
                report = ray.get(ref)
            except RayActorError:
                continue  # the actor died; _recover re-sends weights when its generate fails
            if report.version == self.version and report.checksum != self.state_checksum:
                raise WeightSyncError(f"rollout actor {i} loaded v{report.version} with checksum {report.checksum}, "
                                      f"published {self.state_checksum}: weights did not land")
        self.pending_syncs = keep

    def _recover(self, actor: int, error: Exception) -> None:
        """A rollout actor failed: wait for Ray to restart it, give it the current weights again."""
        self.counters.actor_failures += 1
        self.logger.event("actor_failed", actor=actor, error=type(error).__name__, version=self.version)
        if self.group is not None:  # a restarted actor is not in the group: fall back to the object store
            self.logger.event("weight_sync_fallback", transport="object_store", group=self.group)
            self.group = None
        if self.state_ref is None:
            self.state_ref = ray.put(self._learner(self.learner.current_weights.remote()))
        deadline = time.monotonic() + 120
        while True:
            try:
                report = ray.get(self.rollouts[actor].set_weights.remote(self.state_ref), timeout=60)
                break
            except RayActorError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rollout actor {actor} did not come back after a failure: {e}") from None
                time.sleep(0.5)
        if report.checksum != self.state_checksum:
            raise WeightSyncError(f"rollout actor {actor} reloaded weights with a wrong checksum after restart")
        self.actor_version[actor] = self.version
        self.logger.event("actor_recovered", actor=actor, version=self.version)

    # ---- rollouts -------------------------------------------------------------------------------------------------
    def _submit(self, actor: int, size: int, round_index: int) -> tuple[Any, Task]:
        ids, prompts, seeds = self.stream.take(size)
        task = Task(actor, ids, prompts, seeds, self.actor_version[actor], round_index)
        return self._send(task), task

    def _send(self, task: Task) -> Any:
        task.version = self.actor_version[task.actor]
        return self.rollouts[task.actor].generate.remote(task.prompts, task.prompt_ids, task.seeds, task.version,
                                                         task.round)

    def _collect(self, ref: Any, task: Task) -> pa.RecordBatch | None:
        """The records of a finished generate call, or None after a failure (the task is then re-sent)."""
        try:
            batch, stats = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            if isinstance(e, RayTaskError) and "StaleWeightsError" not in str(e):
                raise
            self._recover(task.actor, e)
            return None
        self.balancer.observe(task.actor, stats["chains"], stats["seconds"])
        self.counters.chains += int(stats["chains"])
        self.logger.log(self.counters.steps, {f"actor{task.actor}/chains_per_s": stats["chains"] / stats["seconds"],
                                               f"actor{task.actor}/steps_per_s": stats["steps"] / stats["seconds"],
                                               f"actor{task.actor}/batch": float(len(task.prompts))}, "rollout")
        if self.traj_log is not None:
            self.traj_log.write(batch, round=task.round, actor_id=task.actor)
        return batch

    def _accept(self, batch: pa.RecordBatch) -> None:
        versions = batch.column("policy_version").to_numpy()
        staleness = self.version - versions
        for s in staleness.tolist():
            self.counters.staleness_hist[str(s)] = self.counters.staleness_hist.get(str(s), 0) + 1
        keep = staleness <= self.cfg.train.max_staleness
        self.counters.pairs_dropped_stale += int((~keep).sum())
        self.counters.pairs_seen += len(batch)
        if keep.any():
            kept = batch.filter(pa.array(keep))
            self.buffer.append(kept)
        self.logger.log(self.counters.steps, {"staleness_mean": float(staleness.mean()),
                                               "dropped_stale_total": float(self.counters.pairs_dropped_stale)},
                        "rollout")
        self._log_rewards(batch)

    def _log_rewards(self, batch: pa.RecordBatch) -> None:
        r = torch.tensor(batch.column("reward_w").to_numpy())  # a copy: Arrow buffers are read-only
        metrics = summary_stats(r, "train_reward_w")
        if "step_index" in batch.schema.names:
            steps = torch.tensor(batch.column("step_index").to_numpy()).long()
            buckets = min(4, self.cfg.sampler.num_steps)
            metrics.update(bucket_stats(r, steps, buckets, self.cfg.sampler.num_steps, name="reward_w"))
        self.logger.log(self.counters.steps, metrics, "rollout")

    def _take(self, n: int) -> pa.Table:
        table = pa.Table.from_batches(self.buffer).combine_chunks()
        take, rest = table.slice(0, n), table.slice(n)
        self.buffer = rest.to_batches() if len(rest) else []
        return take

    @property
    def buffered_pairs(self) -> int:
        return sum(len(b) for b in self.buffer)

    # ---- learner --------------------------------------------------------------------------------------------------
    def _learner(self, ref: Any) -> Any:
        """``ray.get`` of a learner call, turning the learner's death into one actionable line."""
        try:
            return ray.get(ref)
        except RayActorError:
            ckpt = latest_checkpoint(self.out / "checkpoints")
            where = f"the checkpoint at {ckpt}" if ckpt else "the start (no checkpoint was written yet)"
            raise LearnerDiedError(f"the learner actor died at update {self.counters.steps} (out of memory? see "
                                   f"Ray's logs); rerun with --resume to continue from {where}") from None

    def _after_update(self, metrics: dict[str, float], bar: tqdm) -> None:
        c = self.counters
        if metrics.get("skipped_nonfinite"):
            c.nonfinite_skipped += 1
            self.logger.event("nonfinite_loss_skipped", step=c.steps, total=c.nonfinite_skipped)
        else:
            c.steps += 1
        elapsed = time.perf_counter() - self.started
        metrics.update(images_per_s=c.chains / elapsed, steps_per_s=c.steps / elapsed,
                       buffered_pairs=float(self.buffered_pairs), version=float(self.version))
        self.logger.log(c.steps, metrics, "train")
        bar.update(0 if metrics.get("skipped_nonfinite") else 1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}",
                        r_w=f"{metrics['reward_w']:.3f}", img_s=f"{metrics['images_per_s']:.1f}")
        if c.steps and c.steps % self.cfg.output.checkpoint_every == 0:
            self.checkpoint()
        if self.cfg.eval.every and c.steps and c.steps % self.cfg.eval.every == 0 and c.steps < self.cfg.train.steps:
            self.evaluate("eval")

    def _due_publish(self) -> bool:
        return self.counters.steps % self.cfg.train.broadcast_every == 0

    # ---- the two loops ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.rollouts and self.counters.steps == 0:
            self._publish(new_version=False)
        self._check_syncs(block=True)
        if self.counters.steps == 0:
            self.evaluate("before")
        loop = self._run_offline if self.cfg.data.offline_dataset else (
            self._run_sync if self.cfg.train.mode == "sync" else self._run_async)
        with tqdm(total=self.cfg.train.steps, initial=self.counters.steps, desc="learner updates",
                  unit="upd", dynamic_ncols=True) as bar:
            loop(bar)
        if self.last_checkpoint_step != self.counters.steps:
            self.checkpoint()
        final = self.evaluate("after")
        self.logger.event("done", **{k: v for k, v in vars(self.counters).items() if k != "staleness_hist"})
        return final

    def _run_async(self, bar: tqdm) -> None:
        inflight: dict[Any, Task] = {}
        for a in range(len(self.rollouts)):
            ref, task = self._submit(a, self.balancer.size(a), self.counters.rounds)
            inflight[ref] = task
        update_ref = None
        while self.counters.steps < self.cfg.train.steps:
            if update_ref is None and self.buffered_pairs >= self.cfg.train.batch_size:
                update_ref = self.learner.update.remote(self._take(self.cfg.train.batch_size))
            waiting = list(inflight) + ([update_ref] if update_ref is not None else [])
            done, _ = ray.wait(waiting, num_returns=1)
            ref = done[0]
            if ref is update_ref:
                update_ref = None
                self._after_update(self._learner(ref), bar)
                if self._due_publish():
                    self._publish(new_version=True)
                self._check_syncs()
                continue
            task = inflight.pop(ref)
            batch = self._collect(ref, task)
            if batch is None:  # re-send the same work to the restarted actor
                inflight[self._send(task)] = task
                continue
            self._accept(batch)
            self.counters.rounds += 1
            new_ref, new_task = self._submit(task.actor, self.balancer.size(task.actor), self.counters.rounds)
            inflight[new_ref] = new_task
        if update_ref is not None:
            self._after_update(self._learner(update_ref), bar)
        for ref in inflight:  # let in-flight work finish so actors are idle at shutdown
            with contextlib.suppress(RayActorError, RayTaskError):
                ray.get(ref)

    def _run_sync(self, bar: tqdm) -> None:
        r = self.cfg.rollout
        while self.counters.steps < self.cfg.train.steps:
            sizes = self.balancer.split(r.prompts_per_task * len(self.rollouts))
            inflight = dict(self._submit(a, n, self.counters.rounds) for a, n in enumerate(sizes) if n > 0)
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                task = inflight.pop(done[0])
                batch = self._collect(done[0], task)
                if batch is None:
                    inflight[self._send(task)] = task
                else:
                    self._accept(batch)
            self.counters.rounds += 1
            while self.buffered_pairs >= self.cfg.train.batch_size and self.counters.steps < self.cfg.train.steps:
                self._after_update(self._learner(self.learner.update.remote(self._take(self.cfg.train.batch_size))),
                                   bar)
            self.buffer = []  # on-policy: leftovers of this round are not reused
            self._publish(new_version=True)
            self._check_syncs(block=True)

    def _run_offline(self, bar: tqdm) -> None:
        """Off-policy training from a trajectory log, without actors (the dense-reward paper's setting)."""
        table = TrajectoryLog(self.cfg.data.offline_dataset).read()
        self.logger.event("offline_dataset", path=self.cfg.data.offline_dataset, pairs=len(table))
        epoch = self.counters.rounds
        while self.counters.steps < self.cfg.train.steps:
            for batch in iterate_batches(table, self.cfg.train.batch_size, self.cfg.train.seed + epoch):
                if self.counters.steps >= self.cfg.train.steps:
                    break
                self._after_update(self._learner(self.learner.update.remote(batch)), bar)
            epoch = self.counters.rounds = epoch + 1

    # ---- evaluation, checkpoints --------------------------------------------------------------------------------
    def evaluate(self, tag: str) -> dict[str, Any]:
        prompts = self.eval_prompts * self.cfg.eval.seeds_per_prompt
        seeds = [EVAL_SEED + i for i in range(len(prompts))]
        out = self._learner(self.learner.evaluate.remote(prompts, seeds))
        rewards = out["rewards"]
        stats = summary_stats(rewards, "heldout_reward")
        step = self.counters.steps
        self.logger.log(step, stats, "eval")
        self.eval_curve.append((step, stats["heldout_reward_mean"], stats["heldout_reward_sem"]))
        save_reward_curve({"held-out reward (mean ± s.e.)": self.eval_curve}, self.out / "reward_curve.png")
        n = self.cfg.eval.grid_prompts
        if n:
            grid = out["images"][:n]
            captions = prompts[:n]
            save_image_grid(grid, captions, self.out / f"samples_{tag}_step{step:05d}.png", ncol=min(8, n))
            if tag == "before":
                self.before_images = grid
            elif tag == "after" and self.before_images is not None:
                save_comparison_grid({"before": self.before_images, "after": grid}, captions,
                                     self.out / "before_after.png")
        LOG.info("[eval %s] step=%d held-out reward %.4f ± %.4f (n=%d)", tag, step, stats["heldout_reward_mean"],
                 stats["heldout_reward_sem"], len(rewards))
        self.eval_results[tag] = {"step": step, "rewards": rewards, **stats}
        return self.eval_results[tag]

    def checkpoint(self) -> Path:
        groups, state = self._learner(self.learner.checkpoint.remote())
        state["driver"] = {"counters": vars(self.counters), "cursor": self.stream.cursor,
                           "rates": {str(k): v for k, v in self.balancer.rates.items()},
                           # strict JSON: an undefined s.e. (one evaluation sample) is stored as null
                           "eval_curve": [[s, m, e if math.isfinite(e) else None] for s, m, e in self.eval_curve],
                           "trajectory_rounds": self.traj_log.position() if self.traj_log else 0,
                           "elapsed": time.perf_counter() - self.started}
        path = save_checkpoint(self.out / "checkpoints", self.counters.steps, groups, state,
                               keep=self.cfg.output.keep_checkpoints)
        self.last_checkpoint_step = self.counters.steps
        self.logger.event("checkpoint", step=self.counters.steps, path=str(path))
        return path

    def _resume(self) -> None:
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}")
        tensors, state = load_checkpoint(path)
        ray.get(self.learner.restore.remote(tensors, state))
        d = state["driver"]
        self.counters = Counters(**d["counters"])
        self.stream.cursor = int(d["cursor"])
        self.balancer.rates = {int(k): float(v) for k, v in d["rates"].items()}
        self.eval_curve = [(s, m, math.nan if e is None else e) for s, m, e in d["eval_curve"]]
        if self.traj_log is not None:
            self.traj_log.truncate_after(int(d["trajectory_rounds"]) - 1)
        self.started -= float(d["elapsed"])
        self.logger.event("resumed", step=self.counters.steps, path=str(path))
        self._publish(new_version=False)


def held_out_summary(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Before/after held-out means with standard errors, and the paired improvement in units of its s.e."""
    diff = after["rewards"] - before["rewards"]
    se = float(diff.std(correction=1) / math.sqrt(len(diff)))
    return {"before": before["heldout_reward_mean"], "before_se": before["heldout_reward_sem"],
            "after": after["heldout_reward_mean"], "after_se": after["heldout_reward_sem"],
            "gain": float(diff.mean()), "gain_se": se, "gain_in_se": float(diff.mean()) / se if se else math.inf}
