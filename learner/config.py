"""Experiment configuration: the composite of every package's section, loaded from YAML and the command line.

Each package owns its sections as pydantic models (policy: model, sampler, lora; rewards: reward; actors:
pairs, guidance, rollout; the learner: time_weight and reference in their modules, the rest below). The field
types and bounds are the one list of allowed values, and the dotted CLI flags and ``--help`` are generated from
them (learner/main.py). Any problem ends in one ``ConfigError`` line naming the key and what is allowed; an
unknown key gets a did-you-mean. Files and flag values are read as YAML 1.2 (``parse_yaml``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import YAMLError

from actors.config import Bool, ConfigError, GuidanceConfig, PairsConfig, RolloutConfig, RolloutSettings
from learner.methods import find_method, method_names
from learner.reference import ReferenceConfig
from learner.time_weighting import TimeWeightConfig
from policy.components import ModelConfig
from policy.lora import LoraSettings
from policy.policy import SamplerConfig
from rewards.base import RewardConfigError
from rewards.registry import RewardConfig, differentiable

__all__ = ["Config", "ConfigError", "build_config", "load_yaml", "parse_yaml"]


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: str = Field("dpo_logprob", description=f"preference loss, one of {method_names()} (learner/methods)")
    beta: float = Field(0.1, gt=0, description="DPO β")
    ratio_clip: float | None = Field(None, gt=0, lt=1, description="D3PO/SPO two-sided ratio clamp ε (null: none)")
    scale_c: float = Field(10.0, gt=0, description="dense_dpo: C")
    kappa: float | None = Field(1e-4, gt=0, description="dense_dpo: per-step log-ratio clip κ (null: none)")
    num_step_samples: int = Field(3, ge=1, strict=True, description=(
        "dense_dpo and ppo on trajectory pairs: M steps per pair (dense_dpo) or per chain (ppo)"))
    chain_steps: tuple[Annotated[int, Field(ge=0, strict=True)], ...] | None = Field(None, min_length=1, description=(
        "dpo_logprob on trajectory pairs: train every pair at each of these chain positions (0 = the first step "
        "from x_T), one DPO term each with the chain's label (D3PO trains all of them); null: one position a pair, "
        "drawn by time_weight"))
    clip_range: float = Field(1e-4, gt=0, lt=1, description=(
        "ppo: the clipped ratio's ε (DDPO's 1e-4, on per-element mean log-probs: sampler.logprob_reduce mean)"))

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        if kind not in method_names():
            raise ValueError(f"loss.kind must be one of {method_names()}, got {kind!r}")
        return kind


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    steps: int = Field(200, ge=1, strict=True, description="learner updates")
    trainable: Literal["lora", "full"] = Field("lora", description=(
        "lora: train the LoRA adapter; full: the whole UNet (text encoder and VAE frozen), as Diffusion-DPO does"))
    weight_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description=(
        "dtype the published policy travels in (null: as trained); bfloat16 halves a full-UNet broadcast"))
    batch_size: int = Field(32, ge=1, strict=True, description="preference pairs per update")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    broadcast_every: int = Field(1, ge=1, strict=True, description="K: publish the policy every K updates")
    mode: Literal["sync", "async"] = "async"
    max_staleness: int = Field(1, ge=0, strict=True, description=(
        "async: records older than this many published versions are dropped"))
    max_nan_steps: int = Field(5, ge=1, strict=True, description="stop after this many non-finite losses in a row")
    weight_sync: Literal["object_store", "collective"] = Field("object_store", description=(
        "how a new policy reaches the rollout actors: one ray.put of safetensors bytes, or a ray.util.collective "
        "broadcast from the learner (a barrier that waits for every actor's in-flight rollout)"))
    collective_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPUs, else gloo")
    seed: int = Field(0, strict=True)
    num_gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = None
    torch_threads: int = Field(1, ge=1, strict=True)
    grad_accum: int = Field(1, ge=1, strict=True, description=(
        "micro-batches per update: the batch is split into this many chunks whose gradients are accumulated "
        "before one optimizer step (large effective batches in little memory, as the SD-1.5 presets need)"))
    num_learners: int = Field(1, ge=1, strict=True, description=(
        "K data-parallel learner actors: each update's batch is split into K equal shards and the gradients are "
        "averaged across them (learner/group.py); each learner takes torch_threads CPUs and num_gpus GPUs"))


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train_prompts: str = Field("world:train", description='"world:train" | "world:heldout" | a text file')
    eval_prompts: str = "world:heldout"
    offline_dataset: str | None = Field(None, description="a trajectory-log directory: train from it without actors")


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(50, ge=0, strict=True, description="learner updates between evaluations (0: before/after)")
    num_prompts: int = Field(64, ge=1, strict=True)
    seeds_per_prompt: int = Field(2, ge=1, strict=True)
    grid_prompts: int = Field(8, ge=0, strict=True)


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: str = "runs/default"
    checkpoint_every: int = Field(50, ge=1, strict=True)
    keep_checkpoints: int = Field(3, ge=1, strict=True)
    trajectory_log: Bool = False
    tensorboard: Bool = True
    overwrite: Bool = Field(False, description=(
        "start afresh in a dir that holds an earlier run, deleting that run's outputs (default: refuse)"))


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description='null: start a local Ray; "auto": join the running cluster')
    num_cpus: int | None = Field(None, ge=1, strict=True, description="local Ray only")
    small_box: Literal["auto", "on", "off"] = Field("auto", description=(
        "one rollout actor scoring rewards in process beside the learner, threads placed so that sampling and "
        "training overlap (learner/small_box.py); auto: on for a local run on <= 2 cores with one rollout actor"))


class Config(BaseModel):
    """The whole experiment; cross-section rules live in its one validator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    sampler: SamplerConfig = SamplerConfig()
    lora: LoraSettings = LoraSettings()
    pairs: PairsConfig = PairsConfig()
    loss: LossConfig = LossConfig()
    time_weight: TimeWeightConfig = TimeWeightConfig()
    reference: ReferenceConfig = ReferenceConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    reward: RewardConfig = RewardConfig()
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> Config:
        bad = [k for k in self.pairs.branch_steps if k >= self.sampler.num_steps]
        if self.pairs.kind == "step_branch" and bad:
            raise ValueError(f"pairs.branch_steps {bad} are beyond sampler.num_steps={self.sampler.num_steps}")
        if self.loss.chain_steps is not None and (self.loss.kind, self.pairs.kind) != ("dpo_logprob", "trajectory"):
            raise ValueError("loss.chain_steps is for loss.kind=dpo_logprob on pairs.kind=trajectory; set it to null")
        if self.loss.chain_steps is not None and (late := [k for k in self.loss.chain_steps
                                                           if k >= self.sampler.num_steps]):
            raise ValueError(f"loss.chain_steps {late} are beyond sampler.num_steps={self.sampler.num_steps}")
        if self.guidance.kind == "reward_gradient" and len(self.reward.main_env_spec()) < len(self.reward.spec):
            raise ValueError("guidance.kind=reward_gradient needs the reward's gradient in the rollout actor; a reward "
                             "with reward.options.<name>.runtime_env runs in its own actor and has none there")
        if self.guidance.kind == "reward_gradient" and (flat := self._gradient_free_rewards()):
            raise ValueError(f"guidance.kind=reward_gradient needs a differentiable reward; {flat} in reward.spec "
                             "have no gradient: drop them from reward.spec or set guidance.kind: none")
        if self.guidance.kind == "reward_gradient" and self.pairs.kind != "step_branch":
            raise ValueError("guidance.kind=reward_gradient (TailorPO-G) needs pairs.kind=step_branch; set "
                             "guidance.kind: none for trajectory pairs")
        if self.time_weight.grid == "train" and self.loss.kind != "diffusion_dpo":
            raise ValueError("time_weight.grid=train needs loss.kind=diffusion_dpo (sampler log-probs exist only "
                             "on the inference grid)")
        if self.time_weight.mode == "timestep_aware" and self.loss.kind == "dense_dpo":
            raise ValueError("time_weight.mode=timestep_aware scales beta, and loss.kind=dense_dpo has no beta; "
                             "use time_weight.mode=discount")
        if self.train.trainable == "full" and self.reference.ema is not None:
            raise ValueError("reference.ema blends LoRA deltas with the zero delta of the initial model; with "
                             "train.trainable=full use a hard replacement (reference.ema: null)")
        if self.train.batch_size % self.train.num_learners:
            raise ValueError(f"train.batch_size={self.train.batch_size} must be divisible by train.num_learners="
                             f"{self.train.num_learners} (each learner trains on an equal shard of every batch)")
        if self.train.num_learners > 1 and self.train.weight_sync == "collective":
            raise ValueError("train.num_learners > 1 needs train.weight_sync=object_store: the learners' process "
                             "group and ray.util.collective's would both be torch's one default group on rank 0")
        if self.reference.compute_on == "actors" and self.reference.past_cap == "reinit":
            raise ValueError("reference.past_cap=reinit sends the reference back to the initial model, which the "
                             "actors' stored log pi_ref does not follow; use reference.compute_on: learner")
        if self.reference.compute_on == "actors" and self.loss.kind == "diffusion_dpo":
            raise ValueError("reference.compute_on=actors stores the sampler's reference log-probs, which "
                             "loss.kind=diffusion_dpo does not use (its ε-MSE is on latents noised by the learner); "
                             "use reference.compute_on: learner")
        find_method(self.loss.kind, self.pairs.record_kind)
        return self

    def _gradient_free_rewards(self) -> list[str]:
        """The rewards of reward.spec without a gradient, told by the registry without loading any weights."""
        try:
            return [name for name in self.reward.spec if not differentiable(name)]
        except RewardConfigError as e:
            raise ValueError(f"reward.spec: {e}") from None

    def rollout_settings(self) -> RolloutSettings:
        """The sections a rollout actor runs on."""
        return RolloutSettings.model_validate(self).model_copy(update={
            "trainable": self.train.trainable, "weight_dtype": self.train.weight_dtype,
            "reference_on_actors": None if self.reference.compute_on == "learner" else (
                "moving" if self.reference.strategy == "stable_update" else "frozen")})


