"""``python -m learner.main``: start (or join) Ray, place the roles, run the loop, report.

With no flags it runs ``configs/default.yaml``: the embedded world on CPU, finishing in minutes, and prints
the held-out reward before and after alignment with standard errors. On a cluster: ``--ray.address auto``.
Every config key is a flag (``--help`` lists them); problems a user can fix end in one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import sys
import time
import typing
import uuid
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from ruamel.yaml.error import YAMLError

from learner.config import Config, ConfigError, bounds, build_config, constraints, load_yaml, parse_yaml

if typing.TYPE_CHECKING:
    from learner.group import LearnerGroup

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
LOG = logging.getLogger("dpr")
# Environment of every Ray worker: one BLAS thread unless an actor asks for more, and no hub access ever.
# (Weights travel as safetensors bytes, not torch tensors, so Ray's zero-copy tensor flag is not needed.)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1"}
# Ray's own switch for single-machine use: the node address is 127.0.0.1, so a local Ray's servers listen on the
# loopback interface only (read when ``ray`` is first imported; see docs/operations.md, "Security").
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The config from ``--config`` with every ``--section.key`` flag applied on top; ``--help`` lists each key
    with its description, what it allows and the value the chosen YAML gives it."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML")
    pre.add_argument("--num-actors", type=int, default=None, help="shortcut for --rollout.num_actors")
    pre.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    base = load_yaml(pre.parse_known_args(argv)[0].config)
    parser = argparse.ArgumentParser(prog="python -m learner.main", description=__doc__.split("\n\n")[0],
                                     parents=[pre], allow_abbrev=False)
    add_config_arguments(parser, build_config(base))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"{unknown_flag(unknown[0])} (unrecognized arguments: {' '.join(unknown)})")
    if args.num_actors is not None:
        base.setdefault("rollout", {})["num_actors"] = args.num_actors
    for key, raw in vars(args).items():
        if key.startswith("cfg:"):
            *parents, leaf = key[4:].split(".")
            node = base
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = parse_value(raw, f"--{key[4:]}")
    return build_config(base), args


def config_leaves(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(dotted key, field) of every leaf of the config schema."""
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += config_leaves(info.annotation, f"{prefix}{name}.")
        else:
            out.append((prefix + name, info))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, shown: Config) -> None:
    """One ``--section.key`` flag per config leaf; its help shows the value ``shown`` holds."""
    values = shown.model_dump(mode="json")
    group = parser.add_argument_group("config keys (override the YAML; values are parsed as YAML 1.2)")
    for key, info in config_leaves():
        value: Any = values
        for part in key.split("."):
            value = value[part]
        allowed = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
        text = [info.description or "", f"one of {list(allowed)}" if allowed else bounds(constraints(info)),
                f"value: {json.dumps(value)}"]
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar="V", default=argparse.SUPPRESS,
                           help="; ".join(t for t in text if t).replace("%", "%%"))


def parse_value(raw: str, flag: str) -> Any:
    """A command-line value as YAML 1.2, as files are read (``{world: 1.0}``, ``null``, ``[0, 4]``; ``off`` is
    text); text that is not YAML (``[::1]:6379``) stays text, and a mapping that repeats a key is refused."""
    try:
        return parse_yaml(raw, flag)
    except YAMLError:
        return raw


def unknown_flag(flag: str) -> str:
    keys = [k for k, _ in config_leaves()]
    close = difflib.get_close_matches(flag.removeprefix("--"), keys, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{flag.removeprefix('--')}'{hint}" if flag.startswith("--") else "unexpected value"


def start_ray(cfg: Config) -> bool:
    """Start a local Ray or join ``ray.address``; returns False when Ray was already running in this process."""
    import ray

    from cluster.resources import LEARNER, ROLLOUT
    from learner.preflight import cluster_demand

    if ray.is_initialized():
        return False
    env = {"env_vars": WORKER_ENV}
    if cfg.ray.address:
        try:
            ray.init(address=cfg.ray.address, runtime_env=env, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot reach the Ray cluster at {cfg.ray.address!r} ({str(e).splitlines()[0]}); "
                              "start it with `ray up cluster/gpu.yaml` or `ray start --head`, or drop "
                              "--ray.address to run locally") from None
        return True
    demand = cluster_demand(cfg)
    gpus = math.ceil(demand.total("GPU"))
    ray.init(num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(demand.total("CPU"))),
             include_dashboard=False,
             resources={LEARNER: cfg.train.num_learners, ROLLOUT: max(gpus, 1)}, runtime_env=env,
             logging_level=logging.WARNING)
    return True


