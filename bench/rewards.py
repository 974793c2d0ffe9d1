"""Reward actor batching: scores/s of a reward by batch size, and what request batching buys through Ray.

Two measurements of the same ``RewardWorker``:
- ``score_now`` in process, batch sizes 1 .. 256: the reward's own cost per image against per-call overhead;
- a real async Ray actor (as ``learner.main.launch`` creates it) fed by C concurrent callers, each sending
  requests of ``request_images`` images and waiting for the answer like a rollout actor does: the actor
  merges requests that arrive within ``max_wait_ms`` into one forward pass (images per scored batch > the
  request size shows it), so scores/s grows with C while each caller's latency stays near one pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from actors.reward import RewardWorker
from learner.prompts import load_prompts
from world.scenes import IMAGE_SIZE

BATCH_SIZES = (1, 4, 16, 64, 256)
CALLERS = (1, 2, 4, 8)


def _inputs(n: int, prompts: Sequence[str], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), [prompts[i % len(prompts)] for i in range(n)]


def _rate(fn: Any, images_per_call: int, min_seconds: float) -> tuple[float, float]:
    """(scores/s, ms per call): calls repeated until ``min_seconds`` have passed (at least twice, after a warm-up)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    secs = time.perf_counter() - t0
    return calls * images_per_call / secs, 1e3 * secs / calls


def bench_score_now(spec: dict[str, float], options: dict[str, dict[str, Any]] | None = None,
                    batch_sizes: Sequence[int] = BATCH_SIZES, min_seconds: float = 0.5,
                    prompt_set: str = "world:train") -> list[dict[str, Any]]:
    """scores/s of ``RewardWorker.score_now`` per batch size, in this process (one torch thread)."""
    torch.set_num_threads(1)
    worker = RewardWorker(spec, options, max_batch=max(batch_sizes), torch_threads=1)
    prompts = load_prompts(prompt_set)
    rows = []
    for b in batch_sizes:
        images, texts = _inputs(b, prompts)
        rate, ms = _rate(lambda i=images, t=texts: worker.score_now(i, t), b, min_seconds)
        rows.append({"batch": b, "scores_per_s": rate, "ms_per_call": ms})
    return rows


def bench_actor(spec: dict[str, float], options: dict[str, dict[str, Any]] | None = None,
                callers: Sequence[int] = CALLERS, request_images: int = 32, requests_per_caller: int = 20,
                max_batch: int = 256, max_wait_ms: float = 2.0, prompt_set: str = "world:train"
                ) -> list[dict[str, Any]]:
    """Through one async Ray reward actor, C concurrent callers (driver threads); needs a running Ray."""
    import ray

    actor = ray.remote(RewardWorker).options(num_cpus=1, max_concurrency=256).remote(
        spec, options, max_batch, max_wait_ms)
    images, texts = _inputs(request_images, load_prompts(prompt_set))
    ref = ray.put(images)  # every request ships the same images: time the scoring, not the driver's copies

    def caller(n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            t0 = time.perf_counter()
            ray.get(actor.score.remote(ref, texts))
            latencies.append(time.perf_counter() - t0)
        return latencies

    rows = []
    try:
        caller(3)  # warm-up
        for c in callers:
            before = ray.get(actor.get_stats.remote())
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = [x for got in pool.map(caller, [requests_per_caller] * c) for x in got]
            secs = time.perf_counter() - t0
            after = ray.get(actor.get_stats.remote())
            batches = after["batches"] - before["batches"]
            rows.append({"callers": c, "request_images": request_images,
                         "scores_per_s": c * requests_per_caller * request_images / secs,
                         "images_per_batch": (after["images"] - before["images"]) / max(batches, 1),
                         "latency_ms": 1e3 * sum(lat) / len(lat)})
    finally:
        ray.kill(actor, no_restart=True)
    return rows
