"""DDPO's JPEG rewards (Black et al. 2023; ddpo-pytorch ``rewards.py``): file size of a quality-95 JPEG.

Each image is quantised as DDPO does (``round(x·255)`` clamped to uint8), encoded by PIL at quality 95 and
measured in kB (bytes / 1000). ``jpeg_incompressibility`` = +size, ``jpeg_compressibility`` = −size. Encoding
is deterministic, per image, and not differentiable; prompts are ignored.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from rewards.base import Reward, RewardConfigError
from rewards.registry import register_reward

JPEG_QUALITY = 95


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """JPEG size in kB of each image of a [B,3,H,W] batch in [0,1]; float32 [B] on the images' device."""
    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSize(Reward):
    """``sign`` · JPEG size in kB: +1 rewards detail (incompressibility), −1 rewards flat images."""

    def __init__(self, sign: float, name: str, quality: int = JPEG_QUALITY):
        if not 1 <= quality <= 100:
            raise RewardConfigError(f"reward.options.{name}.quality must be in [1, 100], got {quality}")
        self.sign, self.name, self.quality = sign, name, quality

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = JPEG_QUALITY) -> JpegSize:
    return JpegSize(-1.0, "jpeg_compressibility", quality)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = JPEG_QUALITY) -> JpegSize:
    return JpegSize(1.0, "jpeg_incompressibility", quality)
