"""Rewards by name, and weighted combinations of them (``{imagereward: 1.0, aesthetic: 0.5}``).

Each reward module registers its factory with ``@register_reward("name")``; factories take the
keyword options found under ``reward.options.<name>`` in the experiment config. Modules are imported
lazily (``_MODULES``) so that asking for an analytic reward never imports open_clip or ImageReward.
A reward of one's own is named ``package.module:Factory``. ``reward.options.<name>.runtime_env`` (Ray's
runtime_env: pip, env_vars, working_dir, py_modules, py_executable, container, ...) is not a factory option: it
puts that reward in its own reward actor with its own dependencies (``own_env_rewards``, actors/reward.py).
Whether a reward has a gradient (TailorPO-G needs one) is its class's ``differentiable``, which ``differentiable``
reads from the factory (a class, or a function annotated with the class it returns) without building anything.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_type_hints

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards.base import Reward, RewardConfigError


class RewardConfig(BaseModel):
    """Which reward (a name or a weighted sum), its options, and the reward actors that score it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    spec: dict[str, float] = Field(default_factory=lambda: {"world": 1.0}, min_length=1, description=(
        "reward name -> weight, e.g. {world: 1.0}"))
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "per-reward keyword options (paths, devices): {name: {key: value}}"))
    num_actors: int = Field(1, ge=0, strict=True, description="reward actors (0: score inside rollout actors)")
    num_gpus: float = Field(0.0, ge=0)
    max_batch: int = Field(256, ge=1, strict=True, description="a reward actor scores at most this many images")
    max_wait_ms: float = Field(2.0, ge=0, description="... and waits this long to fill a batch from several actors")

    @model_validator(mode="after")
    def _runtime_envs(self) -> RewardConfig:
        for name, env in own_env_rewards(self.options).items():
            if name not in self.spec:
                raise ValueError(f"reward.options.{name}.runtime_env is set but {name!r} is not in reward.spec")
            if not isinstance(env, dict):
                raise ValueError(f"reward.options.{name}.runtime_env must be a mapping (Ray's runtime_env), got "
                                 f"{type(env).__name__}")
            unknown = sorted(set(env) - set(RUNTIME_ENV_KEYS))
            if unknown:
                raise ValueError(f"reward.options.{name}.runtime_env: unknown key(s) {unknown}; allowed: "
                                 f"{list(RUNTIME_ENV_KEYS)}")
        return self

    def main_env_spec(self) -> dict[str, float]:
        """The part of ``spec`` scored in the main environment (every reward without a runtime_env)."""
        return {n: w for n, w in self.spec.items() if n not in own_env_rewards(self.options)}


RUNTIME_ENV = "runtime_env"
RUNTIME_ENV_KEYS = ("pip", "uv", "conda", "env_vars", "working_dir", "py_modules", "py_executable", "container",
                    "image_uri", "excludes", "config")  # ray.runtime_env.RuntimeEnv's public fields


