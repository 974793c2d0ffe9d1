"""``python -m bench.tolerances [--seeds N] [--only PREFIX ...]``: the float-order spread behind every tolerance in
tests/ that compares two computations which differ only in the order of float operations (a learner group's shards
vs one learner, micro-batches vs the whole batch, one image vs the batch, a rollout actor's forward vs the
learner's), and the bound each test then uses. Writes bench/tolerances.json, which the tests read through
``tests/helpers.py`` ``tolerance(name)``: one source of truth.

Each comparison is reproduced in this process on the tests' own tiny model, configs and helpers, over ``--seeds``
seeds (the data, the initial adapter, the images); a learner group's all-reduce is done by threads of this process
(the same ``Learner.update``, its gloo all-reduce replaced by a sum of the ranks' tensors), not by Ray. A spread is
the largest gap, in the test's own measure (``kind``), over all seeds and cases; the bound is the smallest
1/2/5 x 10^k that is at least ``MARGIN`` times it, so it stays 3x above it (tests/test_tolerances.py checks) on a
machine that rounds a little differently, and at least ``FLOOR_ULPS`` float32 ulps of the values compared (where this
machine happened to round both sides alike). ``comment`` is the line that documents the bound beside its assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import torch

from bench.common import ROOT, machine_info

sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers: the same code the assertions run

import helpers
import reward_fixtures

OUT = ROOT / "bench" / "tolerances.json"
SEEDS = 24
MARGIN = 4  # bound >= MARGIN x the largest spread seen; tests/test_tolerances.py requires >= REQUIRED
REQUIRED = 3
FLOOR_ULPS = 8  # and >= this many float32 ulps of the largest value compared
ON_ACTORS = {"compute_on": "actors"}
MOVING = {"compute_on": "actors", "strategy": "stable_update", "tau": 2, "delta": 1e9}
GUIDED = {"kind": "reward_gradient", "eta_lo": 0.5, "eta_hi": 1.0, "max_grad_norm": 50.0}


@dataclass(frozen=True)
class Comparison:
    name: str
    kind: str  # abs: max |a - b|; rel: max |a - b| / |b|; rel_norm: ||a - b|| / ||b||
    probe: str  # the function below that measures it (one run of a probe measures several comparisons)
    tests: str
    what: str


COMPARISONS = [
    Comparison("learner_group.gradient", "rel_norm", "learner_group", "tests/test_learner_group.py",
               "the gradient a rank of a K=2 group steps with vs one learner's on the whole batch"),
    Comparison("learner_group.parameters", "rel_norm", "learner_group", "tests/test_learner_group.py",
               "the adapter after 3 updates, K=2 vs one learner, relative to how far it moved (elementwise, AdamW "
               "amplifies a near-zero gradient element's rounding to a sizeable part of a step)"),
    Comparison("learner_group.first_update_metrics", "rel", "learner_group", "tests/test_learner_group.py",
               "loss, accuracy, margin and grad_norm of the first update, K=2 vs one learner"),
    Comparison("learner_group.reward_w", "rel", "learner_group", "tests/test_learner_group.py",
               "the batch's mean winner reward, averaged over shards vs over the batch, every update"),
    Comparison("learner_group.loss_margin", "abs", "learner_group", "tests/test_learner_group.py",
               "loss and margin of every update (the parameters drift apart by float rounding), K=2 vs one"),
    Comparison("grad_accum.loss", "rel", "grad_accum", "tests/test_learner.py",
               "the loss of grad_accum=3 micro-batches vs the whole batch"),
    Comparison("grad_accum.grad_norm", "rel", "grad_accum", "tests/test_learner.py",
               "the gradient norm of grad_accum=3 micro-batches vs the whole batch"),
    Comparison("grad_accum.parameters", "abs", "grad_accum", "tests/test_learner.py",
               "the adapter after one step, grad_accum=3 vs the whole batch"),
    Comparison("recomputed_logprob.per_dim", "abs", "recomputed_logprob", "tests/test_learner.py, test_policy.py",
               "a sampled transition's log-prob (per latent dim) vs the learner's recomputation in another batch: "
               "step pairs, after a weight update, guided winners, all chains of a CFG sampler (sum and mean)"),
    Comparison("reference_on_actors.stored_logprob", "abs", "stored_logprob", "tests/test_reference_on_actors.py",
               "the float64 log pi_ref an actor stores vs an independent float64 density of the test's eps call"),
    Comparison("reference_on_actors.margin", "abs", "learner_side", "tests/test_reference_on_actors.py",
               "the DPO margin from the stored log pi_ref vs from the learner's reference forward"),
    Comparison("reference_on_actors.loss", "abs", "learner_side", "tests/test_reference_on_actors.py",
               "the loss from the stored log pi_ref vs from the learner's reference forward"),
    Comparison("reference_on_actors.kl_ref", "abs", "learner_side", "tests/test_reference_on_actors.py",
               "kl_ref from the stored log pi_ref vs from the learner's reference forward"),
    Comparison("reference_on_actors.gradient", "abs", "learner_side", "tests/test_reference_on_actors.py",
               "the gradient from the stored log pi_ref vs from the learner's reference forward"),
    Comparison("policy.batch_vs_alone", "abs", "policy_batch", "tests/test_policy.py",
               "a chain's latents sampled in a batch of 2 vs alone"),
    Comparison("guided_reward.stored_vs_recomputed", "abs", "guided_reward", "tests/test_method_behaviour.py",
               "a guided winner's stored reward vs the reward of its decoded x0 in another batch"),
    Comparison("world.batch_vs_single", "abs", "world", "tests/test_world.py",
               "world rewards of a batch (autograd) vs each image alone and vs a permuted batch"),
    Comparison("reward_models.batch_vs_singles", "abs", "reward_models", "tests/test_rewards_models.py",
               "clip_score, hps, aesthetic, pickscore on tiny models: a batch vs one image at a time"),
    Comparison("imagereward.batch_vs_singles", "abs", "imagereward", "tests/test_rewards_models.py (slow)",
               "ImageReward (ViT-L/16, 1-layer text encoder): a batch vs one image at a time"),
]


# ---- gaps ---------------------------------------------------------------------------------------------------------
Gap = tuple[float, float]  # (how far apart, the size of the values compared: what a float32 ulp is relative to)


def gap(kind: str, a: Any, b: Any) -> Gap:
    """How far ``a`` is from ``b`` (the reference side) in the measure ``kind``, and the scale of the values."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff = (a - b).abs()
    if kind == "abs":
        return float(diff.max()), float(b.abs().max())
    if kind == "rel":
        return float(torch.where(diff == 0, 0.0, diff / b.abs()).max()), 1.0
    if kind == "rel_norm":
        return float(diff.norm() / b.norm()), 1.0
    raise ValueError(f"unknown gap kind {kind!r}")