def launch(cfg: Config, run_id: str) -> tuple[LearnerGroup, list[Any], list[Any]]:
    """Create the learner ranks (``train.num_learners``, joined into one process group), reward and rollout
    actors with their resources and failure policies.

    Actors are named ``dpr-<run>-<role>-<i>`` (rank 0 of the learners: ``dpr-<run>-learner``) so that operators
    (and the fault-injection test) can find them.
    An off-policy run (``data.offline_dataset``) starts the learner only.
    """
    import ray

    from actors.reward import start_reward_actors
    from actors.rollout import RolloutWorker
    from cluster.resources import actor_resources
    from learner.group import LearnerGroup
    from learner.trainer import Learner

    # a reward with reward.options.<name>.runtime_env runs in its own actor and environment, offline runs too
    # (the learner's evaluation scores with it)
    rewards, own = start_reward_actors(cfg.reward, f"dpr-{run_id}", not cfg.data.offline_dataset, WORKER_ENV)
    learners = LearnerGroup([
        ray.remote(Learner).options(
            num_cpus=cfg.train.torch_threads, max_restarts=0, name=f"dpr-{run_id}-learner" + (f"-{i}" if i else ""),
            **actor_resources("learner", cfg.train.num_gpus, cfg.train.accelerator_type)).remote(cfg, own)
        for i in range(cfg.train.num_learners)])
    rollouts = [
        ray.remote(RolloutWorker).options(
            num_cpus=cfg.rollout.torch_threads, max_restarts=-1, max_task_retries=0, name=f"dpr-{run_id}-rollout-{i}",
            **actor_resources("rollout", cfg.rollout.num_gpus, cfg.rollout.accelerator_type)).remote(
                cfg.rollout_settings(), i, rewards, own)
        for i in range(cfg.rollout.num_actors if not cfg.data.offline_dataset else 0)
    ]
    wait_ready(learners.ranks, rollouts, [*rewards, *own])
    backend = cfg.train.collective_backend
    learners.connect(("nccl" if cfg.train.num_gpus >= 1 else "gloo") if backend == "auto" else backend)
    return learners, rollouts, [*rewards, *own]


def wait_ready(learners: list[Any], rollouts: list[Any], rewards: list[Any]) -> None:
    """Turn an actor that cannot start (bad path, bad reward option) into one line instead of a Ray traceback."""
    import ray
    from ray.exceptions import RayActorError

    checks = [("learner" + (f" {i}" if i else ""), a.__ray_ready__.remote()) for i, a in enumerate(learners)]
    checks += [(f"reward actor {i}", a.__ray_ready__.remote()) for i, a in enumerate(rewards)]
    checks += [(f"rollout actor {i}", a.__ray_ready__.remote()) for i, a in enumerate(rollouts)]
    for name, ref in checks:
        try:
            ray.get(ref)
        except RayActorError as e:
            raise ConfigError(f"{name} failed to start: {root_cause(e)}") from None


def actor_memory(roles: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    """Each role's largest actor process, in MiB, read by psutil inside the actor once it is ready: resident (RSS)
    and unique (USS: what the process alone holds, the figure learner.preflight's local cap is built from)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    def usage(_: Any) -> tuple[int, int]:
        info = psutil.Process().memory_full_info()
        return info.rss, info.uss

    out = {}
    for role, handles in roles.items():
        try:
            figures = ray.get([h.__ray_call__.remote(usage) for h in handles], timeout=60)
        except (RayActorError, GetTimeoutError):  # a role whose actor just died is left out; the loop recovers it
            continue
        if figures:
            out[role] = {"rss_mb": max(r for r, _ in figures) / 2**20, "uss_mb": max(u for _, u in figures) / 2**20}
    return out


def autoscaler_runs() -> bool:
    """Whether the joined cluster runs Ray's autoscaler (its monitor publishes the status ``ray status`` shows;
    Ray is pinned, see docs/design.md)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(DEBUG_AUTOSCALING_STATUS) is not None


