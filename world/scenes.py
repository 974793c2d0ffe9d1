"""The embedded synthetic world: one coloured shape on a grey background, described by a prompt.

Why it exists: no weights can be downloaded, so the project trains its own tiny text-to-image model on this
world (world/train.py) and scores alignment with analytic, prompt-aware rewards (rewards/world.py).

A scene is (colour, shape, position) from the grammar ``"a <colour> <shape> <where>"`` plus nuisance draws that
the prompt does not mention: a small jitter of the centre, the size and the background. The size (equal-area
radius) is uniform over ``RADIUS_RANGE`` independently of the prompt, so a model trained on this data learns
the average size, and a "larger is better" preference (rewards.world) has headroom.
Everything is deterministic from a seed (numpy ``default_rng``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F

# RGB in [0,1]; pairwise distances >= 0.75, so a soft colour mask with a ~0.25 bandwidth separates them.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# nominal centre (x, y) as fractions of the image side, y pointing down; phrase used in the prompt
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
RADIUS_RANGE = (0.08, 0.18)  # equal-area radius, fraction of the image side
JITTER = 0.04  # max |offset| of the centre from its nominal position, fraction of the side
BACKGROUND_RANGE = (0.08, 0.28)  # grey level at mid-height
GRADIENT_RANGE = (-0.05, 0.05)  # top-to-bottom grey change
IMAGE_SIZE = 32

_PROMPT_RE = re.compile(
    rf"^a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(_PHRASE.values())})$"
)
_POSITION_OF_PHRASE = {v: k for k, v in _PHRASE.items()}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    cx: float  # centre, fractions of the side (x right, y down)
    cy: float
    radius: float  # equal-area radius: every shape covers pi * radius**2 of the unit square
    background: float
    gradient: float


def vocabulary() -> list[str]:
    """Every word a world prompt can contain (for the tokenizer)."""
    words = {"a", *COLOURS, *SHAPES}
    for phrase in _PHRASE.values():
        words.update(phrase.split())
    return sorted(words)


def all_triples() -> list[tuple[str, str, str]]:
    """All (colour, shape, position) combinations, in a fixed order."""
    return list(product(COLOURS, SHAPES, POSITIONS))


def prompt_of(scene: Scene | tuple[str, str, str]) -> str:
    colour, shape, position = (scene.colour, scene.shape, scene.position) if isinstance(scene, Scene) else scene
    return f"a {colour} {shape} {_PHRASE[position]}"


def parse_prompt(text: str) -> tuple[str, str, str]:
    """``"a red circle on the left"`` -> ``("red", "circle", "left")``; ValueError outside the grammar."""
    match = _PROMPT_RE.match(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(
            f"prompt {text!r} is outside the world grammar 'a <colour> <shape> <where>': colour in "
            f"{list(COLOURS)}, shape in {list(SHAPES)}, where in {list(_PHRASE.values())}"
        )
    colour, shape, phrase = match.groups()
    return colour, shape, _POSITION_OF_PHRASE[phrase]


def split_prompts(seed: int, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Hold out ~``heldout_fraction`` of the (colour, shape, position) combinations, seeded.

    Held-out prompts test composition: each held-out triple is unseen, but every single word AND every pair
    (colour+shape, colour+position, shape+position) still occurs in training (draws are repeated until so).
    """
    if not 0.0 < heldout_fraction < 0.5:
        raise ValueError(f"heldout_fraction must be in (0, 0.5), got {heldout_fraction}")
    triples = all_triples()
    k = round(heldout_fraction * len(triples))
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        order = rng.permutation(len(triples))
        held = {triples[i] for i in order[:k]}
        train = [t for t in triples if t not in held]
        if all(_covered(train, pair) for pair in ((0, 1), (0, 2), (1, 2))):
            return [prompt_of(t) for t in train], [prompt_of(t) for t in triples if t in held]
    raise RuntimeError(f"no split with full pair coverage found for seed {seed}; lower heldout_fraction")


def _covered(train: list[tuple[str, str, str]], pair: tuple[int, int]) -> bool:
    """Every combination of the two factors ``pair`` occurs in ``train``."""
    need = {(a[pair[0]], a[pair[1]]) for a in all_triples()}
    return need <= {(t[pair[0]], t[pair[1]]) for t in train}


def sample_scenes(prompts: Sequence[str], n: int, seed: int, radius: float | None = None) -> list[Scene]:
    """``n`` scenes, the i-th for ``prompts[i % len(prompts)]``; nuisances drawn from ``seed``.

    ``radius`` fixes the size (e.g. ``RADIUS_RANGE[1]`` for the preferred, "ideal" renders of a reward ceiling).
    """
    if not prompts:
        raise ValueError("sample_scenes needs at least one prompt")
    parsed = [parse_prompt(p) for p in prompts]
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-JITTER, JITTER, size=(n, 2))
    radii = rng.uniform(*RADIUS_RANGE, size=n) if radius is None else np.full(n, float(radius))
    backgrounds = rng.uniform(*BACKGROUND_RANGE, size=n)
    gradients = rng.uniform(*GRADIENT_RANGE, size=n)
    scenes = []
    for i in range(n):
        colour, shape, position = parsed[i % len(parsed)]
        x, y = POSITIONS[position]
        scenes.append(Scene(colour, shape, position, x + offsets[i, 0], y + offsets[i, 1], float(radii[i]),
                            float(backgrounds[i]), float(gradients[i])))
    return scenes


def _signed_distance(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (fractions of the side, < 0 inside) to the shape; exact inside, near-exact outside."""
    dx, dy = x - scene.cx, y - scene.cy
    if scene.shape == "circle":
        return np.hypot(dx, dy) - scene.radius
    if scene.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - scene.radius * math.sqrt(math.pi) / 2
    if scene.shape == "triangle":  # equilateral, apex up; inradius from area pi r^2 = 3*sqrt(3)*inradius^2
        inradius = scene.radius * math.sqrt(math.pi / (3 * math.sqrt(3)))
        normals = ((0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5))  # outward, y down
        return np.max([nx * dx + ny * dy for nx, ny in normals], axis=0) - inradius
    raise ValueError(f"unknown shape {scene.shape!r}; known: {list(SHAPES)}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """float32 ``[3, size, size]`` in [0, 1]; edges anti-aliased by a one-pixel coverage ramp of the SDF."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    coverage = np.clip(0.5 - _signed_distance(scene, x, y) * size, 0.0, 1.0)
    grey = scene.background + scene.gradient * (y - 0.5)
    colour = np.asarray(COLOURS[scene.colour])[:, None, None]
    image = coverage * colour + (1.0 - coverage) * grey
    return torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32))


def at_world_size(images: torch.Tensor) -> torch.Tensor:
    """``images`` [B, 3, H, W] resized (bilinear, antialiased) to IMAGE_SIZE², so scores of them are
    resolution-independent."""
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)


def render_batch(scenes: Sequence[Scene], size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N, 3, size, size]`` float32."""
    return torch.stack([render(s, size) for s in scenes])
