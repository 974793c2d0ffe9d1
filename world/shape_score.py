"""Which shape did the model draw? An analytic, batched check of the prompt's shape word.

Why: the world rewards score colour, position and size; nothing checks that "a red *square*" is a square, so an
aligned model could lose shapes unnoticed. This check fits each of the three shapes to the image and reports
the best one.

How (all in torch, no learned parts):

1. Coverage of the prompt's colour, by linear unmixing. A rendered pixel is p = c·rgb + (1 − c)·g (world.scenes
   ``render``: anti-aliased coverage c of the shape over the grey g), so c = ⟨p − g, rgb − g⟩ / ‖rgb − g‖².
   The grey g of each row is the row's median (the shape covers at most ~12 of 32 pixels of a row; the
   background's vertical gradient is kept). Pixels whose colour is not on the grey→rgb line (another colour)
   are gated out by their residual r = ‖p − g − c·(rgb − g)‖ with exp(−½ (r/τ)⁴), the same generalised
   Gaussian as the world rewards' colour mask.
2. The coverage's centroid and area give the centre and equal-area radius of the candidate shapes (every shape
   of the world has area π·radius², so equal area is the right size for each).
3. Each candidate is rendered as the scenes module does (signed distance → one-pixel coverage ramp) at a few
   scales and sub-pixel offsets around the measured size and centre (model samples are blurred, which shifts
   the measured area), and compared with the coverage by soft IoU Σ min / Σ max. A shape's fit is its best IoU
   over these poses; the predicted shape is the best-fitting one.

``world_shape`` (rewards/world.py) is 1 when the prompt's shape fits best and some of the prompt's colour is
present, else 0: its mean over samples is the share of images that draw the prompt's shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from world.scenes import COLOURS, IMAGE_SIZE, SHAPES, at_world_size, parse_prompt

SCALES = (0.85, 1.0, 1.15, 1.3)  # radius multipliers searched around the equal-area radius
OFFSETS = (-0.35, 0.0, 0.35)  # centre shifts searched in x and y, in pixels
MIN_AREA = 0.004  # coverage below this fraction of the image (a radius under 1.1 px): no shape is drawn
_CHUNK = 32  # images per template batch (36 poses × 3 shapes × 32² floats each): bounds memory
_TRIANGLE_NORMALS = ((0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5))  # outward, y down


@dataclass
class ShapeFit:
    """Per image: best IoU of each shape (``ious`` [B, 3], in SHAPES order), the index of the best one
    (``predicted``, −1 when nothing of the colour is drawn) and whether it is the prompt's (``correct``, 0/1)."""

    ious: torch.Tensor
    predicted: torch.Tensor
    correct: torch.Tensor
    area: torch.Tensor

    def names(self) -> list[str]:
        return [SHAPES[i] if i >= 0 else "none" for i in self.predicted.tolist()]


def colour_coverage(images: torch.Tensor, colours: Sequence[str], bandwidth: float = 0.2) -> torch.Tensor:
    """[B, H, W] in [0, 1]: how much of each pixel is the named colour over the row's grey (step 1 above)."""
    rgb = torch.tensor([COLOURS[c] for c in colours], dtype=images.dtype, device=images.device)[:, :, None, None]
    grey = images.median(dim=3, keepdim=True).values  # [B, 3, H, 1]
    direction = rgb - grey
    rel = images - grey
    c = ((rel * direction).sum(1) / direction.pow(2).sum(1).clamp_min(1e-6)).clamp(0, 1)  # [B, H, W]
    residual = (rel - c[:, None] * direction).pow(2).sum(1)
    return c * torch.exp(-0.5 * (residual / bandwidth**2).pow(2))


def _templates(cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased coverage [..., 3, size, size] of the three shapes, centres and radii of shape [...]."""
    grid = (torch.arange(size, dtype=cx.dtype, device=cx.device) + 0.5) / size
    dx = grid - cx[..., None, None]  # [..., 1, W]
    dy = grid[:, None] - cy[..., None, None]  # [..., H, 1]
    r = radius[..., None, None]
    circle = torch.sqrt(dx.pow(2) + dy.pow(2)) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r * math.sqrt(math.pi) / 2
    inradius = r * math.sqrt(math.pi / (3 * math.sqrt(3)))
    triangle = torch.stack(torch.broadcast_tensors(*(nx * dx + ny * dy for nx, ny in _TRIANGLE_NORMALS))).amax(0)
    sd = torch.stack(torch.broadcast_tensors(circle, square, triangle - inradius), dim=-3)
    return (0.5 - sd * size).clamp(0, 1)


def _best_iou(cov: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Soft IoU of the coverage [B, H, W] with each shape, maximised over the poses [B, ...]: [B, 3]."""
    t = _templates(cx, cy, radius, cov.shape[-1])  # [B, ..., 3, H, W]
    m = cov.view(len(cov), *(1,) * (t.ndim - 3), *cov.shape[1:])
    iou = torch.minimum(m, t).sum(dim=(-2, -1)) / torch.maximum(m, t).sum(dim=(-2, -1)).clamp_min(1e-6)
    return iou.flatten(1, -2).amax(1)


def fit_shapes(images: torch.Tensor, prompts: Sequence[str]) -> ShapeFit:
    """Fit circle, square and triangle to the prompt's colour in each image ([B, 3, H, W] in [0, 1])."""
    parsed = [parse_prompt(p) for p in prompts]
    images = at_world_size(images).detach().float()
    cov = colour_coverage(images, [c for c, _, _ in parsed])  # [B, H, W]
    size = IMAGE_SIZE
    grid = (torch.arange(size, dtype=cov.dtype, device=cov.device) + 0.5) / size
    total = cov.sum(dim=(1, 2)).clamp_min(1e-6)
    area = total / size**2
    cx = (cov * grid).sum(dim=(1, 2)) / total
    cy = (cov * grid[:, None]).sum(dim=(1, 2)) / total
    radius = torch.sqrt(area / math.pi)
    scales = torch.tensor(SCALES, dtype=cov.dtype, device=cov.device)
    shifts = torch.tensor(OFFSETS, dtype=cov.dtype, device=cov.device) / size
    # poses [B, S, O, O]: every scale × x shift × y shift
    pcx = (cx[:, None, None, None] + shifts[None, None, :, None]).expand(-1, len(SCALES), -1, len(OFFSETS))
    pcy = (cy[:, None, None, None] + shifts[None, None, None, :]).expand(-1, len(SCALES), len(OFFSETS), -1)
    pr = (radius[:, None, None, None] * scales[None, :, None, None]).expand_as(pcx)
    ious = torch.cat([_best_iou(cov[i : i + _CHUNK], pcx[i : i + _CHUNK], pcy[i : i + _CHUNK], pr[i : i + _CHUNK])
                      for i in range(0, len(cov), _CHUNK)])  # [B, 3]
    present = area >= MIN_AREA
    predicted = torch.where(present, ious.argmax(1), torch.full_like(present, -1, dtype=torch.long))
    wanted = torch.tensor([SHAPES.index(s) for _, s, _ in parsed], device=cov.device)
    return ShapeFit(ious, predicted, (predicted == wanted).float(), area)


def shape_score(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """1 where the prompt's shape fits best (and its colour is present), else 0; float32 [B]."""
    return fit_shapes(images, prompts).correct
