"""``python -m learner.study --grid NAME``: a grid of experiment cells × seeds that tests one published claim.

Every cell is a set of overrides on ``configs/default.yaml`` (so the grids follow the default as it changes) and
runs through the real system in-process (``learner.main.run``: Ray actors, as the default job). All cells of a
grid train to the same budget: the same learner updates of the same number of pairs, or, for a grid that
compares pair kinds (``match_images``), the same number of images sampled — each cell's updates are scaled by its
pairs per sampled chain (a step-branch chain yields one pair per branch step, a trajectory pair takes two chains).

After each run the final checkpoint is compared with the base model on the same held-out prompts and noise seeds
(``learner.evaluate``): paired gain ± s.e., win rate ± s.e., prompt fidelity and the shape check. Per cell the
study reports these as mean ± s.e. OVER SEEDS, and states a verdict for each contrast the claim makes: its value
more than 2 s.e. above zero → holds, more than 2 s.e. below → does not hold, else inconclusive at this s.e.

Writes ``<out>/RESULTS.md``, ``results.json``, ``curves.png`` (held-out reward vs learner update and vs wall
time, mean ± s.e. band over seeds) and ``samples_<cell>.png`` (base and every seed at fixed noise seeds). A
finished cell × seed (its ``cells/<cell>/seed<k>.json``) is not rerun; the runs themselves go to ``<out>/runs/``
(git-ignored: checkpoints are never committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from learner.config import Config, ConfigError, build_config, load_yaml
from learner.main import DEFAULT_CONFIG, root_cause

ROOT = Path(__file__).resolve().parent.parent
WORLD_METRICS = ROOT / "world" / "assets" / "metrics.json"
COMPARE_SEED = 0  # held-out sample i uses noise seed COMPARE_SEED + i in every cell
GRID_PROMPTS = 8
Z = 2.0  # a contrast must clear Z standard errors for a verdict

# What every study run shares: a lighter in-run evaluation (all 18 held-out prompts × 4 seeds; the final
# measurement is the 256-sample comparison) and no TensorBoard files.
STUDY_RUN = {"eval": {"num_prompts": 18, "seeds_per_prompt": 4, "grid_prompts": 0}, "output": {"tensorboard": False}}
# --quick: any grid's first two cells at a tiny budget (the tests run it).
QUICK = {"train": {"steps": 2, "batch_size": 8}, "rollout": {"prompts_per_task": 4},
         "pairs": {"branch_steps": [0, 10]}, "eval": {"num_prompts": 4, "seeds_per_prompt": 1}}
# Grids of trajectory cells keep the default's updates with 32 pairs each: whole chains are sampled ~8× faster than
# step-branch chains (no ranking of children), so the learner sets the pace, and at 32 pairs an update takes ~2 s
# on 2 cores (10-update probes, diffusion_dpo and dense_dpo).
TRAJECTORY_BUDGET = {"pairs": {"kind": "trajectory"}, "guidance": {"kind": "none"}, "train": {"batch_size": 32}}


@dataclass(frozen=True)
class Contrast:
    """Σ_cell weight · (mean over seeds of ``metric``) − ``margin``; the claim says it is positive."""

    text: str
    weights: Mapping[str, float]
    metric: str = "gain"
    margin: float = 0.0


@dataclass(frozen=True)
class Grid:
    claim: str
    cells: Mapping[str, Mapping[str, Any]]  # cell -> overrides on default.yaml + ``shared``
    contrasts: tuple[Contrast, ...]
    shared: Mapping[str, Any] = field(default_factory=dict)
    seeds: int = 3
    match_images: bool = False  # scale updates so every cell samples as many chains as the first
    compare_n: int = 256


# The grids: data, in one place. β per loss: dpo_logprob on summed log-probs follows the default (β = 0.1);
# diffusion_dpo's ε-MSE surrogate is a per-element MEAN, orders of magnitude smaller than a summed log-ratio, so it
# takes the Diffusion-DPO paper's β = 5000 (Wallace et al. 2024, SD-1.5 setting, also a per-element mean);
# dense_dpo has no β: C = 10 and κ = 1e-4 of the dense-reward paper, whose κ is on per-element MEAN log-probs.
# 10-update probes (trajectory pairs, 16 a batch): diffusion_dpo at β = 5000 takes the loss from 0.69 to 0.35 and
# the held-out reward up 5.6 s.e.; dense_dpo's clip holds its logit under 2Cκ = 2e-3 (loss stays 0.693) and its
# gradient norm falls 30× as log-ratios leave [−κ, κ] (the paper's trust region), +1.8 s.e. in 10 updates.
GRIDS: dict[str, Grid] = {
    "tailorpo": Grid(
        claim="TailorPO: step-level pairs (two children of one x_t, the winner continues) beat whole-chain pairs "
              "for the same loss and the same number of images sampled.",
        # guidance off in both cells: it needs step pairs, and the claim is about the pairs alone
        shared={"loss": {"kind": "dpo_logprob"}, "guidance": {"kind": "none"}},
        cells={"step_branch": {"pairs": {"kind": "step_branch"}}, "trajectory": {"pairs": {"kind": "trajectory"}}},
        contrasts=(Contrast("step-branch pairs beat trajectory pairs", {"step_branch": 1, "trajectory": -1}),),
        match_images=True),
    "tailorpo_g": Grid(
        claim="TailorPO-G: a reward-gradient step on each step pair's winner adds reward over TailorPO.",
        shared={"pairs": {"kind": "step_branch"}, "loss": {"kind": "dpo_logprob"}},
        cells={"tailorpo": {"guidance": {"kind": "none"}}, "tailorpo_g": {"guidance": {"kind": "reward_gradient"}}},
        contrasts=(Contrast("guidance adds reward", {"tailorpo_g": 1, "tailorpo": -1}),)),
    "dense": Grid(
        claim="Dense-reward DPO: discounting later denoising steps (γ < 1) beats the undiscounted objective (γ = 1).",
        shared={**TRAJECTORY_BUDGET, "sampler": {"logprob_reduce": "mean"},
                "loss": {"kind": "dense_dpo", "scale_c": 10.0, "kappa": 1.0e-4, "num_step_samples": 3},
                "time_weight": {"mode": "discount", "discount_as": "sample"}},
        cells={"gamma1": {"time_weight": {"gamma": 1.0}}, "gamma0.9": {"time_weight": {"gamma": 0.9}},
               "gamma0.7": {"time_weight": {"gamma": 0.7}}},
        contrasts=(Contrast("γ = 0.9 beats γ = 1", {"gamma0.9": 1, "gamma1": -1}),
                   Contrast("γ = 0.7 beats γ = 1", {"gamma0.7": 1, "gamma1": -1}))),
    "rethinking": Grid(
        claim="Rethinking-DPO (ablation 2×2 on Diffusion-DPO): the stable reference update alone gives the largest "
              "gain; timestep-aware training helps mainly combined with it.",
        # τ = 8 of the default's 75 updates gives the reference nine chances to move (the paper: τ = 32 of ~2000).
        shared={**TRAJECTORY_BUDGET, "loss": {"kind": "diffusion_dpo", "beta": 5000.0}, "reference": {"tau": 8}},
        cells={"frozen_uniform": {"reference": {"strategy": "frozen"}, "time_weight": {"mode": "uniform"}},
               "stable_uniform": {"reference": {"strategy": "stable_update"}, "time_weight": {"mode": "uniform"}},
               "frozen_timestep": {"reference": {"strategy": "frozen"}, "time_weight": {"mode": "timestep_aware"}},
               "stable_timestep": {"reference": {"strategy": "stable_update"},
                                   "time_weight": {"mode": "timestep_aware"}}},
        contrasts=(
            Contrast("the stable reference alone raises the reward", {"stable_uniform": 1, "frozen_uniform": -1}),
            Contrast("the stable reference alone gains more than timestep-aware training alone",
                     {"stable_uniform": 1, "frozen_timestep": -1}),
            Contrast("timestep-aware training helps combined with the stable reference",
                     {"stable_timestep": 1, "stable_uniform": -1}),
            Contrast("timestep-aware training helps more with the stable reference than without (interaction)",
                     {"stable_timestep": 1, "stable_uniform": -1, "frozen_timestep": -1, "frozen_uniform": 1}))),
    "default": Grid(
        claim="The shipped default (configs/default.yaml) raises the held-out reward and closes at least half of "
              "the headroom between the base model and the ideal renders.",
        cells={"default": {}},
        contrasts=(Contrast("the default raises the held-out reward", {"default": 1}),
                   Contrast("the default closes at least half of the headroom", {"default": 1},
                            metric="headroom_closed", margin=0.5)),
        seeds=5),
}


# ---- configs --------------------------------------------------------------------------------------------------
def merge(*trees: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts merged left to right (later values win; dicts merge key by key)."""
    out: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) \
                else value
    return out


