"""The config sections the actors own (pairs, guidance, rollout) and the bundle a rollout actor is built from.

Sections are pydantic models: the field types and bounds are the one list of allowed values, unknown keys are
refused, and cross-field rules sit in one validator per section. The composite experiment config lives with
the driver (``learner.config``); an actor only sees the sections it runs on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from policy.components import ModelConfig
from policy.lora import LoraSettings
from policy.policy import SamplerConfig
from rewards.registry import RewardConfig


class ConfigError(ValueError):
    """A configuration problem, reported as one actionable line."""


_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _word_to_bool(value: Any) -> Any:
    return _WORDS.get(value.lower(), value) if isinstance(value, str) else value


# A true/false key. Configs are read as YAML 1.2 (learner.config), where yes/no/on/off are text; on a key that takes
# only true or false their YAML 1.1 meaning (and a quoted "true") is still the user's plain intent, so they are read
# as such, in any case. Anything else (1, "maybe") is refused.
Bool = Annotated[bool, BeforeValidator(_word_to_bool), Field(strict=True)]


class PairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["step_branch", "trajectory"] = Field("step_branch", description=(
        "step_branch: two children of one x_t ranked at chosen steps (TailorPO); trajectory: two whole chains"))
    branch_steps: tuple[Annotated[int, Field(ge=0, strict=True)], ...] = Field((0, 4, 8, 12, 16), description=(
        "step_branch: step indices (generation order, 0 = first step from x_T) where two children are drawn and "
        "ranked; TailorPO trains at t = 20, 16, 12, 8, 4 of 20 steps, i.e. indices 0, 4, 8, 12, 16"))

    @model_validator(mode="after")
    def _needs_steps(self) -> PairsConfig:
        if self.kind == "step_branch" and not self.branch_steps:
            raise ValueError("pairs.branch_steps must name at least one step for step_branch pairs")
        return self

    @property
    def record_kind(self) -> Literal["step", "trajectory"]:
        """The kind of the records (actors.records) these pairs are stored as."""
        return "step" if self.kind == "step_branch" else "trajectory"


class GuidanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["none", "reward_gradient"] = Field("none", description="reward_gradient: TailorPO-G")
    eta_lo: float = Field(0.1, ge=0, description="TailorPO-G step size at the first step (cosine schedule)")
    eta_hi: float = Field(0.2, ge=0, description="... at the last step")
    delta: float = Field(0.5, gt=0, description="TailorPO-G: keep a pushed winner only if its reward rose")
    max_grad_norm: float | None = Field(None, gt=0, description="clip the reward gradient's norm (null: no clip)")


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    num_actors: int = Field(1, ge=1, strict=True)
    prompts_per_task: int = Field(8, ge=1, strict=True, description=(
        "chains per generate call (adapted to each actor's speed when adapt_batch)"))
    adapt_batch: Bool = True
    target_task_seconds: float = Field(3.0, gt=0, description=(
        "adaptive batches aim at this duration per call, above the floor where the fixed part is 30 % of a call"))
    max_prompts_per_task: int = Field(64, ge=1, strict=True)
    num_gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = None
    torch_threads: int = Field(1, ge=1, strict=True)
    slowdown_s: tuple[Annotated[float, Field(ge=0)], ...] = Field((), description=(
        "testing aid: extra seconds per chain and denoising step; actor i takes slowdown_s[i % len] (slow GPUs)"))


class RolloutSettings(BaseModel):
    """What a rollout actor is built from: the sections it runs on, taken from the experiment config."""

    model_config = ConfigDict(extra="ignore", frozen=True, from_attributes=True)

    model: ModelConfig
    sampler: SamplerConfig
    lora: LoraSettings
    pairs: PairsConfig
    guidance: GuidanceConfig
    reward: RewardConfig
    rollout: RolloutConfig
    trainable: Literal["lora", "full"] = "lora"  # the learner's train.trainable: full loads into the UNet itself
    weight_dtype: str | None = None  # the learner's train.weight_dtype: what published weights arrive in
    # reference.compute_on=actors: log π_ref is stored with every transition, under the initial model ("frozen") or
    # the reference the learner broadcasts ("moving"); None: the learner computes it
    reference_on_actors: Literal["frozen", "moving"] | None = None
