"""The reward role: hosts the configured rewards and scores decoded x̂_0 images for many rollout actors.

``RewardWorker`` is a plain class. ``score_now`` scores one request; ``score`` is the coroutine Ray calls when
the worker runs as an async actor: concurrent requests from several rollout actors are queued and scored
together, up to ``max_batch`` images or after ``max_wait_ms``, because one large forward pass of a reward model
costs far less than many small ones. ``RewardClient`` is what a rollout actor holds: a local reward, or
handles to reward actors that it spreads requests over (round robin).
A reward with ``reward.options.<name>.runtime_env`` gets an actor of its own, started in that environment
(``start_reward_actors``); clients add its (weighted) score to the rest, so the main environment never imports it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch

from policy.components import resolve_device
from rewards.base import Reward
from rewards.registry import RewardConfig, build_reward, own_env_rewards


class RewardActorLost(RuntimeError):
    """A reward actor died or is restarting during a call: the caller's whole request is to be sent again once
    Ray has restarted it (the driver does that for a rollout call)."""


class RewardWorker:
    def __init__(self, spec: dict[str, float], options: dict[str, dict[str, Any]] | None = None,
                 max_batch: int = 256, max_wait_ms: float = 2.0, device: str = "auto", torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.device = resolve_device(device)
        self.reward: Reward = build_reward(spec, options).to(self.device)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._pending: list[tuple[torch.Tensor, list[str], asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.stats = {"requests": 0, "batches": 0, "images": 0, "seconds": 0.0}

    def score_now(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score one batch right away (in chunks of ``max_batch``); returns float32 scores on the CPU."""
        t0 = time.perf_counter()
        out = torch.cat([
            self.reward(images[i : i + self.max_batch].to(self.device), list(prompts[i : i + self.max_batch])).cpu()
            for i in range(0, len(prompts), self.max_batch)
        ]).float()
        self.stats["batches"] += 1
        self.stats["images"] += len(prompts)
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    async def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Queue a request; it is scored together with whatever else arrives within ``max_wait_ms``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((images, list(prompts), fut))
        self.stats["requests"] += 1
        if sum(len(p) for _, p, _ in self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            scores = self.score_now(torch.cat([b[0] for b in batch]), [p for b in batch for p in b[1]])
        except Exception as e:  # every waiting caller gets the error, none hangs
            for _, _, fut in batch:
                fut.set_exception(e)
            return
        start = 0
        for images, _, fut in batch:
            fut.set_result(scores[start : start + len(images)])
            start += len(images)

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)


def start_reward_actors(reward: RewardConfig, prefix: str, shared: bool = True, env_vars: dict | None = None
                        ) -> tuple[list[Any], list[Any]]:
    """Start ``reward.num_actors`` shared reward actors for the rewards of the main environment (when ``shared``)
    and one actor per reward with a runtime_env; returns (shared handles, own-environment handles)."""
    import ray

    from cluster.resources import actor_resources

    def start(name: str, spec: dict[str, float], runtime_env: dict | None) -> Any:
        return ray.remote(RewardWorker).options(
            num_cpus=1, max_restarts=-1, max_task_retries=0, max_concurrency=256, name=f"{prefix}-{name}",
            runtime_env=runtime_env, **actor_resources("reward", reward.num_gpus)).remote(
                spec, reward.options, reward.max_batch, reward.max_wait_ms)

    main = reward.main_env_spec()
    handles = [start(f"reward-{i}", main, None) for i in range(reward.num_actors if shared and main else 0)]
    own = [start(f"reward-{name.replace(':', '.')}", {name: reward.spec[name]},
                 uploaded({**env, "env_vars": {**(env_vars or {}), **env.get("env_vars", {})}}))
           for name, env in own_env_rewards(reward.options).items()]
    return handles, own


def uploaded(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """``runtime_env`` with local ``py_modules``/``working_dir`` paths uploaded to the cluster and replaced by
    their URIs. Ray takes local paths only in ``ray.init``'s job-level runtime_env; an actor's must name URIs,
    so this does for one actor what ``ray.init`` does for the job (the same functions of ray 2.60's
    ray/_private/worker.py ``connect``; private, hence pinned in constraints.txt)."""
    import ray
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    scratch = ray._private.worker.global_worker.node.get_runtime_env_dir_path()
    env = upload_py_modules_if_needed(dict(runtime_env), include_gitignore=True, scratch_dir=scratch)
    env = upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=scratch)
    env.pop("excludes", None)  # used by the upload only
    return env


class RewardClient:
    """How a rollout actor (or the learner's evaluation) scores images: in-process, or over reward actors (round
    robin), plus the scores of the own-environment reward actors ``own``, which are added."""

    def __init__(self, local: Reward | None = None, handles: Sequence[Any] = (), own: Sequence[Any] = ()):
        if local is None and not handles and not own:
            raise ValueError("RewardClient needs a local reward or at least one reward actor handle")
        self.local = local
        self.handles = list(handles)
        self.own = list(own)
        self._next = itertools.cycle(range(len(self.handles))) if self.handles else None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The main part (in-process when there is a local reward, else over the reward actors) + the own parts."""
        prompts, refs = list(prompts), []
        remote_main = self.local is None and bool(self.handles)
        if remote_main or self.own:  # remote parts first, so they run while the local part is scored
            on_cpu = images.detach().cpu()
            refs = [h.score.remote(on_cpu, prompts) for h in self.own]
            if remote_main:
                refs.append(self.handles[next(self._next)].score.remote(on_cpu, prompts))
        local = self.local(images, prompts).detach().float().cpu() if self.local is not None else 0.0
        if not refs:
            return local
        import ray
        from ray.exceptions import RayActorError

        try:
            return local + sum(ray.get(refs))
        except RayActorError as e:
            raise RewardActorLost(f"a reward actor is unavailable ({type(e).__name__})") from None