def worst(*gaps: Gap) -> Gap:
    return max(g for g, _ in gaps), max(m for _, m in gaps)


def scaled(g: Gap, per: float) -> Gap:
    """A gap of values that are sums of ``per`` elements, per element."""
    return g[0] / per, g[1] / per


def clean_ceil(x: float) -> float:
    """The smallest 1, 2 or 5 x 10^k that is >= ``x`` (x > 0)."""
    k = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10**k >= x * (1 - 1e-12):
            return float(f"{m * 10**k:.0e}")
    raise AssertionError(x)


def comment(spread: float, seeds: int, bound: float) -> str:
    """The line that documents a bound beside its assertion (tests/test_tolerances.py checks it is there)."""
    ratio = f"{bound / spread:.0f}x" if spread else f"{FLOOR_ULPS} float32 ulps"
    return (f"# float-order spread: max {spread:.1e} over {seeds} seeds (bench/tolerances.py); "
            f"bound {bound:.0e} = {ratio}").replace("max 0.0e+00", "max 0")


# ---- the shared set-up --------------------------------------------------------------------------------------------
class Setup:
    """The tiny model, scratch space and reward models, made once for every probe and seed."""

    def __init__(self, root: Path):
        from policy import build_random_model

        self.root = root
        self.model_dir = build_random_model(root / "tiny_model", arch="tiny", seed=0)

    def config(self, seed: int, **sections):
        """The tests' small config (tests/helpers.py) with ``train.seed = seed``."""
        sections["train"] = {**sections.get("train", {}), "seed": seed}
        return helpers.small_config(self.model_dir, self.root / "run", **sections)

    @functools.cached_property
    def clip_files(self):
        return reward_fixtures.save_tiny_open_clip(self._dir("open_clip"))

    @functools.cached_property
    def pick_dir(self) -> Path:
        out = self._dir("pickscore")
        reward_fixtures.save_tiny_pickscore(out, seed=0)
        return out

    @functools.cached_property
    def imagereward(self):
        from rewards.imagereward import ImageRewardScore

        model, _ = reward_fixtures.build_tiny_imagereward(self._dir("imagereward"))
        return ImageRewardScore(model)  # what build_reward loads from the saved state, without the 1.2 GB file

    def _dir(self, name: str) -> Path:
        (self.root / name).mkdir(exist_ok=True)
        return self.root / name


