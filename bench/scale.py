"""``python -m bench.scale``: the real async driver (learner.loop.Driver) at 1–64 rollout actors, with simulated GPUs.

The driver, its buffer, weight sync, balancer, logger and checkpoints are the real ones, and so are the Ray actors,
the record schema (``actors.records``, step pairs with SD-1.5's 4×64×64 float32 latents) and the weight state
(safetensors bytes of a rank-4 LoRA of SD-1.5's UNet, 0.8 M parameters, checksummed on both ends). Only the compute
is simulated: every ``generate`` and ``update`` sleeps for the seconds bench/costs.py gives its GPU, with ±10 %
lognormal jitter, times ``--time-scale`` (results are reported in simulated seconds). K learners are K simulated
ranks under the real learner.group.LearnerGroup (each sleeps for its shard; the all-reduce of a 3 MB LoRA
gradient, ~20 µs over NVLink, is left out). ``--model sd35m|flux`` swaps in SD3.5-Medium's or FLUX.1-dev's costs,
preset, 16×64×64 latents and rank-32 LoRA state (bench/costs.py MODELS) and writes bench/scale_results_<model>.json
only; the default, SD-1.5, writes the committed results.

Simulated rollout actors do not import torch: torch and peft cost 450 MB and 4 s of CPU per process, which 64
actors on this machine could not afford. The two wire classes they receive and return (``WeightState``,
``LoadReport``) and the transport argument are unpickled into torch-free stand-ins with the same module and field
names (``_wire_stand_ins``), so the driver gets real ``LoadReport`` objects and verifies real checksums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actors.stored import RowLayout, record_summary
from bench import costs
from bench.common import write_block
from learner.group_lead import GroupLead

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench/scale_results.json"  # the default model's; another's: scale_results_<model>.json
RESULTS_MD = ROOT / "bench/RESULTS.md"
BEGIN, END = "<!-- scale:begin (python -m bench.scale writes this block) -->", "<!-- scale:end -->"
MAX_PROMPTS = 16  # rollout.max_prompts_per_task in the simulation: the record template holds this many chains


def lora_widths(model: str) -> list[int]:
    """The width of each simulated LoRA module (A: rank × width, B: width × rank), costs.MODELS[model]'s."""
    return [width for count, width in costs.MODELS[model].lora_widths for _ in range(count)]


def _wire_stand_ins() -> None:
    """Torch-free classes under the names policy.lora.{WeightState, LoadReport} and policy.transport.ObjectStore, in
    this (simulated actor) process only."""
    if "policy.lora" in sys.modules:
        return

    @dataclass(frozen=True)
    class WeightState:
        version: int
        adapter: str | None
        blob: bytes
        checksum: str

    @dataclass(frozen=True)
    class LoadReport:
        version: int
        keys_matched: int
        checksum: str

    class ObjectStore:
        name = "object_store"

    for name, classes in (("policy", ()), ("policy.lora", (WeightState, LoadReport)),
                          ("policy.transport", (ObjectStore,))):
        module = types.ModuleType(name)
        for cls in classes:
            cls.__module__, cls.__qualname__ = name, cls.__name__
            setattr(module, cls.__name__, cls)
        sys.modules[name] = module


def checksum(tensors: dict[str, np.ndarray]) -> str:
    """policy.lora.checksum in NumPy (names and little-endian bytes in sorted-key order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(np.ascontiguousarray(tensors[key]).tobytes())
    return h.hexdigest()[:16]


class StaleWeightsError(RuntimeError):
    """As actors.rollout's: the actor holds another version than the call names."""


