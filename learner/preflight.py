"""Pre-flight: every check that can fail on the user's input runs here, in the driver, before Ray starts and
before anything is written, so a bad value, path or size ends in one ``ConfigError`` line in seconds instead of a
traceback minutes later inside an actor.

Checked: the model directory, the prompt sets (and that the configured rewards can score every prompt), the
offline dataset (schema, row count and that loss.kind trains on its kind of pairs, from the Parquet footers, no
data read), the output directory (creatable, writable, not holding another run unless resumed or overwritten),
the checkpoint a ``--resume`` would load, and for a local Ray the actors' CPUs, GPUs and memory against this
machine. The rules between config sections (guidance needs a differentiable reward, ...) are checked earlier, when
the config is built (``Config``'s validator, learner/config.py). Once Ray is up (started here, joined with
``ray.address`` or already running in this process), ``check_cluster`` compares the actors' resources with what
Ray reports, before any actor is created.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from learner.config import Config, ConfigError
from learner.methods import find_method

# Memory per actor process for the local cap, a measured constant rather than a start-up measurement: the cap must
# hold before Ray starts (a refused run starts nothing), measuring would first start a rollout actor (~20 s of every
# run, and the learner's figure would still be a guess), and the figure changes only with the model, which is
# budgeted separately; every run logs the measured figures (the `actor_memory` event) so a drift shows. Measured on
# 2026-11-30 on the embedded world model (configs/default.yaml, `python -m learner.main --train.steps 1`, the
# actor_memory event, psutil inside each ready actor): a Ray worker that has imported torch, diffusers and the policy
# holds ~0.5 GiB of its own (USS learner 497, rollout 496, reward 459 MiB; RSS 896, 892, 824 MiB with the shared
# libraries). Each also holds its model's weights, plus activations, gradients and optimizer state: budgeted as 4x
# the model directory's size.
PROCESS_BYTES = 512 << 20
MODEL_COPIES = 4
MEMORY_FRACTION = 0.9  # of MemAvailable that the run may plan to use
OVERSUBSCRIBE = 4  # local runs may ask Ray for up to this many CPUs per core (processes share the cores)
# What a run writes into output.dir; --output.overwrite true removes exactly these before starting.
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "events.jsonl", "summary.json", "tb", "checkpoints", "trajectories",
               "reward_curve.png", "before_after.png", "samples_*.png")


@dataclass(frozen=True)
class Inputs:
    train_prompts: list[str]
    eval_prompts: list[str]


def preflight(cfg: Config, resume: bool, local_ray: bool) -> Inputs:
    """Run every check (the ``local_ray`` ones only when this process will start Ray itself)."""
    from learner.prompts import load_prompts
    from policy.components import check_model_dir

    check_model_dir(cfg.model.path)
    train, heldout = load_prompts(cfg.data.train_prompts), load_prompts(cfg.data.eval_prompts)
    check_prompts(cfg, {"data.train_prompts": train, "data.eval_prompts": heldout})
    if cfg.data.offline_dataset is not None:
        check_dataset(Path(cfg.data.offline_dataset), cfg.loss.kind)
    if local_ray:
        check_local_resources(cfg)
    if cfg.ray.address:
        probe_address(cfg.ray.address)
    check_output(Path(cfg.output.dir), resume, cfg.output.overwrite)
    return Inputs(train, heldout)


def check_prompts(cfg: Config, sets: dict[str, list[str]]) -> None:
    """The configured rewards exist, take their options and can score every prompt of ``sets``."""
    from rewards.base import RewardConfigError
    from rewards.registry import check_spec

    for key, prompts in sets.items():
        try:
            check_spec(cfg.reward.spec, cfg.reward.options, prompts)
        except RewardConfigError as e:
            text = str(e)
            raise ConfigError(f"{key}: {text}" if text.startswith("prompt") else
                              text if text.startswith("reward.") else f"reward.spec: {text}") from None


def check_dataset(root: Path, loss: str) -> None:
    """The trajectory log's files parse, share one record schema, hold at least one row, and are of a kind of pairs
    that ``loss`` trains on (footers only; else the learner would fail at its first update)."""
    from actors.records import TrajectoryLog

    if not root.is_dir():
        raise ConfigError(f"data.offline_dataset: directory not found: {root}")
    try:
        kind, rows = TrajectoryLog(root).describe()
    except ValueError as e:
        raise ConfigError(f"data.offline_dataset: {e}; point it at a log that output.trajectory_log wrote") from None
    if rows == 0:
        raise ConfigError(f"data.offline_dataset: the record files under {root} hold no rows")
    try:
        find_method(loss, kind)
    except ValueError as e:
        raise ConfigError(f"data.offline_dataset: {root} holds {kind} pairs, and {e}") from None


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """``out`` can be created and written, and holds no other run unless ``resume`` or ``overwrite``."""
    from learner.checkpoint import latest_checkpoint

    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"output.dir: {existing} is a file, so {out} cannot be a directory; choose another "
                          "--output.dir")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir: {existing} is not writable; choose another --output.dir")
    if resume:
        if overwrite:
            raise ConfigError("--resume continues the run in output.dir and --output.overwrite true replaces it: "
                              "pick one")
        skipped: list[str] = []
        if latest_checkpoint(out / "checkpoints", skipped) is None:
            why = f" (the newest is unusable: {skipped[0]})" if skipped else ""
            raise ConfigError(f"--resume: no complete checkpoint under {out / 'checkpoints'}{why}; drop --resume to "
                              "start afresh (with --output.overwrite true if output.dir holds files)")
        return
    if existing == out and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output.dir {out} already holds files (an earlier run?); continue it with --resume, "
                          "replace its outputs with --output.overwrite true, or choose a fresh --output.dir")


def clear_outputs(out: Path) -> None:
    """Remove what an earlier run wrote into ``out`` (``RUN_OUTPUTS``), nothing else."""
    for pattern in RUN_OUTPUTS:
        for path in out.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def check_local_resources(cfg: Config) -> None:
    """The actors fit this machine's cores, GPUs and memory; otherwise name the largest count that fits."""
    r, t = cfg.rollout, cfg.train
    d = cluster_demand(cfg)
    rollouts, rewards, fixed_cpus = d.rollouts, d.rewards, int(d.fixed.get("CPU", 0))
    cpus = fixed_cpus + rollouts * r.torch_threads
    parts = f"learner {t.num_learners}x{t.torch_threads}, rollout {rollouts}x{r.torch_threads}, reward {rewards}"
    if cfg.ray.num_cpus is not None and cfg.ray.num_cpus < cpus:
        raise ConfigError(f"ray.num_cpus={cfg.ray.num_cpus} cannot place the actors, which ask for {cpus} CPUs "
                          f"({parts}): set ray.num_cpus >= {cpus}, or drop it to use this machine's cores")
    cores = os.cpu_count() or 1
    limit = (cfg.ray.num_cpus or 0) or OVERSUBSCRIBE * cores
    fit_cpu = (limit - fixed_cpus) // r.torch_threads
    if rollouts > fit_cpu:
        raise ConfigError(f"rollout.num_actors={rollouts} asks for {cpus} CPUs ({parts}) on a {cores}-core machine "
                          f"(at most {limit} here); use --num-actors {max(fit_cpu, 0)} or fewer, or join a "
                          "cluster with --ray.address")
    gpus = d.total("GPU")
    if gpus > 0:
        import torch

        have = torch.cuda.device_count()
        if gpus > have:
            raise ConfigError(f"the actors ask for {gpus:g} GPUs (train.num_gpus x {t.num_learners}, rollout.num_gpus "
                              f"x {rollouts}, reward.num_gpus x {rewards}) and this machine has {have}; lower them "
                              "or join a cluster with --ray.address")
    available = available_memory()
    if available is None:
        return
    per = PROCESS_BYTES + MODEL_COPIES * directory_bytes(Path(cfg.model.path))
    budget = int(MEMORY_FRACTION * available)
    fixed_processes = t.num_learners + rewards
    fit_mem = budget // per - fixed_processes
    if rollouts > fit_mem:
        processes = fixed_processes + rollouts
        raise ConfigError(f"rollout.num_actors={rollouts} needs ~{processes * per / 2**30:.1f} GiB "
                          f"({processes} processes x ~{per / 2**30:.2f} GiB) and {available / 2**30:.1f} "
                          f"GiB is free; use --num-actors {max(fit_mem, 0)} or fewer")


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), or None where /proc/meminfo does not exist."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a ``host:port`` cluster address does not answer (Ray itself retries for
    ~5 minutes before giving up). ``auto`` is resolved by Ray from the local session file and fails fast."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}); start it with "
                          "`ray up cluster/gpu.yaml` or `ray start --head`, or drop --ray.address to run locally"
                          ) from None


