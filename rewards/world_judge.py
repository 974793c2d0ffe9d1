"""``world_judge``: the learned, held-out judge of the embedded world (world/judge.py) as a reward.

Why: alignment runs optimise the analytic ``world`` reward; this scorer reads the images with a CNN trained on
renders only, so a gain that it confirms is not an artefact of the analytic colour mask (the role PickScore plays
for a policy trained on an aesthetic reward). Score = P(colour) · P(shape) · P(position) of the prompt's words
+ ``size_weight`` · clip(predicted radius / RADIUS_RANGE[1], 0, 1), in [0, 1 + size_weight]. Not differentiable:
it is a check, not a training signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rewards.base import Reward, RewardConfigError
from rewards.registry import register_reward
from world.judge import BUILD_COMMAND, JUDGE_DIR, SIZE_WEIGHT, Judge


@register_reward("world_judge")
class WorldJudge(Reward):
    name = "world_judge"
    differentiable = False

    def __init__(self, path: str | None = None, size_weight: float = SIZE_WEIGHT):
        folder = Path(path).expanduser() if path else JUDGE_DIR
        try:
            self.judge = Judge.from_pretrained(folder)
        except FileNotFoundError:
            raise RewardConfigError(f"world_judge: no judge weights in {folder}; build them with "
                                    f"`{BUILD_COMMAND}`") from None
        self.size_weight = float(size_weight)

    def parts(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The score's two parts for reports: ``agreement`` (the product of the three probabilities) and ``size``."""
        agreement, size = self.judge.score_parts(images, prompts)
        return {"agreement": agreement, "size": size}

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        agreement, size = self.judge.score_parts(images, prompts)
        return agreement + self.size_weight * size