# ---- one-line errors -------------------------------------------------------------------------------------------
_MUST_BE = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
            "bool_type": "true or false", "bool_parsing": "true or false", "float_type": "a number",
            "float_parsing": "a number", "finite_number": "a finite number", "string_type": "a string",
            "dict_type": "a mapping", "model_type": "a mapping", "tuple_type": "a list", "list_type": "a list",
            "too_short": "non-empty"}


def _field_at(loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """(the model that holds the last key of ``loc``, that key's FieldInfo or None) in the Config schema."""
    model: Any = Config
    for i, part in enumerate(loc):
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if part not in fields:
            return (model if i == len(loc) - 1 and fields else None), None
        if i == len(loc) - 1:
            return model, fields[part]
        model = fields[part].annotation
    return None, None


def bounds(c: dict[str, Any]) -> str:
    """``{"gt": 0, "le": 1}`` → "in (0, 1]"; ``{"ge": 1}`` → ">= 1"."""
    lo = ("(", c["gt"]) if "gt" in c else ("[", c["ge"]) if "ge" in c else None
    hi = (c["lt"], ")") if "lt" in c else (c["le"], "]") if "le" in c else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1]}"
    return f"{'<' if hi[1] == ')' else '<='} {hi[0]}" if hi else ""


def constraints(info: Any) -> dict[str, Any]:
    """A field's numeric bounds, as ``bounds`` takes them."""
    return {k: getattr(m, k) for m in getattr(info, "metadata", []) for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}


