"""Helpers only the tests need (and bench/tolerances.py, which re-runs their float-order comparisons): the small test
config and the bounds of those comparisons (``tolerance``), reading a run's metric series back, picking and joining
PairBatch rows, log-probabilities recomputed, stored by an actor and in float64, killing a named actor mid-run, and
a seeded chaos schedule of SIGKILLs by OS pid."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from actors.records import PairBatch, reference_columns
from learner.metrics import RunLogger
from policy import POLICY, DiffusionPolicy
from policy.schedule import gaussian_logprob

ROOT = Path(__file__).resolve().parent.parent
TOLERANCES = ROOT / "bench" / "tolerances.json"
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow circle at the bottom"]


def small_config(model_dir: Path, out_dir: Path, **sections):
    """A small experiment config on the tiny random model; keyword overrides are ``section={key: value}``."""
    from learner.config import build_config

    tree = {
        "model": {"path": str(model_dir)},
        "sampler": {"num_steps": 6, "guidance_scale": 3.0, "logprob_reduce": "sum"},
        "lora": {"rank": 2, "alpha": 2.0},
        "pairs": {"kind": "step_branch", "branch_steps": [0, 2, 4]},
        "loss": {"kind": "dpo_logprob", "beta": 1.0},
        "reward": {"spec": {"world": 1.0}, "num_actors": 0},
        "rollout": {"num_actors": 1, "prompts_per_task": 4},
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-2},
        "eval": {"every": 0, "num_prompts": 4, "seeds_per_prompt": 1, "grid_prompts": 4},
        "output": {"dir": str(out_dir), "checkpoint_every": 2},
        "ray": {"small_box": "off"},  # tests choose their layout; tests/test_small_box.py tests the mode
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return build_config(tree)


@functools.cache
def _tolerances() -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(TOLERANCES.read_text())["comparisons"]}


def tolerance(name: str) -> float:
    """The bound of a comparison of two computations that differ only in float order (bench/tolerances.json,
    written by ``python -m bench.tolerances``: at least 3x the largest spread it measured)."""
    return _tolerances()[name]["bound"]


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


class Brightness:
    """A stub reward: mean pixel value, per image, differentiable."""

    name, differentiable = "brightness", True

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images.flatten(1).mean(1)


def brightness_worker(cfg):
    """A rollout worker of ``cfg`` scored by ``Brightness``."""
    from actors.reward import RewardClient
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(cfg.rollout_settings())
    worker.reward = RewardClient(Brightness())
    return worker


def chain_logprobs(policy: DiffusionPolicy, roll, prompts: Sequence[str]) -> torch.Tensor:
    """log π of every transition of the sampled chains ``roll`` recomputed in one batch, as [steps, chains] (the
    layout of ``roll.logprobs``, which the sampler computed one step of all chains at a time)."""
    steps, chains = roll.logprobs.shape
    embeds = policy.encode_prompts(list(prompts))
    k = torch.arange(steps)
    x_t, x_prev = roll.latents[k].flatten(0, 1), roll.latents[k + 1].flatten(0, 1)
    with torch.no_grad():
        lp = recomputed_logprob(policy, x_t, x_prev, policy.timesteps.repeat_interleave(chains), embeds.repeat(steps))
    return lp.view(steps, chains)


def pair_logprobs(policy: DiffusionPolicy, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_w | x_t) and log π(x_l | x_t) of step pairs under the policy adapter."""
    t = batch.tensors
    emb = policy.encode_prompts(batch.prompts)
    with torch.no_grad():
        return tuple(recomputed_logprob(policy, t["x_t"], t[x], t["timestep"], emb, adapter=POLICY)
                     for x in ("x_w", "x_l"))


def density64(policy: DiffusionPolicy, x_t, x_prev, timestep, embeds, adapter) -> torch.Tensor:
    """An independent float64 log N(x_prev; μ(x_t), σ_t²) per sample: DDIM's mean and σ from ᾱ in float64 (only ε̂
    comes from the model)."""
    eps = policy.eps(x_t, timestep, embeds, adapter=adapter).double()
    t = torch.as_tensor(timestep).long().reshape(-1)
    ac = policy.alphas_cumprod.double()
    tp = t - policy.stride
    a_t = ac[t].view(-1, 1, 1, 1)
    a_p = torch.where(tp >= 0, ac[tp.clamp(min=0)], torch.tensor(policy.final_alpha_cumprod, dtype=torch.float64))
    a_p = a_p.view(-1, 1, 1, 1)
    var = policy.sampler.eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    x_t = x_t.double()
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mu = a_p.sqrt() * x0 + (1 - a_p - var).sqrt() * eps
    per = -((x_prev.double() - mu) ** 2) / (2 * var) - 0.5 * var.log() - 0.5 * math.log(2 * math.pi)
    return per.flatten(1).sum(1) if policy.sampler.logprob_reduce == "sum" else per.flatten(1).mean(1)


