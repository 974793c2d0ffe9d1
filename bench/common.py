"""What every benchmark section shares: the configuration it runs, the machine it ran on, timing and tables.

Why one place: the baseline and the system must run the *same* work (model, sampler, pairs, batch size,
number of learner updates), so both derive their config from ``bench_tree`` and only change what the
comparison is about (processes, threads, modes).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.config import Config, build_config, load_yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"

# --quick: a tiny chain (4 steps, 2 branch points) and tiny batches, so the whole suite is a smoke test.
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "sampler": {"num_steps": 4},
    "pairs": {"branch_steps": [0, 2]},
    "rollout": {"prompts_per_task": 4, "target_task_seconds": 1.0},
    "train": {"batch_size": 8},
}
# Every measured run: no periodic evaluation, checkpoint or TensorBoard inside the timed loop. Two held-out
# images, because the final checkpoint stores the eval curve as strict JSON and one image has a NaN s.e.
QUIET_RUN: dict[str, dict[str, Any]] = {
    "eval": {"every": 0, "num_prompts": 2, "seeds_per_prompt": 1, "grid_prompts": 0},
    "output": {"checkpoint_every": 1_000_000, "tensorboard": False, "trajectory_log": False},
}


def bench_tree(model_path: str | Path, updates: int, quick: bool, out_dir: str | Path) -> dict[str, Any]:
    """configs/default.yaml with the benchmark's model, update count and quiet outputs (a nested dict)."""
    if updates < 1:
        raise ValueError(f"updates must be >= 1, got {updates}")
    tree = load_yaml(DEFAULT_CONFIG)
    for section, values in ({**QUICK_OVERRIDES} if quick else {}).items():
        tree.setdefault(section, {}).update(values)
    for section, values in QUIET_RUN.items():
        tree.setdefault(section, {}).update(values)
    tree["model"]["path"] = str(model_path)
    tree["train"]["steps"] = updates
    tree["output"]["dir"] = str(out_dir)
    return tree


def make_config(tree: dict[str, Any], **sections: dict[str, Any]) -> Config:
    """``tree`` with ``section={key: value}`` overrides applied, validated by the project's own Config."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return build_config(merged)


def pairs_per_prompt(cfg: Config) -> int:
    """Preference pairs one prompt of a generate call yields: one per branch step (TailorPO), else one."""
    return len(cfg.pairs.branch_steps) if cfg.pairs.kind == "step_branch" else 1


def chains_per_record(cfg: Config) -> int:
    """Chains behind one prompt of a generate call (trajectory pairs sample two chains per prompt)."""
    return 1 if cfg.pairs.kind == "step_branch" else 2


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (after none: callers warm up themselves when it matters)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmul/conv/attention work done by ``fn()`` (one call, any device, backward included).

    ``torch.utils.flop_counter.FlopCounterMode`` sums 2·m·n·k over the real ops; elementwise ops count nothing.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def _version(package: str) -> str:
    """Installed version without importing the package (the GPU machine has no Ray)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load average and library versions: what a reader needs to compare numbers."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 1, "ram_gib": _ram_gib(),
            "load_avg": tuple(round(x, 2) for x in load), "python": platform.python_version(),
            "torch": torch.__version__, "ray": _version("ray"), "diffusers": _version("diffusers"),
            "cuda": torch.cuda.is_available(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def fmt(value: Any) -> str:
    """A table cell: floats with 3 significant digits (4 for large), None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (readable as plain text too, so the terminal and RESULTS.md show the same)."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_block(path: Path, begin: str, end: str, block: str, heading: str) -> None:
    """Replace the text between the ``begin`` and ``end`` markers of ``path`` with ``block`` (markers included in
    ``block``'s frame), or append ``heading`` and the block when the markers are not there yet; the hand-written
    analysis around the block stays."""
    text = path.read_text()
    framed = f"{begin}\n{block}\n{end}"
    if begin in text:
        text = text[:text.index(begin)] + framed + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{framed}\n"
    path.write_text(text)
