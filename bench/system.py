"""This system on Ray: ``learner.main.run`` with 1 and 2 rollout actors, sync and async, and in small-box mode
(learner/small_box.py), on the baseline's work.

All configurations share one ``ray.init`` in this process (``run`` reuses it), one torch thread per actor except
in small-box mode, which places the threads itself.
Throughput excludes one-off start-up (Ray, actor creation, the before/after evaluations, the final checkpoint):
it is measured over the training loop only, from the run's metrics.jsonl timestamps — from the "before"
evaluation's line (written just before the loop starts) to the last learner update's line. Chains count the
rollout calls collected in that window; work still in flight when the last update lands is not counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import chains_per_record, make_config
from learner.config import Config

SMALL_BOX = "small box"
# (rollout actors, mode): the small-box row runs 1 actor async with the mode's layout
CONFIGS: tuple[tuple[int, str], ...] = ((1, "sync"), (1, "async"), (2, "sync"), (2, "async"), (1, SMALL_BOX))
QUICK_CONFIGS: tuple[tuple[int, str], ...] = ((2, "async"),)  # a smoke test: each run costs ~20 s of actor start-up
_WANTED = ("dropped_stale_pairs", "actor_batch", "trained_age_mean")


def start_shared_ray(tree: dict[str, Any], max_actors: int) -> bool:
    """Start the one local Ray every configuration (and the broadcast/reward sections) will reuse.

    Sized by the project's own rule for the largest configuration (learner + actors + reward actor CPUs),
    so on a 2-core machine Ray is told 4 CPUs: the processes share the cores (measured, not hidden).
    Returns False when Ray was already running in this process.
    """
    from learner.main import start_ray

    return start_ray(make_config(tree, rollout={"num_actors": max_actors, "torch_threads": 1}))


def window_figures(metrics_path: str | Path, cfg: Config) -> dict[str, Any]:
    """Throughput of the training loop from a run's metrics.jsonl (see the module docstring for the window)."""
    lines = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    evals = [r["time"] for r in lines if "eval/heldout_reward_mean" in r["metrics"]]
    updates = [r for r in lines if r["metrics"].get("train/update_seconds") is not None]
    if not evals or not updates:
        raise ValueError(f"{metrics_path} has no 'before' evaluation or no learner update: did the run finish?")
    start, end = evals[0], updates[-1]["time"]
    wall = end - start
    chains: dict[str, float] = {}
    busy: dict[str, float] = {}
    calls = 0
    for r in lines:
        if not start < r["time"] <= end:
            continue
        for key, value in r["metrics"].items():
            if key.startswith("rollout/actor") and key.endswith("/batch"):
                actor = key.split("/")[1]
                n = value * chains_per_record(cfg)
                calls += 1
                chains[actor] = chains.get(actor, 0.0) + n
                busy[actor] = busy.get(actor, 0.0) + n / r["metrics"][f"rollout/{actor}/chains_per_s"]
    total = sum(chains.values())
    upd_s = sum(r["metrics"]["train/update_seconds"] for r in updates)
    return {"updates": len(updates), "chains": int(total), "wall_s": wall, "images_per_s": total / wall,
            "steps_per_s": total * cfg.sampler.num_steps / wall, "updates_per_s": len(updates) / wall,
            "s_per_update": upd_s / len(updates), "not_training": 1 - upd_s / wall, "update_s": upd_s,
            "generate_s": sum(busy.values()), "chains_per_call": total / calls if calls else float("nan"),
            "gen_chains_per_s": total / sum(busy.values()) if busy else float("nan"),
            "busy_processes": (sum(busy.values()) + upd_s) / wall}


def run_system(tree: dict[str, Any], num_actors: int, mode: str, out_dir: str | Path) -> dict[str, Any]:
    """One ``learner.main.run`` of the configuration; its loop-window figures plus the run's own summary."""
    from learner.main import run
    from learner.small_box import small_box_layout

    small = mode == SMALL_BOX
    cfg = make_config(tree, rollout={"num_actors": num_actors, "torch_threads": 1},
                      train={"mode": "async" if small else mode, "torch_threads": 1},
                      ray={"small_box": "on" if small else "off"}, output={"dir": str(out_dir)})
    summary = run(cfg)
    cfg = small_box_layout(cfg)[0]  # the threads and reward actors the run had
    figures = window_figures(Path(out_dir) / "metrics.jsonl", cfg)
    figures["name"] = (f"small box (1 actor async, {cfg.rollout.torch_threads}+{cfg.train.torch_threads} threads, "
                       "in-process reward)" if small else f"{num_actors} actor{'s' if num_actors > 1 else ''} {mode}")
    figures["total_s"] = summary["seconds"]
    figures.update({k: summary[k] for k in _WANTED if k in summary})
    return figures