def own_env_rewards(options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{reward name: its runtime_env} for the rewards that run in their own environment."""
    return {name: o[RUNTIME_ENV] for name, o in options.items() if RUNTIME_ENV in o}


_FACTORIES: dict[str, Callable[..., Reward]] = {}
# reward name -> module that registers it
_MODULES: dict[str, str] = {
    "jpeg_compressibility": "rewards.analytic",
    "jpeg_incompressibility": "rewards.analytic",
    "aesthetic": "rewards.openclip",
    "clip_score": "rewards.openclip",
    "hps": "rewards.openclip",
    "pickscore": "rewards.pickscore",
    "imagereward": "rewards.imagereward",
    "world_fidelity": "rewards.world",
    "world_preference": "rewards.world",
    "world": "rewards.world",
    "world_shape": "rewards.world",
    "world_judge": "rewards.world_judge",
    "world_crisp": "rewards.world",
}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class/function decorator: make ``name`` buildable from config."""

    def wrap(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        _FACTORIES[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    return sorted(_MODULES)


def _factory(name: str) -> Callable[..., Reward]:
    if ":" in name:  # package.module:Factory, a reward of one's own
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise RewardConfigError(f"reward {name!r} cannot be loaded here ({e}); give it the environment it "
                                    f"needs with reward.options.{name}.runtime_env") from None
    if name not in _FACTORIES:
        if name not in _MODULES:
            raise RewardConfigError(f"unknown reward {name!r}; known: {', '.join(available_rewards())}")
        importlib.import_module(_MODULES[name])
    return _FACTORIES[name]


def _checked(name: str, kwargs: Mapping[str, Any]) -> Callable[..., Reward]:
    """The factory of reward ``name``, once ``kwargs`` are known to be among its options."""
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise RewardConfigError(f"reward.options.{name}: unknown option(s) {unknown}; allowed: {sorted(params)}")
    return factory


def differentiable(name: str) -> bool:
    """Whether reward ``name`` keeps the gradient, known without building it (no weights load, so a config check
    can ask): the ``differentiable`` attribute of its factory's class, or of the class a factory function's
    return annotation names; a factory without either counts as not differentiable."""
    factory = _factory(name)
    if not isinstance(factory, type):
        try:
            factory = get_type_hints(factory).get("return")
        except NameError:  # an annotation that does not resolve here
            factory = None
    return bool(getattr(factory, "differentiable", False))


def _make(name: str, kwargs: dict[str, Any]) -> Reward:
    return _checked(name, kwargs)(**kwargs)


class WeightedSum(Reward):
    """Σ_i w_i · r_i; differentiable only if every part is."""

    def __init__(self, parts: Sequence[tuple[float, Reward]]):
        self.parts = list(parts)
        self.name = "+".join(f"{w:g}*{r.name}" for w, r in self.parts)
        self.differentiable = all(r.differentiable for _, r in self.parts)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return sum(w * r.score(images, prompts).float() for w, r in self.parts)

    def to(self, device: torch.device | str) -> WeightedSum:
        for _, r in self.parts:
            r.to(device)
        return self


def build_reward(spec: str | Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None = None) -> Reward:
    """Build one reward (``"aesthetic"``) or a weighted sum (``{"aesthetic": 1, "jpeg_compressibility": .1}``)."""
    options = options or {}
    weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    if not weights:
        raise RewardConfigError("reward spec is empty; name at least one reward")
    kwargs = {name: {k: v for k, v in options.get(name, {}).items() if k != RUNTIME_ENV} for name in weights}
    parts = [(float(w), _make(name, kwargs[name])) for name, w in weights.items()]
    return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else WeightedSum(parts)


# reward module -> the check every prompt it scores must pass (raises ValueError naming the prompt and grammar)
_PROMPT_CHECKS: dict[str, str] = {"rewards.world": "world.scenes:parse_prompt"}


def check_spec(spec: Mapping[str, float], options: Mapping[str, Mapping[str, Any]], prompts: Sequence[str]) -> None:
    """Without building anything: every reward of ``spec`` exists, takes its ``options`` and can score every
    prompt; RewardConfigError names the first problem. A reward with its own runtime_env is checked where it
    runs (its code may not import here)."""
    own = own_env_rewards(options)
    for name in [*options, *spec]:
        if name not in spec:
            raise RewardConfigError(f"reward.options names {name!r}, which is not in reward.spec {sorted(spec)}")
        if name in own:
            continue
        _checked(name, options.get(name, {}))
        check = _PROMPT_CHECKS.get(_MODULES.get(name, ""))
        if check is None:
            continue
        module, func = check.split(":")
        parse = getattr(importlib.import_module(module), func)
        for i, prompt in enumerate(prompts):
            try:
                parse(prompt)
            except ValueError as e:
                raise RewardConfigError(f"prompt {i + 1} cannot be scored by reward {name!r}: {e}") from None
