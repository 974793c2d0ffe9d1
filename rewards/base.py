"""The one reward interface every scorer implements.

Input convention (converted at the edge, once): ``images`` is a float tensor ``[B, 3, H, W]``, RGB,
values in ``[0, 1]``, on any device. Decoded x̂_0 from the VAE lives in ``[-1, 1]``; the policy maps it
with ``(x + 1) / 2`` before scoring. Each reward resizes/normalises internally, in torch, so that
``differentiable`` rewards keep the autograd graph from the image back to the latent (TailorPO-G).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class RewardConfigError(ValueError):
    """A reward's configuration is unusable (missing weight file, bad key); the message is one line."""


class Reward(ABC):
    """A batched, device-aware scorer: ``score(images, prompts) -> tensor[B]`` (higher is better)."""

    name: str = "reward"
    differentiable: bool = False

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score ``images`` ([B,3,H,W] in [0,1]) against ``prompts`` (len B); returns float32 [B]."""

    def to(self, device: torch.device | str) -> Reward:
        """Move any parameters to ``device``; analytic rewards have none."""
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        return self

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B,3,H,W] in [0,1], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        if self.differentiable and torch.is_grad_enabled():
            return self.score(images, prompts)
        with torch.no_grad():
            return self.score(images, prompts)
