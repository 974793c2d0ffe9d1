"""Prompt-aware analytic rewards for the embedded synthetic world (world/scenes.py); cheap and differentiable.

All three read the prompt's colour and position and look at one soft mask: each pixel's closeness to the
prompt's colour, m = exp(−½ (‖pixel − rgb‖ / τ)⁴) (τ = ``bandwidth`` = 0.2). The 4th power (a generalised
Gaussian) keeps m ≈ 1 for small colour errors (0.97 at 0.1) yet cuts off sharply: palette colours are ≥ 0.7
apart and the grey background ≥ 0.6 from every colour, where m < 1e-14. From the mask:
area a = mean(m) (fraction of the image) and centroid c = Σ m·(x, y) / Σ m (fractions of the side).

- ``world_fidelity`` = presence · location, in [0, 1]:
  presence = 1 − exp(−a / a₀) (a₀ = ``presence_area``: any shape of the data's size range scores ≈ 1);
  location = exp(−relu(‖c − c*‖ − tol)² / (2 s²)), c* the named region's nominal centre, tol covering the
  data's jitter. The shape word is not scored (kept cheap): fidelity is colour + position.
- ``world_preference`` = relu(1 − |a / cap − 1|), in [0, 1]: bigger shapes of the prompt's colour, peaking at
  ``cap`` (≈ the mask area of the data's largest shape) and falling beyond it, so flooding the image with colour
  is not rewarded. The data draws sizes uniformly and independently of the prompt, so the base model draws
  the average size (preference ≈ 0.5) and alignment has room to learn it.
- ``world`` (the default) = fidelity + ``preference_weight`` · preference, in [0, 1 + w].
- ``world_crisp`` = edge crispness of the prompt's colour, in [0, 1]: with c its coverage (world/shape_score.py,
  linear unmixing over the row's grey) and g = |∇c| (one-pixel differences), Σ g² / Σ g is the mean of g weighted
  by g, i.e. about 1 / the width in pixels of the shape's edge: ≈ 0.6 for the anti-aliased renders, ≈ 0.2 for the
  base model's blurred samples. Meant as a fine-detail term that late denoising steps decide; measured, they do
  not decide it here either (docs/studies.md, "Where the reward is decided").
- ``world_shape`` (an evaluation metric, not in the default reward) = 1 when the prompt's shape is the one
  drawn, by the fit of world/shape_score.py, else 0.

Images of any size are resized (bilinear, antialiased) to 32×32 first, so scores are resolution-independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from rewards.base import Reward, RewardConfigError
from rewards.registry import register_reward
from world.scenes import COLOURS, IMAGE_SIZE, JITTER, POSITIONS, at_world_size, parse_prompt
from world.shape_score import colour_coverage, shape_score

# Mask area of ideal renders at the data's largest radius (0.18): the shapes' true area is π·0.18² = 0.102;
# the anti-aliased rim counts less under the sharp colour mask (measured 0.082-0.100 over colours and shapes).
DEFAULT_CAP = 0.09


@lru_cache(maxsize=4096)
def _target(prompt: str) -> tuple[float, float, float, float, float]:
    """(r, g, b, x, y) the prompt asks for."""
    colour, _, position = parse_prompt(prompt)
    return (*COLOURS[colour], *POSITIONS[position])


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise RewardConfigError(f"reward option {name} must be a positive number, got {value!r}")
    return float(value)


class _WorldReward(Reward):
    """Shared mask statistics; subclasses combine them."""

    differentiable = True

    def __init__(self, bandwidth: float = 0.2):
        self.bandwidth = _positive("bandwidth", bandwidth)

    def mask_stats(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(area [B], squared distance of the colour centroid to the named position [B])."""
        images = at_world_size(images)
        target = torch.tensor([_target(p) for p in prompts], dtype=images.dtype, device=images.device)
        rgb, xy = target[:, :3, None, None], target[:, 3:]
        mask = torch.exp(-0.5 * ((images - rgb).pow(2).sum(1) / self.bandwidth**2).pow(2))  # [B, H, W]
        area = mask.mean(dim=(1, 2))
        grid = (torch.arange(IMAGE_SIZE, dtype=images.dtype, device=images.device) + 0.5) / IMAGE_SIZE
        eps = 1e-6  # an empty mask puts the centroid at the image centre (and presence ≈ 0 anyway)
        total = mask.sum(dim=(1, 2)) + eps
        cx = ((mask * grid[None, None, :]).sum(dim=(1, 2)) + 0.5 * eps) / total
        cy = ((mask * grid[None, :, None]).sum(dim=(1, 2)) + 0.5 * eps) / total
        return area, (cx - xy[:, 0]).pow(2) + (cy - xy[:, 1]).pow(2)


