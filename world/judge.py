"""A held-out judge of the embedded world: ``python -m world.judge --out world/judge --steps 2000``.

Why: the training reward (rewards/world.py) and the shape check (world/shape_score.py) are analytic and read the
prompt's colour mask; a policy aligned on them could exploit exactly that reading. This judge is learned from
renders only and shares no code with them, so it plays the role PickScore plays for a policy trained on an
aesthetic reward: an independent check that alignment gains are real.

A small CNN (< 100k parameters) predicts, per image, the colour (or "none": no shape), the shape (or "unclear"),
the position (or "none") and the equal-area radius. It is trained on renders of every (colour, shape, position)
triple, at radii wider than the data's (an aligned policy draws bigger shapes), augmented to look like model
samples (blur, noise, colour jitter, extra centre jitter), with "unclear" examples so a blob is not forced into a
shape: heavily blurred renders, irregular blobs of 2-3 circles, and the background alone. The judge's score
(``rewards.world_judge``) is P(colour) · P(shape) · P(position) of the prompt's words + 0.5 · size term.

The CLI trains, then validates on fresh renders and on base-model samples (against world/shape_score.py's fit and
the prompt) and writes world/JUDGE.md, world/assets/judge_metrics.json and the judge_*.png figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from world.scenes import (
    BACKGROUND_RANGE,
    COLOURS,
    GRADIENT_RANGE,
    IMAGE_SIZE,
    JITTER,
    POSITIONS,
    RADIUS_RANGE,
    SHAPES,
    Scene,
    all_triples,
    parse_prompt,
    render,
    render_batch,
    sample_scenes,
    split_prompts,
)

JUDGE_DIR = Path(__file__).resolve().parent / "judge"
ASSETS = Path(__file__).resolve().parent / "assets"
RECORD = Path(__file__).resolve().parent / "JUDGE.md"
WEIGHTS, CONFIG = "judge.safetensors", "config.json"
BUILD_COMMAND = "python -m world.judge --out world/judge"

COLOUR_CLASSES = (*COLOURS, "none")
SHAPE_CLASSES = (*SHAPES, "unclear")
POSITION_CLASSES = (*POSITIONS, "none")
HEADS = {"colour": COLOUR_CLASSES, "shape": SHAPE_CLASSES, "position": POSITION_CLASSES}
RADIUS_SCALE = 0.1  # the size output is radius / RADIUS_SCALE, so its regression target is of order 1
SIZE_WEIGHT = 0.5

TRAIN_RADIUS = (0.04, 0.24)  # wider than RADIUS_RANGE on both sides
TRAIN_BACKGROUND = (0.03, 0.35)  # wider than BACKGROUND_RANGE: some model samples have near-black backgrounds
EXTRA_JITTER = 0.03  # added to JITTER: a policy's shapes drift off the nominal centres more than the data's
LIGHT_BLUR = (0.0, 1.2)  # px; model samples are blurry
HEAVY_BLUR = (2.0, 3.5)  # px; shape no longer identifiable -> "unclear"
BLOB_RADIUS, BLOB_DISTANCE = (0.03, 0.09), (0.6, 1.1)  # a blob circle's radius; centre distances / radii sum
NOISE_STD, GAIN, OFFSET = 0.03, 0.1, 0.04  # max pixel noise std, per-channel gain and offset jitter
# warps of a shape: max rotation (rad), stretch and shear of an axis, taper (width change over one radius),
# corner-rounding blur (px)
ROTATE, STRETCH, SHEAR, TAPER, ROUND = 0.2, 0.15, 0.15, 0.3, 1.2
WARPED, ROUNDED = 0.6, 0.5  # share of shapes warped, and with rounded corners
KINDS = ("shape", "blurred", "blob", "empty", "noise")
MIX = (0.66, 0.1, 0.1, 0.07, 0.07)  # share of each kind in a training batch
OFF_IMAGE = -1.0  # a centre far outside the image: render() then draws the background alone


class Judge(nn.Module):
    """Four conv layers (the last three stride 2) and a small MLP over the 4×4 map, which keeps where the shape
    is; one linear layer gives the three heads' logits and the size."""

    def __init__(self, channels: Sequence[int] = (24, 32, 48, 64), hidden: int = 32):
        super().__init__()
        self.channels, self.hidden = tuple(channels), hidden
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        side = IMAGE_SIZE // 2 ** (len(channels) - 1)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, sum(map(len, HEADS.values())) + 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of each head and the size output (radius / RADIUS_SCALE), from images [B,3,32,32] in [0,1]."""
        y = self.out(self.body(images * 2 - 1))
        out, start = {}, 0
        for name, classes in HEADS.items():
            out[name] = y[:, start : start + len(classes)]
            start += len(classes)
        out["size"] = y[:, start]
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Probabilities and radius for images [B,3,H,W] in [0,1] (resized to 32×32 first, as the rewards do)."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        param = next(self.parameters())
        out = self(images.detach().to(param.device, param.dtype).clamp(0, 1))
        return Prediction(out["colour"].softmax(1), out["shape"].softmax(1), out["position"].softmax(1),
                          out["size"] * RADIUS_SCALE)

    def score_parts(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(agreement, size term), float32 [B]: P(colour) · P(shape) · P(position) of the prompt's words, and
        clip(radius / RADIUS_RANGE[1], 0, 1) (bigger is better up to the data's largest size)."""
        return self.predict(images).parts(prompts)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Judge:
        path = Path(path)
        if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
            raise FileNotFoundError(f"no judge in {path} (needs {WEIGHTS} and {CONFIG}); build it with "
                                    f"`{BUILD_COMMAND}`")
        config = json.loads((path / CONFIG).read_text())
        judge = cls(config["channels"], config["hidden"])
        judge.load_state_dict(load_file(path / WEIGHTS))
        return judge.eval()


@dataclass
class Prediction:
    """Per image: class probabilities of each head (in COLOUR_CLASSES, SHAPE_CLASSES, POSITION_CLASSES order) and
    the predicted equal-area radius (fraction of the side)."""

    colour: torch.Tensor
    shape: torch.Tensor
    position: torch.Tensor
    radius: torch.Tensor

    def names(self, head: str) -> list[str]:
        return [HEADS[head][i] for i in getattr(self, head).argmax(1).tolist()]

    def parts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parsed = [parse_prompt(p) for p in prompts]
        rows = torch.arange(len(parsed), device=self.colour.device)

        def prob(head: str, k: int) -> torch.Tensor:
            index = torch.tensor([HEADS[head].index(t[k]) for t in parsed], device=rows.device)
            return getattr(self, head)[rows, index]

        agreement = prob("colour", 0) * prob("shape", 1) * prob("position", 2)
        size = (self.radius / RADIUS_RANGE[1]).clamp(0, 1)
        return agreement.float(), size.float()


def _blur(images: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur of each image [B,C,H,W] with its own σ (px; 0 leaves it as it is), borders
    replicated."""
    b, c, h, w = images.shape
    reach = math.ceil(3 * max(float(np.max(sigmas, initial=0.0)), 0.5))
    k = torch.arange(-reach, reach + 1, dtype=images.dtype)
    s = torch.as_tensor(sigmas, dtype=images.dtype).clamp_min(1e-3)[:, None]
    g = torch.exp(-0.5 * (k[None] / s) ** 2)
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    x = F.pad(images.reshape(1, b * c, h, w), (reach,) * 4, mode="replicate")
    x = F.conv2d(x, g[:, None, None, :], groups=b * c)
    x = F.conv2d(x, g[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def _coverage(image: torch.Tensor, grey: torch.Tensor, colour: str) -> torch.Tensor:
    """[H, W]: how much of each pixel is ``colour``; a render's pixels are g + c·(rgb − g) over its grey g."""
    direction = torch.tensor(COLOURS[colour])[:, None, None] - grey
    return (((image - grey) * direction).sum(0) / direction.pow(2).sum(0).clamp_min(1e-6)).clamp(0, 1)


def _blob(rng: np.random.Generator, colour: str, position: str, centre: np.ndarray, grey: torch.Tensor,
          background: float, gradient: float) -> torch.Tensor:
    """Coverage [H, W] of the union of 2-3 small circles near ``centre``: each new circle touches or overlaps a
    previous one without covering most of it (centre distance 0.6-1.1 × the sum of the radii), so the union is
    lobed, not a circle."""
    centres, radii = [centre], [rng.uniform(*BLOB_RADIUS)]
    for _ in range(rng.integers(1, 3)):
        k, r, angle = rng.integers(len(centres)), rng.uniform(*BLOB_RADIUS), rng.uniform(0, 2 * math.pi)
        centres.append(centres[k] + rng.uniform(*BLOB_DISTANCE) * (radii[k] + r) * np.array([math.cos(angle),
                                                                                              math.sin(angle)]))
        radii.append(r)
    coverage = torch.zeros(grey.shape[1:])
    for (x, y), r in zip(centres, radii, strict=True):
        circle = render(Scene(colour, "circle", position, float(x), float(y), float(r), background, gradient))
        coverage = torch.maximum(coverage, _coverage(circle, grey, colour))
    return coverage


def _distort(rng: np.random.Generator, coverage: torch.Tensor, centres: np.ndarray, radii: np.ndarray
             ) -> torch.Tensor:
    """Warp each coverage map [B,1,H,W] about its shape's centre (rotation, stretch, shear and a taper that
    makes squares trapezoids), then round the corners of some: blur by σ px and sharpen back to a one-pixel
    edge (shares WARPED and ROUNDED). Model samples draw squares as trapezoids and rounded squares; the label
    stays the drawn shape."""
    n = len(coverage)
    angle = rng.uniform(-ROTATE, ROTATE, n)
    stretch = rng.uniform(1 - STRETCH, 1 + STRETCH, (n, 2))
    shear = rng.uniform(-SHEAR, SHEAR, n)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)  # [B, 2, 2]
    skew = np.stack([np.stack([stretch[:, 0], shear], 1), np.stack([np.zeros(n), stretch[:, 1]], 1)], 1)
    a = rotation @ skew  # maps an output offset from the centre to the input offset it samples
    p = 2 * centres - 1  # normalised coordinates of the centres (align_corners=False)
    theta = np.concatenate([a, (p - (a @ p[:, :, None])[:, :, 0])[:, :, None]], 2)
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(coverage.shape), align_corners=False)
    taper = torch.from_numpy(rng.uniform(-TAPER, TAPER, n) / (2 * radii)).float()[:, None, None]
    offset = grid - torch.from_numpy(p).float()[:, None, None, :]
    grid = torch.stack([grid[..., 0] + offset[..., 0] * taper * offset[..., 1], grid[..., 1]], -1)
    warped = F.grid_sample(coverage, grid, align_corners=False, padding_mode="zeros")
    warped = torch.where(torch.from_numpy(rng.uniform(size=n) < WARPED)[:, None, None, None], warped, coverage)
    sigma = rng.uniform(0, ROUND, n) * (rng.uniform(size=n) < ROUNDED) * np.minimum(1.0, radii * IMAGE_SIZE / 4)
    gain = torch.from_numpy(1 + 2 * sigma).float()[:, None, None, None]
    rounded = ((_blur(warped, sigma) - 0.5) * gain + 0.5).clamp(0, 1)
    return torch.where(torch.from_numpy(sigma > 0)[:, None, None, None], rounded, warped)


def _noise(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Coloured noise smoothed over 1-3 px, like samples of untrained weights: [n,3,H,W]."""
    x = _blur(torch.from_numpy(rng.normal(size=(n, 3, IMAGE_SIZE, IMAGE_SIZE))).float(), rng.uniform(0.5, 1.5, n))
    x = x / x.std(dim=(2, 3), keepdim=True)
    level = torch.from_numpy(rng.uniform(0.3, 0.6, (n, 3, 1, 1))).float()
    return level + x * torch.from_numpy(rng.uniform(0.1, 0.3, (n, 1, 1, 1))).float()


def make_examples(rng: np.random.Generator, n: int, mix: Sequence[float] = MIX, augment: bool = True
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` images [n,3,32,32] and their targets (class indices of each head, ``size`` = visible equal-area
    radius / RADIUS_SCALE, ``kind`` = index into KINDS), drawn from ``rng``. ``augment=False`` keeps the data's
    nuisance ranges and adds no warp, blur, noise or colour jitter (a heavily blurred example is still blurred:
    that is its kind)."""
    triples = all_triples()
    kinds = rng.choice(len(KINDS), size=n, p=np.asarray(mix) / np.sum(mix))
    chosen = [triples[i] for i in rng.integers(len(triples), size=n)]
    jitter = JITTER + (EXTRA_JITTER if augment else 0.0)
    centres = np.array([POSITIONS[p] for _, _, p in chosen]) + rng.uniform(-jitter, jitter, size=(n, 2))
    radii = rng.uniform(*TRAIN_RADIUS, size=n)
    backgrounds = rng.uniform(*(TRAIN_BACKGROUND if augment else BACKGROUND_RANGE), size=n)
    gradients = rng.uniform(*GRADIENT_RANGE, size=n) * (1.5 if augment else 1.0)
    greys, coverages, colours, labels = [], [], [], {head: [] for head in HEADS}
    for i, (colour, shape, position) in enumerate(chosen):
        kind = KINDS[kinds[i]]
        nuisance = (float(backgrounds[i]), float(gradients[i]))
        grey = render(Scene(colour, shape, position, OFF_IMAGE, OFF_IMAGE, float(radii[i]), *nuisance))
        if kind == "blob":
            coverage = _blob(rng, colour, position, centres[i], grey, *nuisance)
        elif kind in ("shape", "blurred"):
            x, y = centres[i]
            coverage = _coverage(render(Scene(colour, shape, position, x, y, float(radii[i]), *nuisance)), grey,
                                 colour)
        else:
            coverage = torch.zeros(grey.shape[1:])
        greys.append(grey)
        coverages.append(coverage)
        colours.append(COLOURS[colour])
        words = {"shape": (colour, shape, position), "blurred": (colour, "unclear", position),
                 "blob": (colour, "unclear", position)}.get(kind, ("none", "unclear", "none"))
        for head, word in zip(HEADS, words, strict=True):
            labels[head].append(HEADS[head].index(word))
    grey, coverage = torch.stack(greys), torch.stack(coverages)[:, None]
    if augment:
        coverage = _distort(rng, coverage, centres, radii)
    rgb = torch.tensor(colours, dtype=torch.float32)[:, :, None, None]
    batch = grey + coverage * (rgb - grey)
    noise_kind = torch.from_numpy(kinds == KINDS.index("noise"))
    if noise_kind.any():
        batch[noise_kind] = _noise(rng, int(noise_kind.sum()))
    heavy = kinds == KINDS.index("blurred")
    sigmas = np.where(heavy, rng.uniform(*HEAVY_BLUR, size=n), rng.uniform(*LIGHT_BLUR, size=n) if augment else 0.0)
    for group in (heavy, ~heavy):  # apart: the light blur's kernel is a third of the heavy one's
        if group.any():
            batch[torch.from_numpy(group)] = _blur(batch[torch.from_numpy(group)], sigmas[group])
    if augment:
        gain = 1 + rng.uniform(-GAIN, GAIN, size=(n, 3, 1, 1))
        offset = rng.uniform(-OFFSET, OFFSET, size=(n, 3, 1, 1))
        noise = rng.normal(size=batch.shape) * rng.uniform(0, NOISE_STD, size=(n, 1, 1, 1))
        batch = batch * torch.from_numpy(gain).float() + torch.from_numpy(offset + noise).float()
    targets = {head: torch.tensor(v) for head, v in labels.items()}
    targets["size"] = torch.sqrt(coverage.mean(dim=(1, 2, 3)) / math.pi) / RADIUS_SCALE
    targets["kind"] = torch.from_numpy(kinds)
    return batch.clamp(0, 1), targets


def _loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    parts = {head: F.cross_entropy(out[head], target[head]) for head in HEADS}
    parts["size"] = F.mse_loss(out["size"], target["size"])
    return parts


def train_judge(out_dir: str | Path, steps: int = 2000, seed: int = 0, batch: int = 128, lr: float = 3e-3,
                loss_png: Path | None = None, log_every: int = 100) -> tuple[Judge, dict]:
    """Train a judge on fresh examples each step (seeded), save it to ``out_dir`` (safetensors + config.json) and
    return it with a report (losses, wall and CPU time)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(50, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    t0, cpu0 = time.monotonic(), time.process_time()
    history: dict[str, list[float]] = {name: [] for name in ("total", *HEADS, "size")}
    judge.train()
    for step in range(steps):
        images, target = make_examples(rng, batch)
        parts = _loss(judge(images), target)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["total"].append(loss.item())
        for name, value in parts.items():
            history[name].append(value.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            recent = {k: np.mean(v[-log_every:]) for k, v in history.items()}
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in recent.items()), flush=True)
    judge.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in judge.state_dict().items()}, out / WEIGHTS)
    config = {"channels": list(judge.channels), "hidden": judge.hidden,
              "classes": {k: list(v) for k, v in HEADS.items()}, "radius_scale": RADIUS_SCALE,
              "training": {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "radius_range": TRAIN_RADIUS,
                           "background_range": TRAIN_BACKGROUND, "extra_jitter": EXTRA_JITTER,
                           "light_blur_px": LIGHT_BLUR, "heavy_blur_px": HEAVY_BLUR,
                           "mix": dict(zip(KINDS, MIX, strict=True))}}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    if loss_png is not None:
        plot_losses(history, loss_png)
    report = {"steps": steps, "batch": batch, "seed": seed, "minutes": (time.monotonic() - t0) / 60,
              "cpu_minutes": (time.process_time() - cpu0) / 60, "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in judge.parameters()),
              "weights_kb": (out / WEIGHTS).stat().st_size / 1024,
              "final_loss": {k: float(np.mean(v[-100:])) for k, v in history.items()}}
    return judge, report


def _figure(width: float, height: float, dpi: int = 100):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def plot_losses(history: dict[str, list[float]], path: Path, k: int = 50) -> None:
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    for name, values in history.items():
        v = np.asarray(values)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v
        ax.plot(np.arange(len(smooth)) + (len(v) - len(smooth)) // 2, smooth, lw=1.5 if name == "total" else 1,
                label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"judge training loss (mean of {k} steps; size: MSE of radius / {RADIUS_SCALE})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def plot_confusions(matrices: dict[str, tuple[np.ndarray, Sequence[str], Sequence[str]]], path: Path) -> None:
    """One panel per (counts [rows, cols], row labels, column labels), each cell annotated with its count."""
    fig = _figure(4.2 * len(matrices), 4.0)
    for i, (title, (m, rows, cols)) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), i + 1)
        ax.imshow(m, cmap="Blues")
        for r in range(m.shape[0]):
            for c in range(m.shape[1]):
                ax.text(c, r, str(int(m[r, c])), ha="center", va="center", fontsize=9,
                        color="white" if m[r, c] > m.max() / 2 else "black")
        ax.set_xticks(range(len(cols)), [f"judge: {c}" for c in cols], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


_SHORT = {"circle": "circ", "square": "sq", "triangle": "tri", "unclear": "?", "none": "none"}


def contact_sheet(images: torch.Tensor, prompt_shapes: Sequence[str], fits: Sequence[str], calls: Sequence[str],
                  path: Path, columns: int = 15, scale: int = 3) -> None:
    """Every image ×``scale`` in a grid, annotated "#index p:prompt's shape" / "f:fit j:judge" (the judge's call in
    red when it differs from the fit), for checking each call by eye."""
    cell, pad, text = IMAGE_SIZE * scale, 4, 22
    rows = math.ceil(len(images) / columns)
    width, height = columns * (cell + pad) + pad, rows * (cell + text + pad) + pad
    canvas = np.ones((height, width, 3))
    big = images.clamp(0, 1).repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    dpi = 200
    fig = _figure(width / 100, height / 100, dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    for i, image in enumerate(big):
        x, y = pad + (i % columns) * (cell + pad), pad + (i // columns) * (cell + text + pad)
        canvas[y : y + cell, x : x + cell] = image
    ax.imshow(canvas, interpolation="nearest")
    for i in range(len(images)):
        x, y = pad + (i % columns) * (cell + pad), pad + (i // columns) * (cell + text + pad) + cell
        ax.text(x, y + 1, f"#{i} p:{_SHORT[prompt_shapes[i]]}", fontsize=4, va="top")
        ax.text(x, y + 11, f"f:{_SHORT[fits[i]]}", fontsize=4, va="top")
        ax.text(x + cell / 2, y + 11, f"j:{_SHORT[calls[i]]}", fontsize=4, va="top",
                color="black" if calls[i] == fits[i] or (calls[i], fits[i]) == ("unclear", "none") else "red")
    ax.set_axis_off()
    fig.savefig(path, dpi=dpi)


def render_accuracy(judge: Judge, seed: int, n: int, augment: bool) -> dict:
    """Per-head accuracy (and radius error) on ``n`` fresh examples: the training mixture with augmentation, or
    plain shapes without; with augmentation also per kind of example."""
    mix = MIX if augment else (1.0, *(0.0,) * (len(KINDS) - 1))
    images, target = make_examples(np.random.default_rng(seed), n, mix, augment)
    pred = judge.predict(images)
    correct = {head: getattr(pred, head).argmax(1) == target[head] for head in HEADS}
    correct["all three"] = correct["colour"] & correct["shape"] & correct["position"]
    error = (pred.radius - target["size"] * RADIUS_SCALE).abs()

    def summary(mask: torch.Tensor) -> dict:
        out = {head: c[mask].float().mean().item() for head, c in correct.items()}
        shaped = mask & (target["kind"] != KINDS.index("empty"))
        out["radius_mae_px"] = error[shaped].mean().item() * IMAGE_SIZE if shaped.any() else 0.0
        out["n"] = int(mask.sum())
        return out

    result = {"all": summary(torch.ones(n, dtype=torch.bool))}
    if augment:
        result.update({kind: summary(target["kind"] == k) for k, kind in enumerate(KINDS)})
    return result


def _mean_se(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"mean": x.mean().item(), "se": (x.std() / math.sqrt(len(x))).item()}


def validate_on_samples(judge: Judge, model: str, n: int, split_seed: int, assets: Path) -> dict:
    """The judge on base-model samples of the held-out prompts (seeds 0..n-1): its shape call against the shape
    fit of world/shape_score.py and against the prompt, colour and position against the prompt, and its score
    on base samples vs data renders, ideal renders and random-init samples."""
    from policy import DiffusionPolicy, SamplerConfig
    from world.shape_score import fit_shapes
    from world.train import random_init_model

    heldout = split_prompts(split_seed)[1]
    prompts = [heldout[i % len(heldout)] for i in range(n)]
    sampler = SamplerConfig()
    seeds = list(range(len(prompts)))
    images = DiffusionPolicy.from_pretrained(model, device="cpu", sampler=sampler).sample_images(prompts, seeds)
    with tempfile.TemporaryDirectory() as tmp:
        random_policy = DiffusionPolicy.from_pretrained(random_init_model(tmp), device="cpu", sampler=sampler)
        random_images = random_policy.sample_images(prompts, seeds)
    pred = judge.predict(images)
    fit = fit_shapes(images, prompts).names()
    calls = pred.names("shape")
    parsed = [parse_prompt(p) for p in prompts]
    want = [s for _, s, _ in parsed]
    fit_classes, prompt_classes = (*SHAPES, "none"), SHAPES
    vs_fit = np.zeros((len(fit_classes), len(SHAPE_CLASSES)), dtype=int)
    vs_prompt = np.zeros((len(prompt_classes), len(SHAPE_CLASSES)), dtype=int)
    for f, w, c in zip(fit, want, calls, strict=True):
        vs_fit[fit_classes.index(f), SHAPE_CLASSES.index(c)] += 1
        vs_prompt[prompt_classes.index(w), SHAPE_CLASSES.index(c)] += 1
    agree_fit = [c == f or (c, f) == ("unclear", "none") for c, f in zip(calls, fit, strict=True)]
    plot_confusions({f"shape: world_shape's fit vs judge (n={n})": (vs_fit, [f"fit: {c}" for c in fit_classes],
                                                                     SHAPE_CLASSES),
                     f"shape: prompt vs judge (n={n})": (vs_prompt, [f"prompt: {c}" for c in prompt_classes],
                                                         SHAPE_CLASSES)},
                    assets / "judge_confusion.png")
    contact_sheet(images, want, fit, calls, assets / "judge_contact_sheet.png")
    ideal = render_batch(sample_scenes(prompts, n, seed=1, radius=RADIUS_RANGE[1]))
    data = render_batch(sample_scenes(prompts, n, seed=1))
    scores = {}
    for name, x in {"random init": random_images, "base model": images, "data (random sizes)": data,
                    "ideal (largest size)": ideal}.items():
        agreement, size = judge.score_parts(x, prompts)
        scores[name] = {"score": _mean_se(agreement + SIZE_WEIGHT * size), "agreement": _mean_se(agreement),
                        "size": _mean_se(size)}
    return {
        "n": n, "split_seed": split_seed, "model": model, "sampler": sampler.model_dump(),
        "shape_vs_fit": {"rows": [f"fit: {c}" for c in fit_classes], "columns": list(SHAPE_CLASSES),
                         "counts": vs_fit.tolist()},
        "shape_vs_prompt": {"rows": [f"prompt: {c}" for c in prompt_classes], "columns": list(SHAPE_CLASSES),
                            "counts": vs_prompt.tolist()},
        "agreement": {
            "judge_shape_vs_fit": float(np.mean(agree_fit)),
            "judge_shape_vs_prompt": float(np.mean([c == w for c, w in zip(calls, want, strict=True)])),
            "fit_vs_prompt": float(np.mean([f == w for f, w in zip(fit, want, strict=True)])),
            "judge_unclear": float(np.mean([c == "unclear" for c in calls])),
            "judge_colour_vs_prompt": float(np.mean([c == t[0] for c, t in zip(pred.names("colour"), parsed,
                                                                               strict=True)])),
            "judge_position_vs_prompt": float(np.mean([c == t[2] for c, t in zip(pred.names("position"), parsed,
                                                                                 strict=True)])),
        },
        "scores": scores,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def write_record(path: Path, report: dict, renders: dict, samples: dict, assets: str) -> None:
    heads = [*HEADS, "all three"]
    lines = [
        "# The world judge: how it was trained and checked",
        "",
        "A learned, held-out judge of the embedded world (world/judge.py; reward `world_judge`, "
        "rewards/world_judge.py). It shares no code with the training reward (rewards/world.py) or the shape "
        "fit (world/shape_score.py). Reproduce (2 CPU cores, no downloads):",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- seed {report['seed']}; {report['steps']} steps of batch {report['batch']} (fresh examples each step); "
        f"torch threads {report['threads']}; load average at start / end {report['load_start']} / "
        f"{report['load_end']} (the CPU was shared with other jobs)",
        f"- training wall time {report['minutes']:.1f} min, CPU time {report['cpu_minutes']:.1f} min; whole run "
        f"(with validation) {report['minutes_total']:.1f} min",
        f"- parameters {report['parameters']:,}; weights on disk {report['weights_kb']:.0f} KB (float32)",
        "- final losses (mean of the last 100 steps): "
        + ", ".join(f"{k} {v:.4f}" for k, v in report["final_loss"].items()),
        f"- training examples: every (colour, shape, position) triple, radius {TRAIN_RADIUS} (data: {RADIUS_RANGE}),"
        f" background {TRAIN_BACKGROUND}, extra centre jitter {EXTRA_JITTER}, blur σ {LIGHT_BLUR} px, pixel noise "
        f"up to {NOISE_STD}, per-channel gain ±{GAIN} and offset ±{OFFSET}; {WARPED:.0%} of shapes warped (rotation "
        f"±{ROTATE} rad, stretch and shear ±{STRETCH} / ±{SHEAR}, taper ±{TAPER}), {ROUNDED:.0%} with corners "
        f"rounded (blur up to {ROUND} px, re-sharpened); share of kinds "
        + ", ".join(f"{k} {m:.0%}" for k, m in zip(KINDS, MIX, strict=True))
        + f" (blurred: σ {HEAVY_BLUR} px, shape unclear; blob: 2-3 circles, shape unclear; empty: background only; "
        "noise: smoothed coloured noise like untrained weights' samples; both no colour, shape unclear, radius 0)",
        "",
        f"Loss curves: {assets}/judge_train_loss.png",
        "",
        "## Accuracy on fresh renders",
        "",
        f"{renders['augmented']['all']['n']} examples of the training mixture with augmentation (by kind), and "
        f"{renders['clean']['all']['n']} plain renders without augmentation (radius {TRAIN_RADIUS}); other seeds "
        "than training.",
        "",
        "| examples | n | " + " | ".join(heads) + " | radius error (px) |",
        "|---|---|" + "---|" * len(heads) + "---|",
    ]
    rows = {f"augmented, {k}": v for k, v in renders["augmented"].items()} | {"clean": renders["clean"]["all"]}
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | " + " | ".join(_pct(r[h]) for h in heads)
                     + f" | {r['radius_mae_px']:.2f} |")
    a = samples["agreement"]
    lines += [
        "",
        f"## On base-model samples ({samples['n']} held-out prompts' samples, seeds 0..{samples['n'] - 1})",
        "",
        f"{samples['model']}, {samples['sampler']['num_steps']} DDIM steps, eta {samples['sampler']['eta']}, "
        f"guidance {samples['sampler']['guidance_scale']}; prompts cycle over the held-out combinations of split "
        f"seed {samples['split_seed']}.",
        "",
        f"- judge's shape call = world_shape's fit (judge \"unclear\" = fit \"none\" counted as agreeing): "
        f"{_pct(a['judge_shape_vs_fit'])}",
        f"- judge's shape call = prompt's shape: {_pct(a['judge_shape_vs_prompt'])} "
        f"(world_shape's fit = prompt's shape: {_pct(a['fit_vs_prompt'])})",
        f"- judge calls the shape \"unclear\": {_pct(a['judge_unclear'])}",
        f"- judge's colour = prompt's: {_pct(a['judge_colour_vs_prompt'])}; judge's position = prompt's: "
        f"{_pct(a['judge_position_vs_prompt'])}",
        "",
        "Shape calls (rows: world_shape's fit or the prompt; columns: the judge):",
        "",
    ]
    for key in ("shape_vs_fit", "shape_vs_prompt"):
        m = samples[key]
        lines += ["| | " + " | ".join(f"judge: {c}" for c in m["columns"]) + " |",
                  "|---|" + "---|" * len(m["columns"])]
        lines += [f"| {r} | " + " | ".join(map(str, counts)) + " |" for r, counts in zip(m["rows"], m["counts"],
                                                                                         strict=True)]
        lines.append("")
    lines += [
        f"Figures: {assets}/judge_confusion.png; every sample with its calls, to check by eye: "
        f"{assets}/judge_contact_sheet.png (p: the prompt's shape, f: world_shape's fit, j: the judge, red where "
        "it differs from the fit).",
        "",
        "## The judge's score ranks image sets",
        "",
        f"Score = P(colour) · P(shape) · P(position) of the prompt's words + {SIZE_WEIGHT} · clip(radius / "
        f"{RADIUS_RANGE[1]}, 0, 1); mean ± standard error over {samples['n']} images, same prompts.",
        "",
        "| images | score | agreement | size term |",
        "|---|---|---|---|",
    ]
    for name, s in samples["scores"].items():
        lines.append(f"| {name} | " + " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['se']:.3f}"
                                                   for k in ("score", "agreement", "size")) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="world/judge", help="where the weights go")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--model", default="world/model", help="the base model whose samples are judged")
    parser.add_argument("--n", type=int, default=180, help="base-model samples to judge")
    parser.add_argument("--split-seed", type=int, default=0, help="learner.prompts.WORLD_SPLIT_SEED")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load_start = time.monotonic(), f"{os.getloadavg()[0]:.1f}"
    out = Path(args.out)
    committed = out.resolve() == JUDGE_DIR
    assets = ASSETS if committed else out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    judge, report = train_judge(out, args.steps, args.seed, args.batch, loss_png=assets / "judge_train_loss.png")
    renders = {"augmented": render_accuracy(judge, args.seed + 1000, 2000, augment=True),
               "clean": render_accuracy(judge, args.seed + 2000, 2000, augment=False)}
    samples = validate_on_samples(judge, args.model, args.n, args.split_seed, assets)
    report.update(command="python -m world.judge " + " ".join(sys.argv[1:] if argv is None else argv),
                  load_start=load_start, load_end=f"{os.getloadavg()[0]:.1f}",
                  minutes_total=(time.monotonic() - t0) / 60)
    metrics = {"training": report, "renders": renders, "samples": samples}
    (assets / "judge_metrics.json").write_text(json.dumps(metrics, indent=2))
    write_record(RECORD if committed else out / "JUDGE.md", report, renders, samples,
                 "assets" if committed else str(assets))
    print(json.dumps({"renders": renders, "agreement": samples["agreement"], "scores": samples["scores"]}, indent=2))


if __name__ == "__main__":
    main()