def pairs_per_chain(cfg: Config) -> float:
    """Preference pairs one sampled chain yields: one per branch step, or half a pair (two chains a pair)."""
    return float(len(cfg.pairs.branch_steps)) if cfg.pairs.kind == "step_branch" else 0.5


def cell_trees(grid: Grid, quick: bool = False, updates: int | None = None) -> dict[str, dict[str, Any]]:
    """Each cell's config tree without seed and output dir: default.yaml + study + shared + cell (+ quick), its
    updates set (``updates``, or scaled to the first cell's images with ``match_images``) and an eval every
    ~1/5 of the run so a curve exists."""
    default = load_yaml(DEFAULT_CONFIG)
    cells = dict(list(grid.cells.items())[:2]) if quick else dict(grid.cells)
    trees = {c: merge(default, STUDY_RUN, grid.shared, o, QUICK if quick else {}) for c, o in cells.items()}
    if updates is not None:
        trees = {c: merge(t, {"train": {"steps": updates}}) for c, t in trees.items()}
    ref = build_config(next(iter(trees.values())))
    for cell, tree in trees.items():
        cfg = build_config(tree)
        steps = cfg.train.steps
        if grid.match_images:
            steps = max(1, round(ref.train.steps * pairs_per_chain(cfg) / pairs_per_chain(ref)))
        trees[cell] = merge(tree, {"train": {"steps": steps}, "eval": {"every": math.ceil(steps / 5)}})
    return trees


