"""Small-box mode: the layout of a local run on a machine with few cores (a laptop, a 2-core CI box).

Why: a learner, a rollout actor and a reward actor with one core each time-share two cores, and the system runs
slower than one process that alternates sampling and training on every core. What can win there is overlap, not
more processes: one rollout actor that scores rewards in its own process (no reward actor, no round trip per
ranking) sampling while the learner trains beside it, one torch thread each, so the two processes hold one core
each. Not two threads for the rollout actor: an OpenMP team is only as fast as its slowest thread, and any other
runnable thread on the box (here the learner's) stalls it (measured on the 2-core box while other jobs ran:
0.25 chains/s with 2 threads against 1.00 with 1, the same calls).
``ray.small_box: auto`` turns the mode on for a local run on at most ``MAX_CORES`` cores that asks for one
rollout actor; ``on``/``off`` force it. Only the placement changes (threads, where rewards are scored), never
the algorithm, so a run is comparable with and without it.
"""

from __future__ import annotations

import os
from typing import Any

from learner.config import Config

MAX_CORES = 2  # auto: the mode is for machines with at most this many cores


def wants_small_box(cfg: Config, cores: int | None = None) -> bool:
    """Whether ``cfg`` runs in small-box mode on a machine with ``cores`` (default: this one's)."""
    if cfg.ray.small_box != "auto":
        return cfg.ray.small_box == "on"
    cores = cores or cfg.ray.num_cpus or os.cpu_count() or 1
    return (not cfg.ray.address and cores <= MAX_CORES and cfg.rollout.num_actors == 1
            and cfg.train.num_learners == 1 and cfg.rollout.num_gpus == 0 and cfg.train.num_gpus == 0
            and not cfg.data.offline_dataset)


def small_box_layout(cfg: Config, cores: int | None = None) -> tuple[Config, dict[str, Any]]:
    """``cfg`` placed for a small box (unchanged when the mode is off) and the settings that changed."""
    if not wants_small_box(cfg, cores):
        return cfg, {}
    wanted = {("rollout", "num_actors"): 1, ("rollout", "torch_threads"): 1, ("train", "torch_threads"): 1,
              ("reward", "num_actors"): 0}
    changed = {f"{s}.{k}": v for (s, k), v in wanted.items() if getattr(getattr(cfg, s), k) != v}
    sections = {s: getattr(cfg, s).model_copy(update={k: v for (s2, k), v in wanted.items() if s2 == s})
                for s in {s for s, _ in wanted}}
    return cfg.model_copy(update=sections), changed