class Demand(NamedTuple):
    """The Ray resources the actors of a run ask for, as ``learner.main.launch`` will create them."""

    fixed: dict[str, float]  # the learner ranks and the reward actors together
    each: dict[str, float]  # one rollout actor
    rollouts: int
    rewards: int  # reward actors (shared and own-environment ones)

    def total(self, resource: str) -> float:
        return self.fixed.get(resource, 0.0) + self.rollouts * self.each.get(resource, 0.0)


def cluster_demand(cfg: Config) -> Demand:
    """What the run's actors ask Ray for (one list of them for the local checks, Ray's local start-up and the
    check against a running cluster)."""
    from cluster.resources import actor_bundle
    from rewards.registry import own_env_rewards

    r, w, t = cfg.rollout, cfg.reward, cfg.train
    online = not cfg.data.offline_dataset
    rewards = (w.num_actors if online and w.main_env_spec() else 0) + len(own_env_rewards(w.options))
    fixed: dict[str, float] = {}
    for count, bundle in ((t.num_learners, actor_bundle("learner", t.torch_threads, t.num_gpus, t.accelerator_type)),
                          (rewards, actor_bundle("reward", 1, w.num_gpus))):
        for k, v in bundle.items():
            fixed[k] = fixed.get(k, 0.0) + count * v
    each = actor_bundle("rollout", r.torch_threads, r.num_gpus, r.accelerator_type)
    return Demand(fixed, each, r.num_actors if online else 0, rewards)