class SimRollout:
    """A rollout actor with the methods the driver calls; ``generate`` sleeps for its GPU's chain seconds."""

    def __init__(self, template: pa.RecordBatch, actor_id: int, gpu: str, branches: int, seed: int,
                 model: str = "sd15"):
        _wire_stand_ins()
        self.template, self.actor_id, self.branches = template, actor_id, branches
        self.chain_s, self.num_steps = costs.Costs.of(gpu, model=model).chain_s, costs.MODELS[model].num_steps
        self.rng = np.random.default_rng(seed)
        self.scale, self.version = 1.0, 0
        self.busy: list[tuple[float, float]] = []  # wall-clock (start, end) of every generate
        self.loads: list[tuple[float, int, bool]] = []  # (wall-clock time, version, carried by a generate) per load

    def reset(self, scale: float) -> None:
        self.scale, self.busy, self.loads = scale, [], []

    def receive_weights(self, payload: Any, transport: Any = None, what: str = "policy") -> Any:
        return self._load(payload, carried=False)

    def _load(self, payload: Any, carried: bool) -> Any:
        from safetensors.numpy import load

        report = sys.modules["policy.lora"].LoadReport
        tensors = load(payload.blob)
        self.version = payload.version
        self.loads.append((time.time(), payload.version, carried))
        return report(payload.version, len(tensors), checksum(tensors))

    def generate(self, prompts: list[str], prompt_ids: list[int], seeds: list[int], expected_version: int,
                 round_index: int = 0, weights: Any = None) -> tuple[pa.RecordBatch, dict[str, Any]]:
        load = None if weights is None else self._load(weights, carried=True)
        if expected_version != self.version:
            raise StaleWeightsError(f"actor {self.actor_id} holds weights v{self.version}, asked for "
                                    f"v{expected_version}")
        start, n = time.time(), len(prompts)
        seconds = n * self.chain_s * float(self.rng.lognormal(0.0, costs.JITTER_SIGMA))
        time.sleep(seconds * self.scale)
        rows = n * self.branches
        fields = {"prompt": pa.array(prompts * self.branches), "prompt_id": np.tile(prompt_ids, self.branches),
                  "seed": np.tile(seeds, self.branches), "policy_version": np.full(rows, self.version),
                  "actor_id": np.full(rows, self.actor_id), "round": np.full(rows, round_index)}
        batch = self.template.slice(0, rows)
        columns = [pa.array(fields[f.name], f.type) if f.name in fields else batch.column(i)
                   for i, f in enumerate(batch.schema)]
        self.busy.append((start, time.time()))
        stats: dict[str, Any] = {"chains": float(n), "seconds": seconds, "pairs": float(rows),
                                 "steps": float(n * self.num_steps),
                                 "net_rows": float(2 * n * self.num_steps)}  # a CFG sampler's passes, no branching
        if load is not None:
            stats["load"] = load
        batch = pa.RecordBatch.from_arrays(columns, schema=batch.schema)
        return batch, {**stats, "policy_version": self.version, "summary": record_summary(batch)}

    def report(self) -> dict[str, Any]:
        return {"busy": self.busy, "loads": self.loads}


