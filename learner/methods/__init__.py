"""The preference methods; each module registers itself (a new method is one new module imported here)."""

from learner.methods import dense_dpo, diffusion_dpo, dpo_logprob, ppo  # noqa: F401  (registration)
from learner.methods.registry import find_method, method_names, register_method

__all__ = ["find_method", "method_names", "register_method"]
