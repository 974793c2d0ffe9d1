"""PNG figures of a run: captioned sample grids, before/after rows, and reward curves with ± SEM bands.

Every file is written atomically (a hidden temp file beside the target, then ``os.replace``), so a viewer or a
crash never sees half a PNG and a failed write leaves the previous figure in place. Curves are drawn on a bare
``Figure`` with the Agg canvas: no pyplot, no global backend switch, safe off the main thread.

Grid geometry (what tests and viewers can rely on), with ``t = H·upscale``, ``u = W·upscale``, ``p = PAD``
and a caption band of ``c = caption_lines · (font_size + 3)`` pixels:
  * image grid, ``n`` columns × ``m`` rows: ``(n·u + (n+1)·p) × (m·(t + c) + (m+1)·p)``; tile (r, j) at
    ``x = p + j·(u + p)``, ``y = p + r·(t + c + p)``, its caption in the band under it;
  * comparison grid, ``R`` labelled rows of ``N`` tiles: a label column of width ``L`` (widest label + 2p),
    then tile (r, j) at ``x = L + p + j·(u + p)``, ``y = p + r·(t + p)``; one caption band under the last row;
    size ``(L + N·u + (N+1)·p) × (R·(t + p) + p + c)``.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

PAD = 4
Font = ImageFont.FreeTypeFont
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@contextmanager
def _atomic_png(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success move it onto ``path``, on any error delete it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png (the figures are written as PNG), got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _to_tiles(name: str, images: Tensor, upscale: int) -> np.ndarray:
    """[B,3,H,W] floats in [0,1] → [B, H·up, W·up, 3] uint8 (nearest-neighbour: tiny images stay crisp).

    Values a hair outside [0,1] (VAE decoders overshoot) are clamped; NaN/inf mean a broken model: they raise.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B>0, 3, H, W], got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"upscale must be an int >= 1, got {upscale!r}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)


def _check_captions(captions: Sequence[str], count: int, what: str) -> None:
    if len(captions) != count:
        raise ValueError(f"got {len(captions)} captions for {count} {what}; give exactly one per {what[:-1]}")


def _font(font_size: int) -> Font:
    """Pillow's bundled scalable font (FreeType is in Pillow's wheels): no font file to ship or find."""
    if font_size < 6:
        raise ValueError(f"font_size must be >= 6 to be readable, got {font_size}")
    font = ImageFont.load_default(size=font_size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; captions need a scalable font")
    return font


def _line_px(font_size: int) -> int:
    return font_size + 3


def _wrap(draw: ImageDraw.ImageDraw, font: Font, text: str, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` px; over-long words are split; overflow ends the last line in "..."."""

    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word) and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "..."]
    return lines


def _draw_caption(
    draw: ImageDraw.ImageDraw, font: Font, text: str, xy: tuple[int, int], width: int, lines: int
) -> None:
    x, y = xy
    for i, line in enumerate(_wrap(draw, font, text, width, lines)):
        draw.text((x, y + i * _line_px(int(font.size))), line, fill=INK, font=font)


def save_image_grid(
    images: Tensor,
    captions: Sequence[str],
    path: Path | str,
    ncol: int = 8,
    upscale: int = 4,
    caption_lines: int = 2,
    font_size: int = 11,
) -> None:
    """Tile ``images`` [B,3,H,W] in [0,1] into rows of ``ncol``, each with its wrapped caption underneath."""
    tiles = _to_tiles("images", images, upscale)
    _check_captions(captions, len(tiles), "images")
    if ncol < 1 or caption_lines < 1:
        raise ValueError(f"ncol and caption_lines must be >= 1, got {ncol=}, {caption_lines=}")
    font = _font(font_size)
    b, t, u, _ = tiles.shape
    n = min(ncol, b)
    m = math.ceil(b / n)
    c = caption_lines * _line_px(font_size)
    canvas = Image.new("RGB", (n * u + (n + 1) * PAD, m * (t + c) + (m + 1) * PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        x, y = PAD + (i % n) * (u + PAD), PAD + (i // n) * (t + c + PAD)
        canvas.paste(Image.fromarray(tile), (x, y))
        _draw_caption(draw, font, caption, (x, y + t), u, caption_lines)
    with _atomic_png(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_comparison_grid(
    rows: Mapping[str, Tensor],
    captions: Sequence[str],
    path: Path | str,
    upscale: int = 4,
    caption_lines: int = 2,
    font_size: int = 11,
) -> None:
    """Stack labelled rows (e.g. ``{"before": x0, "after": x1}``; same prompts, seeds), one caption a column.

    Every row is [N,3,H,W] in [0,1] with the same shape, so column j compares the same prompt across rows.
    """
    if not rows:
        raise ValueError("rows is empty: give at least one labelled row, e.g. {'before': images}")
    tiles = {label: _to_tiles(f"rows[{label!r}]", images, upscale) for label, images in rows.items()}
    shapes = {label: tuple(images.shape) for label, images in rows.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all rows must have the same shape [N,3,H,W], got {shapes}")
    first = next(iter(tiles.values()))
    _check_captions(captions, len(first), "columns")
    if caption_lines < 1:
        raise ValueError(f"caption_lines must be >= 1, got {caption_lines}")
    font = _font(font_size)
    n, t, u, _ = first.shape
    r = len(tiles)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = math.ceil(max(probe.textlength(label, font=font) for label in tiles)) + 2 * PAD
    c = caption_lines * _line_px(font_size)
    canvas = Image.new("RGB", (label_w + n * u + (n + 1) * PAD, r * (t + PAD) + PAD + c), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for ri, (label, row) in enumerate(tiles.items()):
        y = PAD + ri * (t + PAD)
        draw.text((PAD, y + (t - _line_px(font_size)) // 2), label, fill=INK, font=font)
        for j, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (label_w + PAD + j * (u + PAD), y))
    for j, caption in enumerate(captions):
        _draw_caption(draw, font, caption, (label_w + PAD + j * (u + PAD), r * (t + PAD)), u, caption_lines)
    with _atomic_png(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_reward_curve(
    history: Mapping[str, Sequence[tuple[int, float, float]]],
    path: Path | str,
    title: str = "",
    ylabel: str = "reward",
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = 100,
) -> None:
    """One line per series (mean vs learner step) with a shaded mean ± SEM band; image is figsize·dpi pixels.

    ``history`` maps a series label (e.g. "held-out", "train") to (step, mean, sem) points, as produced by
    ``RunLogger.curve``. A NaN mean leaves a gap in the line and a NaN SEM one in the band (a failed eval
    stays visible); an empty series is skipped (early in a run only some series exist).
    """
    if not history:
        raise ValueError("history is empty: give at least one series, e.g. {'held-out': [(step, mean, sem)]}")
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in history.items():
        if any(len(p) != 3 for p in points):
            raise ValueError(f"series {label!r}: every point must be (step, mean, sem)")
        pts = sorted((int(s), float(mu), float(se)) for s, mu, se in points)
        if any(se < 0 for _, _, se in pts):
            raise ValueError(f"series {label!r}: the standard error must be >= 0 (or NaN)")
        if not pts:
            continue
        steps, mean, sem = (np.array(col, dtype=np.float64) for col in zip(*pts, strict=True))
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=label)
        ax.fill_between(steps, mean - sem, mean + sem, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.set_xlabel("learner step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="best")
    fig.tight_layout()
    with _atomic_png(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