def seeds_of(seed: int, n: int = 4) -> list[int]:
    """Sampling seeds of probe seed ``seed``: disjoint for different seeds."""
    return [n * seed + i for i in range(n)]


def rollout_worker(cfg):
    from actors.rollout import RolloutWorker

    return RolloutWorker(cfg.rollout_settings())


def generate(worker, seed: int, n: int = 4, version: int = 0) -> pa.Table:
    """Pairs of ``n`` of the tests' prompts sampled with the seeds of ``seed``."""
    batch, _ = worker.generate(helpers.PROMPTS[:n], list(range(n)), seeds_of(seed, n), expected_version=version)
    return pa.Table.from_batches([batch])


# ---- a learner group in threads -------------------------------------------------------------------------------
class ThreadAllReduce:
    """``torch.distributed.all_reduce`` for ranks that are threads of this process: every rank's tensor becomes the
    sum over ranks in rank order (with two ranks a + b == b + a bitwise, so gloo's order does not matter)."""

    def __init__(self, world: int):
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=120)
        self.local = threading.local()

    def __call__(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        total = functools.reduce(torch.add, self.slots)
        self.barrier.wait()  # every rank has read the slots before any overwrites them
        tensor.copy_(total)

    def as_rank(self, rank: int, fn: Callable[..., Any], *args: Any) -> Any:
        self.local.rank = rank
        return fn(*args)


def group_update(ranks: list, table: pa.Table) -> dict[str, float]:
    """One ``Learner.update`` of every rank on its shard (learner.group.shard), at once; rank 0's metrics."""
    from learner.group import shard

    reduce = ThreadAllReduce(len(ranks))
    with ThreadPoolExecutor(len(ranks)) as pool, mock.patch.object(torch.distributed, "all_reduce", reduce):
        futures = [pool.submit(reduce.as_rank, r, learner.update, part)
                   for r, (learner, part) in enumerate(zip(ranks, shard(table, len(ranks)), strict=True))]
        metrics = [f.result() for f in futures]  # every rank's: an error in any is raised
    return metrics[0]


def grads(learner) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in learner.params])


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def params_gap(a, b) -> Gap:
    """The largest element gap between two learners' policy adapters."""
    ta, tb = a.policy_tensors(), b.policy_tensors()
    return worst(*(gap("abs", ta[k], tb[k]) for k in tb))


