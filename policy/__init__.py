"""The diffusion policy shared by actors and learner: loading, LoRA adapters, the sampler with log-probs."""

from policy.components import Components, ModelPathError, build_random_model, load_components
from policy.lora import (
    POLICY,
    REF,
    AdapterMismatchError,
    LoadReport,
    LoraSettings,
    WeightState,
    export_state,
    load_state,
)
from policy.policy import DiffusionPolicy, PromptEmbeds, Rollout, SamplerConfig, StepOut

__all__ = [
    "POLICY",
    "REF",
    "AdapterMismatchError",
    "Components",
    "DiffusionPolicy",
    "LoadReport",
    "LoraSettings",
    "ModelPathError",
    "PromptEmbeds",
    "Rollout",
    "SamplerConfig",
    "StepOut",
    "WeightState",
    "build_random_model",
    "export_state",
    "load_components",
    "load_state",
]