class WorldFidelity(_WorldReward):
    name = "world_fidelity"

    def __init__(self, bandwidth: float = 0.2, presence_area: float = 0.005, tolerance: float = 1.5 * JITTER,
                 sigma: float = 0.08):
        super().__init__(bandwidth)
        self.presence_area = _positive("presence_area", presence_area)
        self.tolerance = _positive("tolerance", tolerance)
        self.sigma = _positive("sigma", sigma)

    def fidelity(self, area: torch.Tensor, dist2: torch.Tensor) -> torch.Tensor:
        presence = 1 - torch.exp(-area / self.presence_area)
        miss = F.relu(torch.sqrt(dist2 + 1e-12) - self.tolerance)
        return presence * torch.exp(-miss.pow(2) / (2 * self.sigma**2))

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.fidelity(*self.mask_stats(images, prompts)).float()


class WorldPreference(_WorldReward):
    name = "world_preference"

    def __init__(self, bandwidth: float = 0.2, cap: float = DEFAULT_CAP):
        super().__init__(bandwidth)
        self.cap = _positive("cap", cap)

    def preference(self, area: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - (area / self.cap - 1).abs())

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        area, _ = self.mask_stats(images, prompts)
        return self.preference(area).float()


class WorldReward(_WorldReward):
    """fidelity + w · preference from one mask pass. w = 0.5: the base model's headroom is then similar in both
    terms (fidelity ≈ 0.8 of 1, preference ≈ 0.5 of 1 × 0.5), so neither can be ignored."""

    name = "world"

    def __init__(self, preference_weight: float = 0.5, bandwidth: float = 0.2, presence_area: float = 0.005,
                 tolerance: float = 1.5 * JITTER, sigma: float = 0.08, cap: float = DEFAULT_CAP):
        super().__init__(bandwidth)
        self.preference_weight = _positive("preference_weight", preference_weight)
        self.fid = WorldFidelity(bandwidth, presence_area, tolerance, sigma)
        self.pref = WorldPreference(bandwidth, cap)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        area, dist2 = self.mask_stats(images, prompts)
        return (self.fid.fidelity(area, dist2) + self.preference_weight * self.pref.preference(area)).float()


class WorldCrisp(Reward):
    name = "world_crisp"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        c = colour_coverage(at_world_size(images), [parse_prompt(p)[0] for p in prompts])
        g = torch.cat([(c[:, :, 1:] - c[:, :, :-1]).abs().flatten(1), (c[:, 1:] - c[:, :-1]).abs().flatten(1)], 1)
        return (g.pow(2).sum(1) / (g.sum(1) + 1e-6)).float()


class WorldShape(Reward):
    """1 when the prompt's shape is the best fit to its colour (world/shape_score.py), else 0; not differentiable
    (an argmax). An evaluation metric for the shape word, which the rewards above do not read."""

    name = "world_shape"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return shape_score(images, prompts)


register_reward("world_fidelity")(WorldFidelity)
register_reward("world_preference")(WorldPreference)
register_reward("world")(WorldReward)
register_reward("world_shape")(WorldShape)
register_reward("world_crisp")(WorldCrisp)