def root_cause(e: BaseException) -> str:
    """The last line of the innermost error message (what the user can act on)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return (errs or lines or [type(e).__name__])[-1]


def local_only(cfg: Config) -> None:
    """A local run's Ray listens on 127.0.0.1 only; this must happen before ``ray`` is first imported (a process
    that imported it earlier keeps Ray's default, the machine's address)."""
    if not cfg.ray.address and "ray" not in sys.modules:
        os.environ.update(LOCAL_ONLY_ENV)


def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    local_only(cfg)
    import ray

    from learner.loop import Driver
    from learner.metrics import RunLogger
    from learner.preflight import check_cluster, clear_outputs, preflight
    from learner.report import held_out_summary
    from learner.small_box import small_box_layout

    cfg, small_box = small_box_layout(cfg)
    inputs = preflight(cfg, resume, local_ray=not cfg.ray.address and not ray.is_initialized())
    out = Path(cfg.output.dir)
    t0 = time.perf_counter()
    owns_ray = start_ray(cfg)
    actors: list[Any] = []
    try:
        check_cluster(cfg, ray.cluster_resources(), autoscaling=bool(cfg.ray.address) and autoscaler_runs())
        if cfg.output.overwrite and out.is_dir():
            clear_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.model_dump_json(indent=2))
        learners, rollouts, rewards = launch(cfg, uuid.uuid4().hex[:6])
        actors = [*learners.ranks, *rollouts, *rewards]
        with RunLogger(out, tensorboard=cfg.output.tensorboard) as logger:
            if small_box:  # said once the run is under way: a refused run's error stays its only line
                LOG.info("small-box mode (ray.small_box: off to disable): %s",
                         ", ".join(f"{k}={v}" for k, v in small_box.items()))
                logger.event("small_box", **small_box)
            logger.event("actor_memory", **actor_memory({"learner": learners.ranks, "rollout": rollouts,
                                                         "reward": rewards}))
            driver = Driver(cfg, learners, rollouts, out, inputs.train_prompts, inputs.eval_prompts, logger, resume,
                            rewards)
            after = driver.run()
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if owns_ray:
            ray.shutdown()
    # the whole run's time: this process's plus what the checkpoint a resume started from had recorded
    seconds = time.perf_counter() - t0 + driver.checkpoints.restored_elapsed
    summary = {**driver.summary(), "seconds": seconds, "images_per_s": driver.counters.chains / seconds,
               "after": after["heldout_reward_mean"], "after_se": after["heldout_reward_sem"]}
    before = driver.evaluator.results.get("before")
    if before is not None:
        summary.update(held_out_summary(before, after))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, out)
    return summary


def print_summary(s: dict[str, Any], out: Path) -> None:
    print(f"\n{'=' * 72}\nrun finished: {s['steps']} learner updates, {s['chains']} chains in {s['seconds']:.0f} s "
          f"({s['images_per_s']:.1f} images/s)")
    if "before" in s:
        print(f"held-out reward  before: {s['before']:.4f} ± {s['before_se']:.4f}   "
              f"after: {s['after']:.4f} ± {s['after_se']:.4f}")
        print(f"paired gain: {s['gain']:+.4f} ± {s['gain_se']:.4f}  ({s['gain_in_se']:.1f} standard errors)")
    print(f"actor failures recovered: {s['actor_failures']}, stale pairs dropped: {s['dropped_stale_pairs']}, "
          f"non-finite steps skipped: {s['nonfinite_skipped']}")
    print(f"outputs: {out}/ (before_after.png, reward_curve.png, metrics.jsonl, tb/, checkpoints/)\n{'=' * 72}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg, args = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    local_only(cfg)
    from learner.loop import LearnerDiedError
    from learner.weights import ActorLostError, WeightSyncError
    from policy.components import ModelPathError
    from rewards.base import RewardConfigError

    try:
        run(cfg, resume=args.resume)
    except (ConfigError, ModelPathError, RewardConfigError, FileNotFoundError, LearnerDiedError,
            WeightSyncError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ActorLostError) as e:
        print(f"{'interrupted' if isinstance(e, KeyboardInterrupt) else f'error: {e}'}; {resume_hint(cfg)}",
              file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    except Exception as e:  # an error raised inside an actor: one line, the full trace is in Ray's logs
        import ray

        if not isinstance(e, ray.exceptions.RayError):
            raise
        print(f"error: {root_cause(e)} (trace in /tmp/ray/session_latest/logs); {resume_hint(cfg)}", file=sys.stderr)
        return 1
    return 0


def resume_hint(cfg: Config) -> str:
    """How to continue: ``--resume`` naming the checkpoint it would load, or that there is none."""
    from learner.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(Path(cfg.output.dir) / "checkpoints")
    if ckpt is None:
        return (f"no checkpoint was written (every output.checkpoint_every={cfg.output.checkpoint_every} updates), "
                "so rerun from the start with --output.overwrite true")
    return f"continue with --resume (it loads {ckpt})"


if __name__ == "__main__":
    sys.exit(main())