class SimLearner(GroupLead):
    """A learner rank with the methods the driver and learner.group call; ``update`` sleeps for its shard's seconds.

    Torch is imported only by the calls rank 0 alone receives (publish, evaluate, checkpoint)."""

    def __init__(self, gpu: str, trainable: str, seed: int, model: str = "sd15"):
        self.costs = costs.Costs.of(gpu, trainable, model)
        self.rng = np.random.default_rng(seed)
        r = costs.MODELS[model].lora_rank
        self.tensors = {f"lora.{i:03d}.{ab}": self.rng.standard_normal(shape, np.float32) * np.float32(0.01)
                        for i, w in enumerate(lora_widths(model)) for ab, shape in (("A", (r, w)), ("B", (w, r)))}
        self.reset(1.0)

    def reset(self, scale: float) -> None:
        self.scale, self.step, self.version = scale, 0, -1
        self.published: dict[int, int] = {}  # version -> learner step it was published at
        self.snapshot: Any = None
        self.busy: list[tuple[float, float]] = []
        self.age: list[int] = []  # updates between a trained record's version and the update training on it

    def update(self, records: pa.Table | RowLayout, *batches: pa.RecordBatch) -> dict[str, float]:
        start = time.time()
        if isinstance(records, RowLayout):
            records = records.assemble(batches)
        versions = records.column("policy_version").to_numpy()
        self.age.extend(self.step - self.published.get(int(v), 0) for v in versions)
        time.sleep(len(records) * self.costs.pair_s * self.scale
                   * float(self.rng.lognormal(0.0, costs.JITTER_SIGMA)))
        next(iter(self.tensors.values()))[0, 0] += 1e-4  # the weights change: every version has its own checksum
        self.step += 1
        self.busy.append((start, time.time()))
        reward = records.column("reward_w").to_numpy()
        return {"loss": 0.69, "accuracy": 0.5, "margin": 0.0, "pairs": float(len(records)),
                "reward_w": float(reward.mean()), "reward_l": float(reward.mean())}

    def send_weights(self, version: int, transport: Any = None, what: str = "policy") -> Any:
        import torch

        from policy.lora import POLICY
        from policy.transport import OBJECT_STORE

        if version != self.version or self.snapshot is None:
            self.snapshot = {k: torch.from_numpy(t.copy()) for k, t in self.tensors.items()}
            self.version, self.published[version] = version, self.step
        return (transport or OBJECT_STORE).send(self.snapshot, version, POLICY)

    def evaluate(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        import torch

        time.sleep(len(prompts) * self.costs.eval_chain_s * self.scale)
        return {"rewards": torch.zeros(len(prompts)), "images": torch.zeros(len(prompts), 3, 8, 8)}

    def checkpoint(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        import torch

        return {"policy": {k: torch.from_numpy(t) for k, t in self.tensors.items()}}, {"step": self.step,
                                                                                       "version": self.version}

    def rng_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"seed": 0}, {}

    def report(self) -> dict[str, Any]:
        return {"busy": self.busy, "age": self.age}


def record_template(max_prompts: int, branches: int, seed: int = 0, model: str = "sd15") -> pa.RecordBatch:
    """A step-pair record batch of ``max_prompts`` chains in the real schema, random latents of ``model``'s shape
    (actors slice it)."""
    from actors.records import to_record_batch

    rng = np.random.default_rng(seed)
    rows = max_prompts * branches
    latent = {k: rng.standard_normal((rows, *costs.MODELS[model].latent_shape), dtype=np.float32)
              for k in ("x_t", "x_w", "x_l", "x0_w", "x0_l")}
    return to_record_batch("step", {
        "prompt": ["p"] * rows, "prompt_id": np.zeros(rows, np.int64), "seed": np.zeros(rows, np.int64),
        "step_index": np.repeat(np.arange(branches), max_prompts).astype(np.int16),
        "timestep": np.zeros(rows, np.float32), **latent,
        "reward_w": rng.random(rows, np.float32), "reward_l": rng.random(rows, np.float32),
        "logp_w": np.zeros(rows, np.float32), "logp_l": np.zeros(rows, np.float32), "guided": np.zeros(rows, bool),
        "policy_version": np.zeros(rows, np.int64), "actor_id": np.zeros(rows, np.int32),
        "round": np.zeros(rows, np.int64)})


def sim_config(n: int, steps: int, batch: int, max_staleness: int | None, broadcast_every: int | None, out: Path,
               pairs_per_s: float = 0.0, model: str = "sd15") -> Any:
    """``model``'s TailorPO preset with the simulation's sizes (no model is loaded: model.path is never read).
    ``max_staleness`` None: matched to the rate (``matched_staleness``), for ``pairs_per_s`` trained;
    ``broadcast_every`` None: the preset's."""
    from learner.config import build_config, load_yaml

    tree = load_yaml(ROOT / costs.MODELS[model].preset)
    broadcast_every = broadcast_every or tree["train"]["broadcast_every"]
    tree["ray"] = {"address": None}
    tree["rollout"].update(num_actors=n, max_prompts_per_task=MAX_PROMPTS)
    if max_staleness is None:
        cfg = build_config(tree)
        max_staleness = matched_staleness(pairs_per_s / batch / broadcast_every, cfg.rollout.target_task_seconds)
    tree["train"].update(steps=steps, batch_size=batch, max_staleness=max_staleness, broadcast_every=broadcast_every)
    tree["eval"] = {"every": 0, "num_prompts": 2, "seeds_per_prompt": 1, "grid_prompts": 0}
    tree["output"] = {"dir": str(out), "checkpoint_every": 10**9, "tensorboard": False}
    return build_config(tree)


def matched_staleness(versions_per_s: float, task_s: float) -> int:
    """The versions published while one rollout task runs (rounded up), plus one while its pairs wait for a batch
    and one for the tasks' jitter: a task's records are about this old when trained, so a smaller
    ``max_staleness`` drops much of what the actors make and a larger one only admits older records. (Without
    the two, 13-25 % of pairs were dropped at N = 4-8.)"""
    return math.ceil(versions_per_s * task_s) + 2


PARTS = ("collect", "send", "publish", "take", "shard", "learner_get", "after_update")


def driver_class() -> type:
    """learner.loop.Driver with clocks: the loop's wall and CPU time up to the last update, the main thread's CPU
    time in each part of the loop (the rest of the process's CPU is Ray's own threads), publish timings."""
    from learner.loop import Driver

    class MeasuredDriver(Driver):
        def __init__(self, *args: Any, **kwargs: Any):
            self.parts: dict[str, float] = dict.fromkeys(PARTS, 0.0)
            super().__init__(*args, **kwargs)

        def _run_async(self, bar: Any) -> None:
            self.publishes: list[tuple[float, float, int]] = []  # (wall-clock start, driver seconds, version)
            self.parts = dict.fromkeys(PARTS, 0.0)  # the loop's only
            publish, take, shard = self.weights.publish, self.buffer.take, self.learners.update

            def timed(new_version: bool = True) -> None:
                t0 = time.time()
                self._part("publish", publish, new_version)
                self.publishes.append((t0, time.time() - t0, self.weights.version))

            self.weights.publish = timed
            self.buffer.take = lambda n, step: self._part("take", take, n, step)
            self.learners.update = lambda batch: self._part("shard", shard, batch)
            self.loop_start, self.cpu_start, self.main_start = time.time(), time.process_time(), time.thread_time()
            super()._run_async(bar)
            self.weights.publish, self.buffer.take, self.learners.update = publish, take, shard

        def _part(self, name: str, call: Any, *args: Any) -> Any:
            cpu = time.thread_time()
            try:
                return call(*args)
            finally:
                self.parts[name] += time.thread_time() - cpu

        def _collect(self, ref: Any, task: Any) -> bool:
            return self._part("collect", super()._collect, ref, task)

        def _send(self, task: Any) -> Any:
            return self._part("send", super()._send, task)

        def _learner(self, ref: Any) -> Any:
            return self._part("learner_get", super()._learner, ref)

        def _after_update(self, metrics: dict[str, float], bar: Any) -> None:
            self._part("after_update", super()._after_update, metrics, bar)
            self.last_update, self.cpu_last, self.main_last = time.time(), time.process_time(), time.thread_time()
            self.at_last = dict(self.parts), self.counters.rounds  # the parts and rollouts up to the last update

    return MeasuredDriver


def busy_in(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``intervals`` inside [start, end]."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


@dataclass
class Pool:
    """The Ray actors of a sweep, made once and reused by every point (actor start-up dominates otherwise)."""

    rollouts: list[Any]
    gpus: list[str]
    learners: list[Any]
    template_bytes_per_row: float


def start_pool(n: int, k: int, learner_gpu: str, trainable: str, seed: int, model: str = "sd15") -> Pool:
    import ray

    branches = costs.MODELS[model].branches
    template = record_template(MAX_PROMPTS, branches, seed, model)
    ref = ray.put(template)
    gpus = costs.pool(n)
    rollouts = [ray.remote(SimRollout).options(num_cpus=0, max_restarts=-1, max_task_retries=0).remote(
        ref, i, gpu, branches, seed + 1 + i, model) for i, gpu in enumerate(gpus)]
    learners = [ray.remote(SimLearner).options(num_cpus=0, max_restarts=0).remote(learner_gpu, trainable, seed + i,
                                                                                  model) for i in range(k)]
    ray.get([a.__ray_ready__.remote() for a in [*rollouts, *learners]])
    return Pool(rollouts, gpus, learners, template.nbytes / template.num_rows)


def rss_mb(actor: Any) -> float:
    """Resident memory of one actor process (MB), read from /proc by pid."""
    import ray

    pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def run_point(pool: Pool, n: int, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (N actors, K learners) run of the real driver; returns its measurements in simulated seconds."""
    import ray

    from learner.metrics import RunLogger

    gpus, actors = pool.gpus[:n], pool.rollouts[:n]
    rates = np.array([costs.Costs.of(g, model=args.model).pairs_per_s for g in gpus])
    learner_rate = k * args.batch / (args.batch * costs.Costs.of(args.learner_gpu, args.trainable, args.model).pair_s)
    scale = args.time_scale
    steps = max(4, round(args.sim_seconds * min(rates.sum(), learner_rate) / args.batch))
    from learner.group import LearnerGroup

    ranks = pool.learners[:k]
    ray.get([a.reset.remote(scale) for a in actors] + [r.reset.remote(scale) for r in ranks])
    ray.get(ranks[0].set_peers.remote(ranks[1:]))  # what LearnerGroup.connect does after the process group forms
    wall = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = sim_config(n, steps, args.batch, args.max_staleness, args.broadcast_every, Path(tmp),
                         min(rates.sum(), learner_rate), args.model)
        prompts = [f"prompt {i}" for i in range(512)]
        with RunLogger(Path(tmp), tensorboard=False) as logger:
            driver = driver_class()(cfg, LearnerGroup(ranks), actors, Path(tmp), prompts, prompts[:2], logger)
            driver.run()
    reports = ray.get([a.report.remote() for a in actors])
    learned = ray.get(ranks[0].report.remote())
    start, end = driver.loop_start, driver.last_update
    window = (end - start) / scale  # simulated seconds
    busy = np.array([busy_in(r["busy"], start, end) for r in reports]) / scale
    b = driver.buffer
    cpu = (driver.cpu_last - driver.cpu_start) / steps
    main = (driver.main_last - driver.main_start) / steps  # the driver's own (main) thread
    updates_per_s = steps / window
    publishes = [p for p in driver.publishes if start <= p[0] <= end]
    published_at = {v: t for t, _, v in driver.publishes}
    # seconds from a version's publish to each actor's load of it (every load in the window comes with a generate)
    loads = [(t, v) for r in reports for t, v, carried in r["loads"] if start <= t <= end]
    lag = [(t - published_at[v]) / scale for t, v in loads if v in published_at]
    parts, rollouts = driver.at_last
    row_mb = pool.template_bytes_per_row / 2**20
    lora_mb = costs.MODELS[args.model].lora_params * 4 / 2**20
    age = np.array(learned["age"] or [0])
    return {
        "n": n, "k": k, "a100": gpus.count("A100"), "l4": gpus.count("L4"), "time_scale": scale, "updates": steps,
        "max_staleness": cfg.train.max_staleness,
        "batch": args.batch, "wall_s": time.time() - wall,
        "sim_seconds": window,
        "rollout_efficiency": float((busy * rates).sum() / (window * rates.sum())),
        "pairs_per_s": float((busy * rates).sum() / window), "ideal_pairs_per_s": float(rates.sum()),
        "trained_pairs_per_s": steps * args.batch / window, "learner_capacity_pairs_per_s": learner_rate,
        "learner_utilisation": busy_in(learned["busy"], start, end) / scale / window,
        "staleness_at_arrival": {int(s): c for s, c in sorted(b.histogram.items(), key=lambda kv: int(kv[0]))},
        "pairs_seen": b.seen, "pairs_dropped": b.dropped, "dropped_fraction": b.dropped / max(b.seen, 1),
        "backlog_pairs": len(b), "age_updates_mean": float(age.mean()), "age_updates_p95": float(np.quantile(age, .95)),
        "driver_cpu_ms_per_update": 1e3 * cpu, "driver_core_share": cpu * updates_per_s,
        "rollouts_per_update": rollouts / steps,
        "driver_cpu_ms_per_rollout": 1e3 * (parts["collect"] + parts["send"]) / max(rollouts, 1),
        "driver_cpu_ms_per_update_parts": {  # main thread by part, its waits and loop, then Ray's own threads
            **{k: 1e3 * v / steps for k, v in parts.items()},
            "wait_and_loop": 1e3 * (main - sum(parts.values()) / steps), "ray_threads": 1e3 * (cpu - main)},
        "object_store_mb_per_update": (b.seen * row_mb / steps + args.batch * row_mb + lora_mb * len(loads) / steps),
        "weight_loads_per_update": len(loads) / steps,
        "publish_ms": 1e3 * float(np.median([p[1] for p in publishes])) if publishes else math.nan,
        "publish_to_load_s": float(np.median(lag)) if lag else math.nan}


def keeps_up(r: dict[str, Any]) -> bool:
    """The learner group trains every fresh pair the actors make: no growing backlog, not saturated. (Pairs dropped
    as too stale are reported apart: more learners cannot lower them, they only publish versions faster.)"""
    return r["backlog_pairs"] <= 2 * r["batch"] and r["learner_utilisation"] < 0.97


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    from learner.main import LOCAL_ONLY_ENV

    if "ray" not in sys.modules:  # a local Ray on the loopback interface only, as learner.main starts it
        os.environ.update(LOCAL_ONLY_ENV)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        t0 = time.time()
        pool = start_pool(max(args.actors), args.max_learners, args.learner_gpu, args.trainable, args.seed,
                          args.model)
        startup = time.time() - t0
        print(f"{len(pool.rollouts)} rollout actors and {len(pool.learners)} learner ranks started in {startup:.0f} s",
              flush=True)
        memory = {"rollout_actor_rss_mb": rss_mb(pool.rollouts[0]), "learner_rss_mb": rss_mb(pool.learners[0])}
        rows, smallest = [], {}
        one = costs.Costs.of(args.learner_gpu, args.trainable, args.model)
        for n in args.actors:
            demand = sum(costs.Costs.of(g, model=args.model).pairs_per_s for g in pool.gpus[:n])
            k = 1
            while k * 2 <= args.max_learners and k / one.pair_s < 0.7 * demand:  # skip K that cannot keep up
                k *= 2
            while True:
                r = run_point(pool, n, k, args)
                rows.append(r)
                shown = ("n", "k", "wall_s", "rollout_efficiency", "learner_utilisation", "dropped_fraction",
                         "driver_core_share", "driver_cpu_ms_per_update", "driver_cpu_ms_per_rollout",
                         "driver_cpu_ms_per_update_parts")
                print(json.dumps({key: r[key] for key in shown}), flush=True)
                if keeps_up(r) or k * 2 > args.max_learners:
                    smallest[n] = k if keeps_up(r) else None
                    break
                k *= 2
    finally:
        ray.shutdown()
    command = "python -m bench.scale" + (" --quick" if args.quick else "") + (
        f" --model {args.model}" if args.model != "sd15" else "")
    return {"command": command, "startup_s": startup,
            **memory, "settings": {k: v for k, v in vars(args).items() if k != "quick"}, "rows": rows,
            "smallest_k": smallest}


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a sweep."""
    head = ("| N (A100+L4) | K | max stale. | rollout eff. | learner util. | pairs/s made / trained | dropped | "
            "staleness at arrival (versions: pairs) | age at training p95 (updates) | driver ms CPU/update | "
            "driver ms CPU/rollout | driver core share | object store MB/update | publish ms | "
            "publish → load s (median) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        hist = ", ".join(f"{s}: {c}" for s, c in list(r["staleness_at_arrival"].items())[:6])
        lines.append(
            f"| {r['n']} ({r['a100']}+{r['l4']}) | {r['k']} | {r['max_staleness']} | {r['rollout_efficiency']:.1%} | "
            f"{r['learner_utilisation']:.1%} | {r['pairs_per_s']:.0f} / {r['trained_pairs_per_s']:.0f} | "
            f"{r['dropped_fraction']:.1%} | {hist} | {r['age_updates_p95']:.0f} | "
            f"{r['driver_cpu_ms_per_update']:.1f} | {r['driver_cpu_ms_per_rollout']:.2f} | "
            f"{r['driver_core_share']:.1%} | {r['object_store_mb_per_update']:.0f} | {r['publish_ms']:.1f} | "
            f"{r['publish_to_load_s']:.2f} |")
    return "\n".join(lines)


def write_results(result: dict[str, Any]) -> None:
    model = result["settings"]["model"]
    if model != "sd15":  # the committed results (and the docs' figures) are the default model's
        RESULTS_JSON.with_name(f"scale_results_{model}.json").write_text(json.dumps(result, indent=1))
        return
    RESULTS_JSON.write_text(json.dumps(result, indent=1))
    smallest = ", ".join(f"N={n}: {k if k else '> ' + str(result['settings']['max_learners'])}"
                         for n, k in result["smallest_k"].items())
    block = (f"`{result['command']}` ({time.strftime('%Y-%m-%d')}): smallest K per N whose learners keep up "
             f"(no growing backlog, utilisation < 97 %): {smallest}.\nActor RSS: rollout "
             f"{result['rollout_actor_rss_mb']:.0f} MB, learner {result['learner_rss_mb']:.0f} MB.\n\n"
             f"{table(result)}")
    write_block(RESULTS_MD, BEGIN, END, block, "## 5. Scale simulation: the real driver with 1–64 simulated GPU actors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N in {1, 2}, a few updates, no files written (the test)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--max-learners", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="pairs per update (divisible by every K tried)")
    p.add_argument("--max-staleness", type=int, default=None, help="train.max_staleness (default: per point, the "
                   "versions published while one task runs, ceil(updates/s / broadcast_every x "
                   "rollout.target_task_seconds) + 2 for the wait in the buffer and jitter. A smaller bound drops "
                   "much of what the actors make, since a task's records arrive that many versions old)")
    p.add_argument("--broadcast-every", type=int, default=None, help="train.broadcast_every (default: the "
                   "preset's, 4)")
    p.add_argument("--learner-gpu", choices=sorted(costs.PEAK_BF16), default="A100")
    p.add_argument("--trainable", choices=sorted(costs.TRAINABLE), default="lora")
    p.add_argument("--model", choices=list(costs.MODELS), default="sd15", help="the cost model's denoiser: SD-1.5, "
                   "SD3.5-Medium or FLUX.1-dev at 512 px, each with its TailorPO preset (python -m bench.costs)")
    p.add_argument("--sim-seconds", type=float, default=15.0, help="simulated seconds per point")
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second (below 1 the "
                   "driver's real latencies weigh more against the shortened tasks)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.actors, args.sim_seconds, args.max_learners, args.time_scale = [1, 2], 4.0, 2, 0.25
    if any(n < 1 for n in args.actors) or args.batch % args.max_learners:
        p.error("--actors must be >= 1 and --batch divisible by --max-learners")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = sweep(args)
    print(table(result))
    if not args.quick:
        write_results(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
