"""Experiment configuration: one tree of dataclasses, loaded from YAML and overridden from the command line.

Every leaf is a CLI flag named by its dotted path (``--loss.beta 0.1``); ``--help`` lists them all with their
defaults. Values are parsed as YAML (so ``--reward.spec '{world: 1.0}'`` works) and validated by the
dataclasses themselves; an unknown key fails with one line and a suggestion. The sampler, LoRA and time-weighting
sections reuse the classes the code runs on, so a setting cannot drift between config and code.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from learner.time_weighting import TimeWeightConfig
from policy.lora import LoraSettings
from policy.policy import SamplerConfig


class ConfigError(ValueError):
    """A configuration problem, reported as one actionable line."""


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name} must be one of {list(allowed)}, got {value!r}")


def _positive(section: str, name: str, value: float, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        raise ConfigError(f"{section}.{name} must be {'>' if strict else '>='} 0, got {value}")


@dataclass
class ModelConfig:
    path: str = "world/model"  # a local diffusers-layout directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # rollout/learner compute dtype
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu

    def __post_init__(self) -> None:
        _choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class PairsConfig:
    kind: Literal["step_branch", "trajectory"] = "step_branch"
    # step_branch: step indices (generation order, 0 = first step from x_T) where two children are drawn and
    # ranked; TailorPO trains at t = 20, 16, 12, 8, 4 of 20 steps, i.e. indices 0, 4, 8, 12, 16.
    branch_steps: tuple[int, ...] = (0, 4, 8, 12, 16)

    def __post_init__(self) -> None:
        _choice("pairs", "kind", self.kind, ("step_branch", "trajectory"))
        if self.kind == "step_branch" and not self.branch_steps:
            raise ConfigError("pairs.branch_steps must name at least one step for step_branch pairs")
        if any(k < 0 for k in self.branch_steps):
            raise ConfigError(f"pairs.branch_steps must be >= 0, got {list(self.branch_steps)}")


@dataclass
class LossConfig:
    kind: Literal["dpo_logprob", "diffusion_dpo", "dense_dpo"] = "dpo_logprob"
    beta: float = 0.1
    ratio_clip: float | None = None  # D3PO/SPO two-sided ratio clamp eps
    scale_c: float = 10.0  # dense_dpo: C
    kappa: float | None = 1e-4  # dense_dpo: per-step log-ratio clip
    num_step_samples: int = 3  # dense_dpo / trajectory pairs: M step indices per pair

    def __post_init__(self) -> None:
        _choice("loss", "kind", self.kind, ("dpo_logprob", "diffusion_dpo", "dense_dpo"))
        _positive("loss", "beta", self.beta)
        _positive("loss", "scale_c", self.scale_c)
        if self.ratio_clip is not None and not 0 < self.ratio_clip < 1:
            raise ConfigError(f"loss.ratio_clip must be in (0, 1) or null, got {self.ratio_clip}")
        if self.kappa is not None:
            _positive("loss", "kappa", self.kappa)
        if self.num_step_samples < 1:
            raise ConfigError(f"loss.num_step_samples must be >= 1, got {self.num_step_samples}")


@dataclass
class ReferenceConfig:
    strategy: Literal["frozen", "stable_update"] = "frozen"
    tau: int = 32  # stable_update: replace the reference every tau learner steps
    delta: float = 0.005  # ... while D(candidate || initial) <= delta; past it the reference freezes
    ema: float | None = None  # soft replacement weight instead of a hard copy
    divergence: Literal["log_ratio", "kernel_kl"] = "log_ratio"
    divergence_samples: int = 4  # winner samples used to estimate D

    def __post_init__(self) -> None:
        _choice("reference", "strategy", self.strategy, ("frozen", "stable_update"))
        _choice("reference", "divergence", self.divergence, ("log_ratio", "kernel_kl"))
        if self.tau < 1:
            raise ConfigError(f"reference.tau must be >= 1, got {self.tau}")
        _positive("reference", "delta", self.delta)
        if self.ema is not None and not 0 < self.ema <= 1:
            raise ConfigError(f"reference.ema must be in (0, 1] or null, got {self.ema}")
        if self.divergence_samples < 1:
            raise ConfigError(f"reference.divergence_samples must be >= 1, got {self.divergence_samples}")


@dataclass
class GuidanceConfig:
    kind: Literal["none", "reward_gradient"] = "none"
    eta_lo: float = 0.1  # TailorPO-G: cosine schedule from eta_lo (first step) to eta_hi (last step)
    eta_hi: float = 0.2
    delta: float = 0.5
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        _choice("guidance", "kind", self.kind, ("none", "reward_gradient"))
        _positive("guidance", "eta_lo", self.eta_lo, strict=False)
        _positive("guidance", "eta_hi", self.eta_hi, strict=False)
        _positive("guidance", "delta", self.delta)


@dataclass
class RewardConfig:
    spec: dict[str, float] = field(default_factory=lambda: {"world": 1.0})
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-reward kwargs (paths, devices)
    num_actors: int = 1
    num_gpus: float = 0.0
    max_batch: int = 256  # a reward actor scores at most this many images in one call
    max_wait_ms: float = 2.0  # ... and waits this long to fill a batch from several rollout actors

    def __post_init__(self) -> None:
        if not self.spec:
            raise ConfigError("reward.spec must name at least one reward, e.g. {world: 1.0}")
        if self.num_actors < 0:
            raise ConfigError(
                f"reward.num_actors must be >= 0 (0 = score inside rollout actors), got {self.num_actors}")
        _positive("reward", "num_gpus", self.num_gpus, strict=False)
        if self.max_batch < 1:
            raise ConfigError(f"reward.max_batch must be >= 1, got {self.max_batch}")


@dataclass
class RolloutConfig:
    num_actors: int = 1
    prompts_per_task: int = 8  # chains per generate call (adapted to each actor's speed when adapt_batch)
    adapt_batch: bool = True
    target_task_seconds: float = 3.0  # adaptive batches aim at this duration per generate call
    max_prompts_per_task: int = 64
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    torch_threads: int = 1
    # testing aid: extra seconds per chain and denoising step, actor i takes slowdown_s[i % len] (slow GPUs)
    slowdown_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("num_actors", "prompts_per_task", "max_prompts_per_task", "torch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        _positive("rollout", "target_task_seconds", self.target_task_seconds)
        _positive("rollout", "num_gpus", self.num_gpus, strict=False)


@dataclass
class TrainConfig:
    steps: int = 200  # learner updates
    batch_size: int = 32  # preference pairs per update
    lr: float = 3e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    broadcast_every: int = 1  # K: publish the policy every K updates
    mode: Literal["sync", "async"] = "async"
    max_staleness: int = 1  # async: records older than this many published versions are dropped
    max_nan_steps: int = 5  # stop after this many non-finite losses in a row
    # how a new policy reaches the rollout actors: one ray.put of safetensors bytes, or a ray.util.collective
    # broadcast from the learner (gloo on CPU, nccl on GPUs: "auto"); the collective is a barrier that waits
    # for every actor's in-flight rollout
    weight_sync: Literal["object_store", "collective"] = "object_store"
    collective_backend: Literal["auto", "gloo", "nccl"] = "auto"
    seed: int = 0
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    torch_threads: int = 1

    def __post_init__(self) -> None:
        _choice("train", "mode", self.mode, ("sync", "async"))
        _choice("train", "weight_sync", self.weight_sync, ("object_store", "collective"))
        _choice("train", "collective_backend", self.collective_backend, ("auto", "gloo", "nccl"))
        for name in ("steps", "batch_size", "broadcast_every", "max_nan_steps", "torch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        _positive("train", "lr", self.lr)
        _positive("train", "weight_decay", self.weight_decay, strict=False)
        _positive("train", "grad_clip", self.grad_clip)
        if self.max_staleness < 0:
            raise ConfigError(f"train.max_staleness must be >= 0, got {self.max_staleness}")


@dataclass
class DataConfig:
    train_prompts: str = "world:train"  # "world:train" | "world:heldout" | a text file, one prompt per line
    eval_prompts: str = "world:heldout"
    offline_dataset: str | None = None  # a trajectory-log directory: train from it without actors


@dataclass
class EvalConfig:
    every: int = 50  # learner updates between evaluations (0: only before and after)
    num_prompts: int = 64
    seeds_per_prompt: int = 2
    grid_prompts: int = 8

    def __post_init__(self) -> None:
        if self.every < 0 or self.num_prompts < 1 or self.seeds_per_prompt < 1 or self.grid_prompts < 0:
            raise ConfigError("eval: every >= 0, num_prompts >= 1, seeds_per_prompt >= 1, grid_prompts >= 0")


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    trajectory_log: bool = False
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("output.checkpoint_every and output.keep_checkpoints must be >= 1")


@dataclass
class RayConfig:
    address: str | None = None  # null: start a local Ray; "auto": join the running cluster
    num_cpus: int | None = None  # local Ray only


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    time_weight: TimeWeightConfig = field(default_factory=TimeWeightConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.pairs.kind == "step_branch":
            bad = [k for k in self.pairs.branch_steps if k >= self.sampler.num_steps]
            if bad:
                raise ConfigError(f"pairs.branch_steps {bad} are beyond sampler.num_steps={self.sampler.num_steps}")
        if self.guidance.kind == "reward_gradient" and self.pairs.kind != "step_branch":
            raise ConfigError("guidance.kind=reward_gradient needs pairs.kind=step_branch (TailorPO-G)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building from nested dicts, with type coercion -----------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}") from None
    return value


def build(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a (partial) nested dict; unknown keys are errors."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # validation inside a reused class (SamplerConfig, LoraSettings, ...)
        raise ConfigError(str(e)) from None


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            out.extend(_leaves(hints[f.name], key + "."))
        else:
            out.append((key, f))
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--section.key`` flag per config leaf, its default shown in ``--help``."""
    defaults = Config().to_dict()
    group = parser.add_argument_group("config keys (override the YAML; values are parsed as YAML)")
    for key, _ in _leaves(Config):
        node: Any = defaults
        for part in key.split("."):
            node = node[part]
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar="V", default=None, help=f"default: {node!r}")


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    """The YAML tree (``base``) with every ``--section.key`` given on the command line applied on top."""
    tree = base or {}
    for name, raw in vars(args).items():
        if name.startswith("cfg:") and raw is not None:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            _set_dotted(tree, name[4:], value)
    return build(Config, tree)