def check_cluster(cfg: Config, have: dict[str, float], autoscaling: bool = False) -> None:
    """The actors fit the resources Ray reports (``have``: ``ray.cluster_resources()``); otherwise one line with
    the largest ``--num-actors`` that fits. A cluster whose autoscaler runs can still add nodes (cluster/NOTES.md:
    ``--num-actors 16`` adds L4 nodes), so there a shortfall is logged, not refused."""
    from cluster.resources import largest_fit

    d = cluster_demand(cfg)
    fit = largest_fit(have, d.fixed, d.each)
    if d.rollouts <= fit:
        return
    need = {k: d.total(k) for k in {*d.fixed, *d.each}}
    short = ", ".join(f"{k} {need[k]:g} > {have.get(k, 0.0):g}" for k in sorted(need) if need[k] > have.get(k, 0.0))
    if autoscaling:
        logging.getLogger("dpr").warning("the actors need more than the Ray cluster has now (%s); waiting for its "
                                         "autoscaler to add nodes", short)
        return
    fix = (f"use --num-actors {fit} or fewer" if fit >= 0 else
           "the learner and reward actors alone do not fit: lower train.num_learners, reward.num_actors or their "
           "num_gpus")
    raise ConfigError(f"the actors ask for more than the Ray cluster has ({short}); {fix}, or add nodes")