def run_config(tree: Mapping[str, Any], out: Path, cell: str, seed: int) -> Config:
    return build_config(merge(tree, {"train": {"seed": seed}, "output": {"dir": str(run_dir(out, cell, seed))}}))


def run_dir(out: Path, cell: str, seed: int) -> Path:
    return out / "runs" / cell / f"seed{seed}"


def record_path(out: Path, cell: str, seed: int) -> Path:
    return out / "cells" / cell / f"seed{seed}.json"


# ---- one run --------------------------------------------------------------------------------------------------
@dataclass
class Baseline:
    """The base model's side of every comparison: the same prompts, noise seeds, images and scores for all cells."""

    cfg: Config
    prompts: list[str]
    seeds: list[int]
    policy: Any
    rewards: dict[str, Any]
    main: str

    @classmethod
    def build(cls, cfg: Config, n: int) -> Baseline:
        from learner.evaluate import build_rewards, load_policy
        from learner.prompts import load_prompts

        unique = load_prompts(cfg.data.eval_prompts)
        prompts = [unique[i % len(unique)] for i in range(n)]
        rewards, main = build_rewards(cfg, ["world_fidelity"], prompts)
        return cls(cfg, prompts, [COMPARE_SEED + i for i in range(n)], load_policy("base", cfg)[0], rewards, main)


def headroom() -> tuple[float, float]:
    """(base, ceiling) held-out ``world`` reward measured for the embedded world (world/assets/metrics.json)."""
    rows = json.loads(WORLD_METRICS.read_text())["rows"]
    return rows["base model, held-out"]["world"]["mean"], rows["ideal (ceiling), held-out"]["world"]["mean"]


