"""The single-process baseline: the same algorithm with no Ray, the strongest honest loop on one machine.

RolloutWorker (scoring with the in-process reward) and Learner are plain objects in this process, run in turn:
generate a round of chains -> update on ``batch_size`` pairs as many times as the round's records allow ->
send_weights -> receive_weights -> repeat. It runs at the fastest torch thread count (normally all the cores; see
``run_baseline``), the models, sampler, pairs and batch size are the system's, and it makes the same number of
learner updates.

The round holds the fewest chains (at least ``prompts_per_task``) whose pairs fill whole batches, so no
sampled pair is thrown away and every update is strictly on-policy (the system's sync mode drops a round's
leftover pairs instead).
"""

from __future__ import annotations

import math
import time
from typing import Any

import pyarrow as pa
import torch

from bench.common import chains_per_record, count_flops, median_time, pairs_per_prompt
from learner.config import Config
from learner.prompts import load_prompts
from learner.scheduling import PromptStream

PROBE_CHAINS = 8  # at least this many chains per probe generate call


def round_prompts(cfg: Config) -> int:
    """Prompts per round: the least multiple of batch/gcd(batch, pairs per prompt) that is >= prompts_per_task."""
    unit = cfg.train.batch_size // math.gcd(cfg.train.batch_size, pairs_per_prompt(cfg))
    return unit * math.ceil(cfg.rollout.prompts_per_task / unit)


def run_baseline(cfg: Config, updates: int | None = None, threads: tuple[int, ...] = (1, 2),
                 probe_chains: int = PROBE_CHAINS) -> dict[str, Any]:
    """Run ``updates`` (default ``cfg.train.steps``) learner updates in one process; return the figures.

    Before the timed loop a probe times one generate call and one update at each thread count in ``threads``
    and the loop runs with the fastest (normally all cores; but an OpenMP team on cores that other processes
    also use can be many times slower than one thread). The timed window starts after both models are loaded
    and the weights are synced (the system's window likewise starts after actor start-up) and ends after the
    last update.
    """
    from actors.rollout import RolloutWorker
    from learner.trainer import Learner

    updates = updates or cfg.train.steps
    worker, learner = RolloutWorker(cfg.rollout_settings()), Learner(cfg)
    stream = PromptStream(load_prompts(cfg.data.train_prompts), seed=cfg.train.seed)
    size, bs = round_prompts(cfg), cfg.train.batch_size
    probe = thread_probe(worker, learner, stream, max(probe_chains, math.ceil(bs / pairs_per_prompt(cfg))), threads)
    per_chain = {n: 1 / probe["gen_chains_per_s"][n] + probe["update_s"][n] * pairs_per_prompt(cfg) / bs
                 for n in threads}  # seconds of generate + train per chain at n threads
    best = min(per_chain, key=per_chain.__getitem__)
    torch.set_num_threads(best)
    worker.receive_weights(learner.send_weights(learner.version + 1))
    done = chains = age_sum = 0
    gen_s = upd_s = pub_s = 0.0
    t_start = time.perf_counter()
    while done < updates:
        ids, prompts, seeds = stream.take(size)
        t0 = time.perf_counter()
        batch, stats = worker.generate(prompts, ids, seeds, expected_version=worker.version)
        gen_s += time.perf_counter() - t0
        chains += int(stats["chains"])
        table = pa.Table.from_batches([batch])
        for i in range(min(len(table) // bs, updates - done)):
            upd_s += learner.update(table.slice(i * bs, bs))["update_seconds"]
            done += 1
            age_sum += i  # the round's records were sampled i updates before this one
        t0 = time.perf_counter()
        worker.receive_weights(learner.send_weights(learner.version + 1))
        pub_s += time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    ids, prompts, seeds = stream.take(1)  # the work itself, counted once: FLOPs are per chain and per update
    flops_chain = count_flops(lambda: worker.generate(prompts, ids, seeds, worker.version)) / chains_per_record(cfg)
    flops_update = count_flops(lambda: learner.update(table.slice(0, bs)))
    return {"name": f"baseline (1 process, {best} thread{'s' if best > 1 else ''})", "threads": best,
            "updates": done, "chains": chains, "wall_s": wall, "images_per_s": chains / wall,
            "steps_per_s": chains * cfg.sampler.num_steps / wall, "updates_per_s": done / wall,
            "s_per_update": upd_s / done, "not_training": 1 - upd_s / wall, "generate_s": gen_s,
            "update_s": upd_s, "publish_s": pub_s, "round_prompts": size, "gen_chains_per_s": chains / gen_s,
            "chains_per_call": size * chains_per_record(cfg),
            "busy_processes": (gen_s + upd_s) / wall, "trained_age_mean": age_sum / done,
            "probe": probe, "flops_per_chain": flops_chain,
            "flops_per_update": flops_update}


def thread_probe(worker: Any, learner: Any, stream: PromptStream, chains: int, threads: tuple[int, ...]
                 ) -> dict[str, Any]:
    """Chains/s of one generate call and seconds of one update on its records, per torch thread count.

    Why: it picks the baseline's thread count, and it separates "one thread instead of all" from "sharing the
    cores with other processes" when the system's per-actor rates are compared with the baseline's.
    """
    out: dict[str, Any] = {"gen_chains_per_s": {}, "update_s": {}, "chains_per_call": chains}
    bs = learner.cfg.train.batch_size
    for n in threads:
        torch.set_num_threads(n)
        ids, prompts, seeds = stream.take(chains)
        t0 = time.perf_counter()
        batch, stats = worker.generate(prompts, ids, seeds, expected_version=worker.version)
        out["gen_chains_per_s"][n] = stats["chains"] / (time.perf_counter() - t0)
        records = pa.Table.from_batches([batch]).slice(0, bs)
        out["update_s"][n] = median_time(lambda r=records: learner.update(r), 1)
    return out