def _one_line(error: ValidationError) -> ConfigError:
    e = error.errors()[0]
    loc, kind = tuple(e["loc"]), e["type"]
    key = ".".join(str(p) for p in loc)
    if kind == "extra_forbidden":
        model, _ = _field_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields) if model else [], n=1)
        hint = f"; did you mean '{'.'.join(map(str, (*loc[:-1], close[0])))}'?" if close else ""
        return ConfigError(f"unknown config key '{key}'{hint}")
    if kind == "value_error":
        return ConfigError(str(e["ctx"]["error"]))
    if kind == "literal_error":
        allowed = f"one of {e['ctx']['expected']}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        allowed = bounds(constraints(_field_at(loc)[1]) or e["ctx"])
    else:
        allowed = _MUST_BE.get(kind, e["msg"])
    return ConfigError(f"{key} must be {allowed}, got {e['input']!r}")


def build_config(tree: dict[str, Any] | None = None) -> Config:
    """The Config for a (partial) nested dict, or one ``ConfigError`` line."""
    try:
        return Config.model_validate(tree or {})
    except ValidationError as e:
        raise _one_line(e) from None


def parse_yaml(text: str, source: str) -> Any:
    """``text`` read as YAML 1.2, where ``on``/``off``/``yes``/``no`` are text (YAML 1.1, PyYAML's dialect, reads them
    as booleans, so ``--ray.small_box off`` arrived as False). A key repeated in one mapping, at any depth, is
    refused in one line naming it and ``source`` (a YAML 1.1 reader silently keeps the last value); other syntax
    errors raise ruamel's ``YAMLError``."""
    try:
        return YAML(typ="safe", pure=True).load(text)  # pure: the C reader knows YAML 1.1 only
    except DuplicateKeyError as e:
        key = e.problem.removeprefix('found duplicate key "').split('" with value')[0]
        raise ConfigError(f"{source}: duplicate key '{key}' (line {e.problem_mark.line + 1}); keep one of them"
                          ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = parse_yaml(p.read_text(), str(p)) or {}
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data