# ---- probes: one seed each, returning {comparison name: spread} -------------------------------------------------
def probe_learner_group(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_learner_group.py: three updates of 8 of 12 pairs, K=2 ranks (4 pairs each) vs one learner."""
    from learner.trainer import Learner

    cfg = s.config(seed, train={"batch_size": 8, "num_learners": 2, "lr": 1e-2})
    table = generate(rollout_worker(cfg), seed)
    one, ranks = Learner(cfg), [Learner(cfg) for _ in range(2)]
    start = flat(one.policy_tensors())  # a copy: the optimizer steps the parameters in place
    for rank, learner in enumerate(ranks):  # what join_group sets, without a process group
        learner.rank, learner.world = rank, 2
        learner.generator.manual_seed(cfg.train.seed + rank)
    out: dict[str, Gap] = {}
    metrics = []
    for start in (0, 4, 2):
        batch = table.slice(start, 8)
        metrics.append((one.update(batch), group_update(ranks, batch)))
        if start == 0:
            out["learner_group.gradient"] = gap("rel_norm", grads(ranks[1]), grads(one))
    m1, m2 = metrics[0]
    out["learner_group.first_update_metrics"] = worst(
        *(gap("rel", m2[k], m1[k]) for k in ("loss", "accuracy", "margin", "grad_norm")))
    out["learner_group.reward_w"] = worst(*(gap("rel", b["reward_w"], a["reward_w"]) for a, b in metrics))
    out["learner_group.loss_margin"] = worst(*(gap("abs", b[k], a[k]) for a, b in metrics for k in ("loss", "margin")))
    out["learner_group.parameters"] = gap("rel_norm", flat(ranks[0].policy_tensors()) - start,
                                          flat(one.policy_tensors()) - start)
    return out


def probe_grad_accum(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_learner.py: one update on 12 pairs with grad_accum 1 and 3."""
    from learner.trainer import Learner

    records = generate(rollout_worker(s.config(seed)), seed)
    whole, micro = (Learner(s.config(seed, train={"grad_accum": k})) for k in (1, 3))
    m1, m3 = whole.update(records), micro.update(records)
    return {"grad_accum.loss": gap("rel", m3["loss"], m1["loss"]),
            "grad_accum.grad_norm": gap("rel", m3["grad_norm"], m1["grad_norm"]),
            "grad_accum.parameters": params_gap(micro, whole)}


def probe_recomputed_logprob(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_learner.py (step pairs; after an update and weight sync; guided winners) and tests/test_policy.py
    (every transition of a CFG sampler's chains, sum and mean): per latent dimension."""
    from actors.records import from_table
    from learner.trainer import Learner
    from policy import DiffusionPolicy, SamplerConfig

    spreads = []
    cfg = s.config(seed)
    worker, learner = rollout_worker(cfg), Learner(cfg)
    batch = from_table(generate(worker, seed))
    lw, ll = helpers.pair_logprobs(learner.policy, batch)
    spreads += [scaled(gap("abs", lp, batch.tensors[f"logp_{x}"]), 256) for lp, x in ((lw, "w"), (ll, "l"))]
    learner.update(batch)
    worker.receive_weights(learner.send_weights(1))
    batch = from_table(generate(worker, seed, n=2, version=1))
    spreads.append(scaled(gap("abs", helpers.pair_logprobs(learner.policy, batch)[0], batch.tensors["logp_w"]), 256))
    guided = s.config(seed, guidance=GUIDED)
    batch = from_table(generate(rollout_worker(guided), seed))
    lw, _ = helpers.pair_logprobs(Learner(guided).policy, batch)
    spreads.append(scaled(gap("abs", lw, batch.tensors["logp_w"]), 256))
    prompts = ["a red circle on the left", "a blue square on the right", "a green triangle in the center"]
    for reduce, per in (("mean", 1), ("sum", 256)):
        sampler = SamplerConfig(num_steps=8, guidance_scale=4.0, eta=1.0, logprob_reduce=reduce)
        pol = DiffusionPolicy.from_pretrained(s.model_dir, sampler=sampler)
        roll = pol.sample(prompts, seeds_of(seed, 3))
        spreads.append(scaled(gap("abs", helpers.chain_logprobs(pol, roll, prompts), roll.logprobs), per))
    return {"recomputed_logprob.per_dim": worst(*spreads)}


def probe_stored_logprob(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_reference_on_actors.py: an actor's stored log pi_ref (policy adapter moved off the reference)."""
    from actors.records import from_table
    from policy import POLICY

    spreads = []
    for pairs in ("step_branch", "trajectory"):
        worker = rollout_worker(s.config(seed, pairs={"kind": pairs}, reference=ON_ACTORS))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            worker.policy.copy_into(POLICY, {k: torch.randn(p.shape, generator=g) * 0.05
                                             for k, p in worker.policy.adapter_parameters(POLICY).items()})
            batch = from_table(generate(worker, seed, n=3))
            stored, want = helpers.stored_and_float64_ref_logprobs(worker.policy, batch)
        spreads.append(gap("abs", stored, want))
    return {"reference_on_actors.stored_logprob": worst(*spreads)}


def probe_learner_side(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_reference_on_actors.py: loss, margin, kl_ref and gradient from stored vs recomputed log pi_ref,
    on every case of LEARNER_SIDE_CASES and after the reference moved (LoRA and full UNet)."""
    from actors.records import from_table
    from learner.trainer import Learner
    from policy import REF
    from policy.transport import OBJECT_STORE

    results = []
    for case in helpers.LEARNER_SIDE_CASES.values():
        cfg = s.config(seed, reference=ON_ACTORS, **case)
        batch = from_table(generate(rollout_worker(cfg), seed))
        results.append(helpers.loss_both_ways(helpers.moved_learner(cfg, seed), batch))
    for trainable in ("lora", "full"):
        cfg = s.config(seed, reference=MOVING, train={"trainable": trainable})
        worker, learner = rollout_worker(cfg), Learner(cfg)
        for _ in range(3):  # the reference moves at update 2
            learner.update(from_table(generate(worker, seed)))
        worker.receive_weights(learner.send_weights(1))
        worker.receive_weights(learner.send_weights(1, OBJECT_STORE, REF), OBJECT_STORE, REF)
        results.append(helpers.loss_both_ways(learner, from_table(generate(worker, seed, version=1))))
    names = ("loss", "margin", "kl_ref", "gradient")
    return {f"reference_on_actors.{name}": worst(*(gap("abs", a[i], b[i]) for a, b in results))
            for i, name in enumerate(names)}


def probe_policy_batch(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_policy.py: chain 2 of a batch of 2 vs the same seed alone."""
    from policy import DiffusionPolicy, SamplerConfig

    pol = DiffusionPolicy.from_pretrained(s.model_dir, sampler=SamplerConfig(num_steps=8, guidance_scale=4.0))
    a, b = seeds_of(seed, 2)
    both = pol.sample(helpers.PROMPTS[:2], [a, b], decode=False)
    alone = pol.sample(helpers.PROMPTS[1:2], [b], decode=False)
    return {"policy.batch_vs_alone": gap("abs", alone.latents, both.latents[:, 1:2])}


def probe_guided_reward(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_method_behaviour.py: a guided winner's stored brightness vs that of its decoded x0."""
    from actors.records import from_table

    worker = helpers.brightness_worker(s.config(seed, guidance=GUIDED))
    t = from_table(generate(worker, seed)).tensors
    kept = helpers.Brightness()(worker.policy.decode(t["x0_w"]), None)
    return {"guided_reward.stored_vs_recomputed": gap("abs", t["reward_w"], kept)}


def probe_world(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_world.py: 8 noisy renders, each world reward."""
    from rewards.world import WorldFidelity, WorldPreference, WorldReward

    images, prompts = helpers.world_scored_batch(seed, n=8)
    images = images.float().requires_grad_(True)
    spreads = []
    for reward in (WorldFidelity(), WorldPreference(), WorldReward()):
        batch, single, back = helpers.world_scores_three_ways(reward, images, prompts, seed)
        spreads += [gap("abs", single, batch.detach()), gap("abs", back, batch.detach())]
    return {"world.batch_vs_single": worst(*spreads)}


def _batch_vs_singles(reward, images: torch.Tensor, prompts: list[str]) -> Gap:
    batch, singles, _ = reward_fixtures.batch_and_singles(reward, images, prompts)
    return gap("abs", torch.cat(singles).detach(), batch.detach())


def probe_reward_models(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_rewards_models.py's contract on the tiny open_clip rewards and PickScore, their image sizes."""
    from rewards.registry import build_reward

    clip = s.clip_files.options
    cases = [("clip_score", clip, (4, 32, 32)), ("hps", clip, (4, 24, 32)),
             ("aesthetic", {**clip, "head": str(s.clip_files.dir / "head.pth")}, (3, 48, 40)),
             ("pickscore", {"model_dir": str(s.pick_dir), "device": "cpu"}, (4, 32, 32))]
    spreads = []
    for name, options, (n, h, w) in cases:
        reward = build_reward(name, {name: options})
        spreads.append(_batch_vs_singles(reward, reward_fixtures.quantised_images(n, h, w, seed=seed),
                                         reward_fixtures.PROMPTS[:n]))
    return {"reward_models.batch_vs_singles": worst(*spreads)}


def probe_imagereward(s: Setup, seed: int) -> dict[str, Gap]:
    """tests/test_rewards_models.py's contract on ImageReward: 2 images of 64 px (resized to 224)."""
    images = reward_fixtures.quantised_images(2, 64, 64, seed=seed)
    return {"imagereward.batch_vs_singles": _batch_vs_singles(s.imagereward, images, reward_fixtures.PROMPTS[2:])}


PROBES: dict[str, Callable[[Setup, int], dict[str, Gap]]] = {
    "learner_group": probe_learner_group, "grad_accum": probe_grad_accum,
    "recomputed_logprob": probe_recomputed_logprob, "stored_logprob": probe_stored_logprob,
    "learner_side": probe_learner_side, "policy_batch": probe_policy_batch, "guided_reward": probe_guided_reward,
    "world": probe_world, "reward_models": probe_reward_models, "imagereward": probe_imagereward,
}


# ---- running ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The libraries' warnings and info logs off (their tests filter them too)."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(level)


def measure(probes: list[str], seeds: int) -> tuple[dict[str, list[Gap]], dict[str, float]]:
    """Every seed's gaps of every comparison the probes measure, and each probe's seconds."""
    spreads: dict[str, list[Gap]] = {}
    seconds: dict[str, float] = {}
    torch.set_num_threads(1)  # as the learner and rollout actors (train/rollout torch_threads) and the tests after
    with tempfile.TemporaryDirectory() as tmp, quiet():
        setup = Setup(Path(tmp))
        for name in probes:
            t0 = time.perf_counter()
            for seed in range(seeds):
                for comparison, value in PROBES[name](setup, seed).items():
                    spreads.setdefault(comparison, []).append(value)
            seconds[name] = round(time.perf_counter() - t0, 1)
            seen = {c: f"{worst(*v)[0]:.2g}" for c, v in spreads.items() if by_name()[c].probe == name}
            print(f"{name}: {seconds[name]} s, max spread {seen}", flush=True)
    return spreads, seconds


@functools.cache
def by_name() -> dict[str, Comparison]:
    return {c.name: c for c in COMPARISONS}


def entry(c: Comparison, gaps: list[Gap], seconds: float) -> dict[str, Any]:
    """A comparison's JSON entry: its largest spread and the bound set from it (never below ``FLOOR_ULPS``
    float32 ulps of the values compared, in case this machine happens to round both sides alike)."""
    spread, scale = worst(*gaps)
    floor = FLOOR_ULPS * torch.finfo(torch.float32).eps * scale
    bound = clean_ceil(max(MARGIN * spread, floor))
    return {"name": c.name, "kind": c.kind, "tests": c.tests, "what": c.what, "probe": c.probe, "seeds": len(gaps),
            "max_spread": float(f"{spread:.3g}"), "value_scale": float(f"{scale:.3g}"), "bound": bound,
            "ratio": round(bound / spread, 1) if spread else None, "probe_seconds": seconds,
            "comment": comment(spread, len(gaps), bound)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per comparison (default {SEEDS}; >= 20)")
    ap.add_argument("--only", nargs="*", default=None, metavar="PREFIX",
                    help="measure only the comparisons whose name starts so; keep the others' entries")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.seeds < 20:
        ap.error("--seeds must be at least 20: a bound is only as good as the spread it was set from")
    wanted = [c for c in COMPARISONS if args.only is None or any(c.name.startswith(p) for p in args.only)]
    probes = list(dict.fromkeys(c.probe for c in wanted))
    spreads, seconds = measure(probes, args.seeds)
    old = json.loads(args.out.read_text())["comparisons"] if args.out.exists() and args.only is not None else []
    kept = {e["name"]: e for e in old}
    for c in COMPARISONS:
        if c.name in spreads:
            kept[c.name] = entry(c, spreads[c.name], seconds[c.probe])
    doc = {"about": "written by python -m bench.tolerances: bound >= 3x the largest float-order spread seen "
                    "(tests/helpers.py tolerance(name) reads it; tests/test_tolerances.py checks it)",
           "margin": MARGIN, "required_ratio": REQUIRED, "machine": machine_info(),
           "comparisons": [kept[c.name] for c in COMPARISONS if c.name in kept]}
    doc["probe_seconds"] = round(sum({e["probe"]: e["probe_seconds"] for e in doc["comparisons"]}.values()), 1)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for e in doc["comparisons"]:
        ratio = f"{e['ratio']}x" if e["ratio"] else "(floor)"
        print(f"{e['name']:38s} {e['kind']:8s} max {e['max_spread']:<9.3g} bound {e['bound']:<8g} {ratio}")
    print(f"wrote {args.out}; the probes take {doc['probe_seconds']} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