def stored_and_float64_ref_logprobs(policy: DiffusionPolicy, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The log π_ref a rollout actor stored with every transition of ``batch`` (reference.compute_on=actors; winners
    then losers) and the same densities recomputed here by ``density64`` under the reference (no adapter)."""
    t = batch.tensors
    if batch.kind == "step":
        emb = policy.encode_prompts(batch.prompts)
        stored = torch.cat([t["ref_logp_w"], t["ref_logp_l"]])
        want = torch.cat([density64(policy, t["x_t"], t[x], t["timestep"], emb, None) for x in ("x_w", "x_l")])
        return stored, want
    emb = policy.encode_prompts(batch.prompts * 2)
    lat = torch.cat([t["latents_w"], t["latents_l"]])
    want = torch.stack([density64(policy, lat[:, k], lat[:, k + 1], ts, emb, None)
                        for k, ts in enumerate(policy.timesteps)], dim=1)
    return torch.cat([t["ref_logps_w"], t["ref_logps_l"]]), want  # [2B, N]


def without_reference(batch: PairBatch) -> PairBatch:
    """``batch`` without the stored log π_ref columns (reference.compute_on=actors), as an old log has it."""
    names = reference_columns(batch.kind)
    return PairBatch(batch.kind, {k: v for k, v in batch.tensors.items() if k not in names}, batch.prompts)


def moved_learner(cfg, seed: int = 1):
    """A learner whose policy differs from the reference (so the log-ratios are not all zero)."""
    from learner.trainer import Learner

    learner = Learner(cfg)
    with torch.no_grad():
        for p in learner.params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return learner


# reference.compute_on=actors: the configs on which stored and recomputed log π_ref must give the same loss
LEARNER_SIDE_CASES = {
    "step": {"pairs": {"kind": "step_branch"}},
    "step-guided": {"pairs": {"kind": "step_branch"},
                    "guidance": {"kind": "reward_gradient", "eta_lo": 0.5, "eta_hi": 0.5, "delta": 1e-6}},
    "trajectory": {"pairs": {"kind": "trajectory"}},
    "trajectory-dense": {"pairs": {"kind": "trajectory"},
                         "loss": {"kind": "dense_dpo", "kappa": 10.0, "num_step_samples": 2},
                         "time_weight": {"mode": "discount"}},
    "step-full": {"pairs": {"kind": "step_branch"}, "train": {"trainable": "full"}},
}


def loss_both_ways(learner, batch: PairBatch) -> list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]]:
    """(loss, margin, kl_ref, gradient) of the learner's loss on ``batch`` with its stored log π_ref, then with its
    own reference forward instead (the same draws of a trajectory method's steps)."""
    results = []
    for b in (batch, without_reference(batch)):
        learner.generator.manual_seed(0)  # trajectory methods draw their steps from it
        learner.optimizer.zero_grad(set_to_none=True)
        out, extra = learner._loss(b)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in learner.params])
        results.append((out.loss.detach(), out.margin.detach(), extra["kl_ref"], grads))
    return results


OTHER_POSITION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}


def world_scored_batch(seed: int, n: int = 6) -> tuple[torch.Tensor, list[str]]:
    """Renders of random prompts, sizes and nuisances, plus pixel noise (masks neither empty nor saturated), in
    float64; shown against the true prompt for half of the batch, against a moved one for the other half."""
    from world.scenes import all_triples, prompt_of, render_batch, sample_scenes

    gen = torch.Generator().manual_seed(seed)
    triples = all_triples()
    prompts = [prompt_of(triples[i]) for i in torch.randint(len(triples), (n,), generator=gen)]
    scenes = sample_scenes(prompts, n, seed=seed)
    images = render_batch(scenes).double() + 0.08 * torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
    shown = [p if i % 2 else prompt_of((s.colour, s.shape, OTHER_POSITION[s.position]))
             for i, (p, s) in enumerate(zip(prompts, scenes, strict=True))]
    return images.clamp(0, 1), shown


def world_scores_three_ways(reward, images: torch.Tensor, prompts: list[str], seed: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A world reward's scores of the batch (through autograd when ``images`` requires grad), of each image alone
    and of a seeded permutation of the batch put back in order: three float orders of the same scores."""
    batch = reward(images, prompts)
    with torch.no_grad():
        single = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(len(prompts))])
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
        back = torch.empty_like(single)
        back[perm] = reward(images[perm], [prompts[i] for i in perm])
    return batch, single, back


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
