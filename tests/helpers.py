"""Helpers only the tests need: reading a run's metric series back, picking and joining PairBatch rows,
recomputing a stored transition's log-probability, killing a named actor mid-run, and a seeded chaos schedule of
SIGKILLs by OS pid."""

from __future__ import annotations

import json
import os
import random
import signal
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


def complete_jsonl(path: Path) -> list[dict]:
    """The complete records of a JSONL file another process is still appending to (a torn last line is left)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(ln) for ln in text[:text.rfind("\n") + 1].splitlines()]


ROLE_PATTERN = {"rollout": "-rollout-", "reward": "-reward-", "learner": "-learner"}


class Chaos(threading.Thread):
    """SIGKILLs the process of a random actor of a random role (``roles``) of the run in ``out``, by its OS pid,
    ``kills`` times, following ``random.Random(seed)``: every kill lands a random 1-``gap`` updates after the
    previous one (updates logged in metrics.jsonl, counting redone ones) plus a random delay of up to 1.5 s, so
    it falls anywhere in a round. The roles come in shuffled cycles (any 3 consecutive kills hit all 3 roles).

    Fair-play rules, so that every kill is a failure the run must survive and can be checked:
    - only after the current piece (the actors of one ``run()``, named ``dpr-<run>-…``) has logged an update,
      never while its processes are being created or restored, and only before ``stop_step`` (a later round
      still calls the actors, so a dead one is noticed);
    - the next kill waits until the previous one is accounted for: an actor_failed and an actor_recovered event
      for a rollout or reward actor, a new piece for a learner;
    - a learner only once a checkpoint exists (before that, a learner's death means rerunning from the start).
    A target that is already dead or restarting (no pid, or gone before the signal) is retried later and not
    counted: ``killed`` lists only real kills as (role, actor name, pid).
    """

    def __init__(self, out: Path, seed: int, kills: int, stop_step: int, roles: Sequence[str] = tuple(ROLE_PATTERN),
                 gap: int = 3) -> None:
        super().__init__(daemon=True)
        rng = random.Random(seed)
        order = [role for _ in range(kills // len(roles) + 1) for role in rng.sample(list(roles), len(roles))]
        self.plan = [(role, rng.randint(1, gap), rng.uniform(0.0, 1.5)) for role in order[:kills]]
        self.out, self.stop_step, self.pick = out, stop_step, random.Random(seed + 1)
        self.killed: list[tuple[str, str, int]] = []
        self.misses = 0
        self.done = threading.Event()

    def run(self) -> None:
        import ray

        piece, baseline, last_kill_at = "", 0, 0
        while len(self.killed) < len(self.plan) and not self.done.wait(0.2):
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)] if ray.is_initialized() else []
            lines = [m for m in complete_jsonl(self.out / "metrics.jsonl") if "train/loss" in m["metrics"]]
            leads = {n.split("-")[1] for n in names if n.endswith("-learner")}
            if len(leads) == 1 and piece not in leads:
                piece, baseline = leads.pop(), len(lines)
            role, gap, delay = self.plan[len(self.killed)]
            if not (len(lines) > baseline and len(lines) >= last_kill_at + gap and lines[-1]["step"] < self.stop_step
                    and self._accounted_for(piece)):
                continue
            if role == "learner" and not any((self.out / "checkpoints").glob("step-*/manifest.json")):
                continue
            time.sleep(delay)
            targets = sorted(n for n in names if n.startswith(f"dpr-{piece}-") and ROLE_PATTERN[role] in n)
            if targets and self._sigkill(role, self.pick.choice(targets)):
                last_kill_at = len(lines)

    def _accounted_for(self, piece: str) -> bool:
        """The previous kill has been noticed (see the class docstring)."""
        if not self.killed:
            return True
        role, name, _ = self.killed[-1]
        if role == "learner":
            return not name.startswith(f"dpr-{piece}-")
        events = complete_jsonl(self.out / "events.jsonl")
        kills = sum(r == role for r, _, _ in self.killed)
        return all(sum(e["kind"] == kind and e["fields"].get("role") == role for e in events) >= kills
                   for kind in ("actor_failed", "actor_recovered"))

    def _sigkill(self, role: str, name: str) -> bool:
        import ray

        try:
            pid = ray.get(ray.get_actor(name).__ray_call__.remote(lambda _: os.getpid()), timeout=10)
            os.kill(pid, signal.SIGKILL)
        except (ValueError, ProcessLookupError, ray.exceptions.RayError):
            self.misses += 1  # dead, restarting or already gone: try again later
            return False
        self.killed.append((role, name, pid))
        return True

    def counts(self) -> dict[str, int]:
        return {role: sum(r == role for r, _, _ in self.killed) for role in ROLE_PATTERN}