def run_cell(cfg: Config, cell: str, seed: int, baseline: Baseline, out: Path) -> dict[str, Any]:
    """Train one cell × seed from scratch, compare its final checkpoint with the base model, save the record."""
    from learner.evaluate import compare, load_policy
    from learner.main import run

    shutil.rmtree(cfg.output.dir, ignore_errors=True)  # an interrupted run's files would mix with this one's
    summary = run(cfg, resume=False)
    policy, _ = load_policy(cfg.output.dir, baseline.cfg)
    result = compare(baseline.policy, policy, baseline.prompts, baseline.seeds, baseline.rewards, baseline.main)
    stats = result.summary()
    main = stats["rewards"][baseline.main]
    base, ceiling = headroom()
    record = {
        "cell": cell, "seed": seed, "steps": summary["steps"], "batch_size": cfg.train.batch_size,
        "chains": summary["chains"], "seconds": summary["seconds"], "n": stats["n"],
        "reward": main["B"], "base_reward": main["A"], "gain": main["B-A"], "win_rate": stats["win_rate"],
        "headroom_closed": main["B-A"]["mean"] / (ceiling - base) if baseline.main == "world" else None,
        "fidelity": stats["rewards"]["world_fidelity"]["B"], "shape": stats["rewards"].get("world_shape", {}).get("B"),
        "base_fidelity": stats["rewards"]["world_fidelity"]["A"],
        "base_shape": stats["rewards"].get("world_shape", {}).get("A"),
        "curve": eval_curve(Path(cfg.output.dir) / "metrics.jsonl"), "grid_prompts": baseline.prompts[:GRID_PROMPTS],
    }
    path = record_path(out, cell, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_strip(result.images["B"][:GRID_PROMPTS], path.with_name(f"seed{seed}_samples.png"))
    if not (out / "cells" / "base_samples.png").exists():
        save_strip(result.images["A"][:GRID_PROMPTS], out / "cells" / "base_samples.png")
    path.write_text(json.dumps(record, indent=1))  # last: its existence marks the cell × seed finished
    return record


def eval_curve(metrics: Path) -> list[list[float]]:
    """[update, seconds since the first evaluation, held-out mean, s.e.] of every ``eval`` row of a run."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["metrics"].get("eval/heldout_reward_mean") is not None]
    t0 = rows[0]["time"] if rows else 0.0
    return [[r["step"], r["time"] - t0, r["metrics"]["eval/heldout_reward_mean"],
             r["metrics"].get("eval/heldout_reward_sem") or math.nan] for r in rows]


def save_strip(images: torch.Tensor, path: Path) -> None:
    """[N,3,H,W] in [0,1] as one lossless PNG row (uint8, as the grids show them), read back by ``load_strip``."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    Image.fromarray(np.concatenate(list(pixels), axis=1)).save(path)


def load_strip(path: Path, n: int) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255
    return torch.stack(pixels.chunk(n, dim=1)).permute(0, 3, 1, 2)


# ---- statistics -----------------------------------------------------------------------------------------------
def over_seeds(values: Sequence[float]) -> dict[str, float]:
    """Mean and s.e. over seeds (sample std, ddof 1, over √n; NaN for one seed: no spread to measure)."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "se": se, "n": len(v)}


def verdict(diff: float, se: float, z: float = Z) -> str:
    """'holds' if the contrast is more than z s.e. above 0, 'does not hold' if more than z s.e. below, else
    'inconclusive' (always so without a finite s.e.)."""
    if not math.isfinite(se) or not math.isfinite(diff):
        return "inconclusive"
    if diff > z * se:
        return "holds"
    return "does not hold" if diff < -z * se else "inconclusive"


def evaluate_contrast(c: Contrast, cells: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """The contrast's value and s.e. from per-cell means over seeds (independent seeds: variances add)."""
    stats = [(w, cells[name][c.metric]) for name, w in c.weights.items()]
    diff = sum(w * s["mean"] for w, s in stats) - c.margin
    se = math.sqrt(sum(w * w * s["se"] ** 2 for w, s in stats))
    return {"text": c.text, "metric": c.metric, "weights": dict(c.weights), "margin": c.margin, "value": diff,
            "se": se, "verdict": verdict(diff, se)}


def overall(verdicts: Sequence[str]) -> str:
    """Holds if every contrast holds; does not hold if any does not; else inconclusive."""
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "does not hold" if "does not hold" in verdicts else "inconclusive"


METRICS = ("reward", "gain", "headroom_closed", "win_rate", "fidelity", "shape", "seconds", "chains", "steps")


def cell_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric, mean ± s.e. over the cell's seeds of each run's value (a run's mean for the comparisons)."""
    out = {}
    for m in METRICS:
        values = [r[m]["mean"] if isinstance(r[m], Mapping) else r[m] for r in records if r.get(m) is not None]
        if values:
            out[m] = over_seeds(values)
    return out


def mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """[k, 4] (update, mean seconds, mean reward, s.e.) over seeds, on the evaluations all seeds share; one seed
    keeps its own sampling s.e."""
    k = min(len(c) for c in curves)
    a = np.asarray([c[:k] for c in curves], dtype=np.float64)  # [seeds, k, 4]
    se = a[:, :, 2].std(axis=0, ddof=1) / math.sqrt(len(a)) if len(a) > 1 else a[0, :, 3]
    return np.stack([a[0, :, 0], a[:, :, 1].mean(0), a[:, :, 2].mean(0), se], axis=1)


# ---- report ---------------------------------------------------------------------------------------------------
def save_curves(curves: Mapping[str, np.ndarray], path: Path) -> None:
    """Held-out reward vs learner update and vs wall time, one line and ± s.e. band per cell."""
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for cell, c in curves.items():
        for ax, x in zip(axes, (c[:, 0], c[:, 1]), strict=True):
            (line,) = ax.plot(x, c[:, 2], marker="o", markersize=3, label=cell)
            ax.fill_between(x, c[:, 2] - c[:, 3], c[:, 2] + c[:, 3], color=line.get_color(), alpha=0.2, lw=0)
    for ax, label in zip(axes, ("learner update", "wall time since the first evaluation (s)"), strict=True):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out reward (in-run eval; update 0: base)")
    axes[0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")


def fmt(s: Mapping[str, float] | None, digits: int = 4) -> str:
    if s is None:
        return "–"
    se = f" ± {s['se']:.{digits}f}" if math.isfinite(s["se"]) else ""
    return f"{s['mean']:.{digits}f}{se}"


def write_report(name: str, grid: Grid, out: Path, records: Sequence[Mapping[str, Any]], command: str,
                 trees: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    from learner.plots import save_comparison_grid

    by_cell = {c: [r for r in records if r["cell"] == c] for c in trees}
    by_cell = {c: rs for c, rs in by_cell.items() if rs}
    cells = {c: cell_stats(rs) for c, rs in by_cell.items()}
    contrasts = [evaluate_contrast(c, cells) for c in grid.contrasts if all(n in cells for n in c.weights)]
    result = overall([c["verdict"] for c in contrasts]) if len(contrasts) == len(grid.contrasts) else "incomplete"
    base, ceiling = headroom()
    first = records[0]
    summary = {"grid": name, "claim": grid.claim, "command": command, "verdict": result, "contrasts": contrasts,
               "z": Z, "headroom": {"base": base, "ceiling": ceiling, "source": str(WORLD_METRICS.relative_to(ROOT))},
               "base_model": {k: first[k] for k in ("base_reward", "base_fidelity", "base_shape")},
               "cells": {c: {"overrides": grid.cells[c], **cells[c]} for c in cells}, "shared": grid.shared,
               "runs": list(records)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    curves = {c: mean_curve([r["curve"] for r in rs]) for c, rs in by_cell.items() if all(r["curve"] for r in rs)}
    if curves:
        save_curves(curves, out / "curves.png")
    captions = first["grid_prompts"]
    strips = out / "cells"
    for c, rs in by_cell.items():
        rows = {"base": load_strip(strips / "base_samples.png", GRID_PROMPTS)}
        rows.update({f"seed {r['seed']}": load_strip(strips / c / f"seed{r['seed']}_samples.png", GRID_PROMPTS)
                     for r in rs})
        save_comparison_grid(rows, captions, out / f"samples_{c}.png")
    (out / "RESULTS.md").write_text(markdown(name, grid, summary, trees, sorted(by_cell)))
    return summary


def markdown(name: str, grid: Grid, s: Mapping[str, Any], trees: Mapping[str, Mapping[str, Any]],
             cells: Sequence[str]) -> str:
    b, hr = s["base_model"], s["headroom"]
    budget = ("updates scaled so that every cell samples as many images as the first (pairs per chain: one per "
              "branch step, ½ for trajectory pairs)") if grid.match_images else \
        "the same learner updates of the same number of pairs"
    lines = [f"# Study `{name}`", "", f"**Claim.** {grid.claim}", "", f"**Verdict: {s['verdict']}** "
             f"(a contrast holds when it is more than {Z:g} s.e. above zero, does not hold when more than {Z:g} s.e. "
             "below, else inconclusive at this s.e.).", "", f"Reproduce: `{s['command']}`", "",
             "## Budget and measurement", "",
             f"Each cell: {budget}; cells are overrides on `configs/default.yaml` (listed below). After each run "
             "its final checkpoint "
             f"and the base model sample the same {s['runs'][0]['n']} held-out prompt × noise-seed pairs "
             "(`learner.evaluate`); every number below is a mean ± s.e. over seeds of the per-run value. Wall time is "
             "the whole run: actor start-up and the in-run evaluations of the curves included.",
             f"Base model on these samples: reward {fmt(b['base_reward'])}, fidelity {fmt(b['base_fidelity'])}, "
             f"shape {fmt(b['base_shape'])}. Headroom: base {hr['base']:.4f} → ideal renders {hr['ceiling']:.4f} "
             f"({hr['source']}); headroom closed = paired gain / (ceiling − base).", "",
             "| cell | seeds | updates × pairs | images | wall s | held-out reward | gain vs base | headroom closed "
             "| win rate vs base | fidelity | shape |", "|" + "---|" * 11]
    for c in cells:
        st = s["cells"][c]
        batch = trees[c]["train"]["batch_size"]
        lines.append(f"| {c} | {st['reward']['n']} | {st['steps']['mean']:.0f} × {batch} | {st['chains']['mean']:.0f} "
                     f"| {st['seconds']['mean']:.0f} | {fmt(st['reward'])} | {fmt(st['gain'])} "
                     f"| {fmt(st.get('headroom_closed'), 3)} | {fmt(st['win_rate'], 3)} | {fmt(st['fidelity'])} "
                     f"| {fmt(st.get('shape'), 3)} |")
    lines += ["", "## Verdict per contrast", ""]
    for c in s["contrasts"]:
        margin = f" − {c['margin']:g}" if c["margin"] else ""
        terms = " ".join(f"{'+' if w > 0 else '−'}{abs(w):g}·{n}" for n, w in c["weights"].items()).lstrip("+")
        lines.append(f"- {c['text']}: {c['metric']} contrast {terms}{margin} = {c['value']:+.4f} ± {c['se']:.4f} "
                     f"→ **{c['verdict']}**")
    lines += ["", "## Curves", "", "![held-out reward vs update and wall time](curves.png)", "",
              "## Samples (rows: base and each seed's final policy; same prompts and noise seeds)", ""]
    lines += [f"`{c}`:\n\n![{c}](samples_{c}.png)\n" for c in cells]
    lines += ["## Cells", "", f"Shared overrides: `{json.dumps(grid.shared)}`", ""]
    lines += [f"- `{c}`: `{json.dumps(grid.cells[c])}`" for c in cells]
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------------------
def run_study(name: str, out: Path, seeds: int | None = None, quick: bool = False, updates: int | None = None,
              command: str = "") -> dict[str, Any]:
    """Run every missing cell × seed of grid ``name`` (Ray started once for all), then write the report."""
    import ray
    from tqdm import tqdm

    from learner.main import start_ray

    grid = GRIDS[name]
    seeds = seeds if seeds is not None else (1 if quick else grid.seeds)
    trees = cell_trees(grid, quick, updates)
    jobs = [(c, k) for c in trees for k in range(seeds)]
    configs = {(c, k): run_config(trees[c], out, c, k) for c, k in jobs}  # every config checked before any run
    todo = [j for j in jobs if not record_path(out, *j).exists()]
    if todo:
        baseline = Baseline.build(configs[jobs[0]], 8 if quick else grid.compare_n)  # the same on every resume
        owns_ray = start_ray(configs[todo[0]])
        try:
            for cell, k in tqdm(todo, desc=f"study {name}", unit="run", position=0):
                run_cell(configs[cell, k], cell, k, baseline, out)
        finally:
            if owns_ray:
                ray.shutdown()
    records = [json.loads(record_path(out, c, k).read_text()) for c, k in jobs]
    return write_report(name, grid, out, records, command, trees)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m learner.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, choices=sorted(GRIDS), help="the claim to test")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the grid's, 3 or 5)")
    parser.add_argument("--quick", action="store_true", help="the grid's first two cells, 1 seed, 2 updates")
    parser.add_argument("--updates", type=int, default=None, help="learner updates (of the first cell)")
    parser.add_argument("--out", default=None, help="default: docs/study/<grid> (runs/study_quick/<grid> with --quick)")
    args = parser.parse_args(argv)
    from learner.checkpoint import CheckpointError
    from learner.loop import LearnerDiedError
    from policy.components import ModelPathError
    from rewards.base import RewardConfigError

    out = Path(args.out or (f"runs/study_quick/{args.grid}" if args.quick else f"docs/study/{args.grid}"))
    command = " ".join(["python -m learner.study", *(argv if argv is not None else sys.argv[1:])])
    try:
        if (args.seeds is not None and args.seeds < 1) or (args.updates is not None and args.updates < 1):
            raise ConfigError(f"--seeds and --updates must be >= 1, got {args.seeds} and {args.updates}")
        summary = run_study(args.grid, out, args.seeds, args.quick, args.updates, command)
    except (ConfigError, ModelPathError, RewardConfigError, CheckpointError, LearnerDiedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # raised inside an actor: one line, as learner.main does; finished runs are kept
        import ray

        if not isinstance(e, ray.exceptions.RayError):
            raise
        print(f"error: {root_cause(e)} (full trace in /tmp/ray/session_latest/logs; rerun to resume)",
              file=sys.stderr)
        return 1
    print(f"\n{args.grid}: verdict {summary['verdict']}; wrote {out / 'RESULTS.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
