"""Helpers only the tests need: reading a run's metric series back, picking and joining PairBatch rows,
recomputing a stored transition's log-probability, and killing a named actor mid-run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from actors.records import PairBatch
from learner.metrics import RunLogger
from policy import DiffusionPolicy
from policy.schedule import gaussian_logprob


def metric_history(run: RunLogger, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of the finite values logged under tag ``name``, read back from metrics.jsonl."""
    lines = [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(line["step"], line["metrics"]) for line in lines]
    if not any(name in metrics for _, metrics in logged):
        known = ", ".join(sorted({tag for _, metrics in logged for tag in metrics})) or "none yet"
        raise KeyError(f"no metric {name!r} was logged; known: {known}")
    return [(step, metrics[name]) for step, metrics in logged if metrics.get(name) is not None]


def select_rows(pairs: PairBatch, idx: Sequence[int] | torch.Tensor | np.ndarray) -> PairBatch:
    """The rows ``idx`` of ``pairs`` (in that order), as new tensors."""
    index = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    tensors = {name: t[index.to(t.device)] for name, t in pairs.tensors.items()}
    return PairBatch(pairs.kind, tensors, [pairs.prompts[i] for i in index.tolist()])


def concat_pairs(batches: Sequence[PairBatch]) -> PairBatch:
    """The rows of ``batches`` one after the other; they must share kind and row shapes."""
    if not batches:
        raise ValueError("concat_pairs needs at least one batch")
    kinds = sorted({b.kind for b in batches})
    if len(kinds) > 1:
        raise ValueError(f"cannot concat PairBatches of different kinds {kinds}")
    tensors = {}
    for name in batches[0].tensors:
        shapes = {tuple(b.tensors[name].shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise ValueError(f"cannot concat column {name!r}: row shapes differ {sorted(shapes)}")
        tensors[name] = torch.cat([b.tensors[name] for b in batches])
    return PairBatch(kinds[0], tensors, [p for b in batches for p in b.prompts])


def recomputed_logprob(policy: DiffusionPolicy, x_t: torch.Tensor, x_prev: torch.Tensor, timestep: torch.Tensor,
                       embeds, **adapter) -> torch.Tensor:
    """log π(x_prev | x_t, c) of stored transitions (batched; ``timestep`` scalar or [B]); ``adapter=`` as in
    ``DiffusionPolicy.mean``."""
    mu, sigma, _ = policy.mean(x_t, timestep, embeds, **adapter)
    return gaussian_logprob(x_prev, mu, sigma, policy.sampler.logprob_reduce)


def jsonl(path: Path) -> list[dict]:
    """The records of a run's JSONL file (metrics.jsonl, events.jsonl); none while it does not exist."""
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def train_steps(out: Path) -> int:
    """Learner updates a run has logged so far."""
    return sum(1 for m in jsonl(out / "metrics.jsonl") if "train/loss" in m["metrics"])


def kill_when(pattern: str, out: Path, after_steps: int, kill: Callable[[str], None], timeout_s: float = 300
              ) -> threading.Thread:
    """A thread that calls ``kill(name)`` on the first named Ray actor whose name contains ``pattern`` once the
    run in ``out`` has made ``after_steps`` learner updates (once; gives up after ``timeout_s``)."""
    import ray

    def killer() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)] if ray.is_initialized() else []
            match = [n for n in names if pattern in n]
            if match and train_steps(out) >= after_steps:
                kill(match[0])
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread
