"""What every model reward needs before its forward pass: torch-only image preprocessing and local weights.

Reference scorers (DDPO's aesthetic scorer, ImageReward, PickScore's processor, open_clip's transforms) resize
through PIL, which cuts the autograd graph (TailorPO-G needs ∇_x r, docs/math.md §6). ``resize_crop_normalize``
redoes the same steps in torch so the graph survives: ``F.interpolate(..., antialias=True)`` (bicubic or
bilinear; torch's antialiased bicubic uses PIL's a = -0.5 kernel, so on natural (smooth) images both up- and
down-sizing match PIL to about one grey level; on pixel noise PIL's clipped 8-bit intermediate pass makes single
pixels differ by up to ~10 levels), then a centre crop (torchvision's rounding) or centre pad, then (x - mean) / std.

Weights come only from local files named in config; a missing file is a one-line ``RewardConfigError`` that
names the option key and says which file belongs there. Pickles are read with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.base import RewardConfigError

# OpenAI CLIP's normalisation, also used by ImageReward's BLIP and by open_clip's CLIP configs
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest")
INTERPOLATIONS = ("bicubic", "bilinear")


def _resized_hw(h: int, w: int, size: int, resize_mode: str) -> tuple[int, int]:
    """Target (h, w): torchvision ``Resize(size)`` for "shortest", open_clip ``ResizeKeepRatio(longest=1)``."""
    if resize_mode == "shortest":
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        return (size, new_long) if h <= w else (new_long, size)
    scale = size / max(h, w)
    return round(h * scale), round(w * scale)


def resize_crop_normalize(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B,3,size,size] normalised, differentiable w.r.t. ``images``.

    ``resize_mode="shortest"``: the short side becomes ``size``, then a centre crop (CLIP, BLIP, PickScore).
    ``resize_mode="longest"``: the long side becomes ``size``, then a centre pad with black (HPSv2's
    ``resize_longest_max``). Both are the identity on an image that is already ``size`` square. After a bicubic
    resize the pixels are clamped to [0, 1], as the uint8 round trip of the PIL references does.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {resize_mode!r} is not supported; use one of {RESIZE_MODES}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not supported; use one of {INTERPOLATIONS}")
    h, w = images.shape[-2:]
    new_h, new_w = _resized_hw(h, w, size, resize_mode)
    x = images
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, align_corners=False, antialias=True)
        if interpolation == "bicubic":
            x = x.clamp(0.0, 1.0)
    if resize_mode == "shortest":
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        x = x[..., top : top + size, left : left + size]
    else:
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def require_path(path: str | Path | None, key: str, what: str, kind: str = "file") -> Path:
    """Return ``path`` if it exists as ``kind`` ("file", "directory" or "path": either); otherwise a one-line
    error naming the config ``key`` and what belongs there."""
    exists = {"file": Path.is_file, "directory": Path.is_dir, "path": Path.exists}[kind]
    if path is None or str(path) == "":
        raise RewardConfigError(f"{key} is required: set it to the local {kind} holding {what}")
    p = Path(path).expanduser()
    if not exists(p):
        raise RewardConfigError(f"{key}: {kind} not found: {p} (put {what} there)")
    return p


def load_state_dict_file(path: Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch pickle (``weights_only=True``: no code runs on load)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unreadable or code-carrying pickle: say which option points at it
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RewardConfigError(f"{key}: cannot read {path} as a weights-only state dict ({reason})") from err
    if not isinstance(obj, dict):
        raise RewardConfigError(f"{key}: {path} holds a {type(obj).__name__}, not a state dict")
    return obj


