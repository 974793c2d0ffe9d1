"""``python -m learner.study --grid NAME``: a grid of experiment cells × seeds that tests one published claim.

Every cell is a set of overrides on ``configs/default.yaml`` (so the grids follow the default as it changes) and
runs through the real system in-process (``learner.main.run``: Ray actors, as the default job). All cells of a
grid train to the same budget: the same learner updates of the same number of pairs, or, for a grid that
compares pair kinds (``match_images``), the same number of images sampled — each cell's updates are scaled by its
pairs per sampled chain (a step-branch chain yields one pair per branch step, a trajectory pair takes two chains).

After each run the final checkpoint is compared with the base model on the same held-out prompts and noise seeds
(``learner.evaluate``): paired gain ± s.e., win rate ± s.e., prompt fidelity and the shape check. Per cell the
study reports these as mean ± s.e. OVER SEEDS. Each contrast the claim makes is judged PAIRED BY SEED (all cells run
the same seeds, so seed effects cancel in per-seed differences) with a Student-t 95 % interval, and only where its
manipulation check shows the runs delivered the treatment (``learner.verdict``: holds, contradicted, no effect
detected with the smallest detectable effect, or not tested). Each run's record keeps what it delivered (reference
checks, updates, pairs; ``delivered``).

Writes ``<out>/RESULTS.md``, ``results.json``, ``curves.png`` (held-out reward vs learner update and vs wall
time, mean ± s.e. band over seeds) and ``samples_<cell>.png`` (base and every seed at fixed noise seeds). A
finished cell × seed (its ``cells/<cell>/seed<k>.json``) is not rerun while its config is the cell's (a digest in
the record; one from an older grid or default is rerun); the runs themselves go to ``<out>/runs/``
(git-ignored: checkpoints are never committed). ``--report-only`` rewrites results.json and RESULTS.md from those
records without running anything (the figures are left as they are); a section of RESULTS.md headed
``## Note added by hand`` is kept across rewrites.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from learner import study_index
from learner.config import Config, ConfigError, build_config, load_yaml
from learner.main import DEFAULT_CONFIG, root_cause
from learner.verdict import (
    ALPHA,
    MIN_SEEDS,
    POWER,
    Check,
    compare_cells,
    decide,
    every_run,
    overall,
    paired_differences,
    percent,
    t_interval,
)

if TYPE_CHECKING:
    from learner.evaluate import Comparison

ROOT = Path(__file__).resolve().parent.parent
WORLD_METRICS = ROOT / "world" / "assets" / "metrics.json"
PILOT = ROOT / "docs" / "study" / "rethinking" / "pilot.json"
DIFFUSION_DPO_BETA = 5000.0  # Diffusion-DPO's β on per-element mean MSEs (Wallace et al. 2024; Rethinking-DPO's too)
# E[λ(t)] of timestep-aware training's draw, Cat(0.9^k) over the world model's 20 sampler steps (tests/test_study.py
# recomputes it from world/model): the β a uniform arm needs to match its average in-sigmoid scale
MEAN_LAMBDA = 1.2953
JUDGE = "world_judge"  # the held-out judge (world/judge.py) every study reports beside the training reward
COMPARE_SEED = 0  # held-out sample i uses noise seed COMPARE_SEED + i in every cell
GRID_PROMPTS = 8
AREA_THIRDS = ("small", "middle", "large")  # the base samples' drawn area, in thirds (``gain_by_area``)
MIN_MOVES = 4  # a stable reference tests "a moving reference" only if it was replaced at least this often
HAND_NOTES = "## Note added by hand"  # RESULTS.md sections kept when the report is rewritten

# What every study run shares: a lighter in-run evaluation (all 18 held-out prompts × 4 seeds; the final
# measurement is the 256-sample comparison) and no TensorBoard files.
STUDY_RUN = {"eval": {"num_prompts": 18, "seeds_per_prompt": 4, "grid_prompts": 0}, "output": {"tensorboard": False}}
# --quick: any grid's first two cells at a tiny budget (the tests run it).
QUICK = {"train": {"steps": 2, "batch_size": 8}, "rollout": {"prompts_per_task": 4},
         "pairs": {"branch_steps": [0, 10]}, "eval": {"num_prompts": 4, "seeds_per_prompt": 1}}
# Grids of trajectory cells keep the default's updates with 32 pairs each: whole chains are sampled ~8× faster than
# step-branch chains (no ranking of children), so the learner sets the pace, and at 32 pairs an update takes ~2 s
# on 2 cores (10-update probes, diffusion_dpo and dense_dpo).
# tailorpo: the positions a step-branch chain ranks (the default's), and the step terms every update trains.
BRANCH_STEPS = tuple(range(0, 20, 2))
STEP_TERMS = 60
# Unguided pairs train at a quarter of the default's lr and with D3PO's ratio clamp ε = 0.1 (the hyper-parameters
# TailorPO says it shares with D3PO; configs/tailorpo_sd15.yaml). At the default's 2e-3 without it, every chain-pair
# run (3 of 3) and one step-pair run (of 6) diverged (log-ratio to the reference in the thousands, held-out reward
# 1.25 → 0.3; records in git at b94a7e1), so the contrast measured which arm diverged; at 5e-4 without it, two of
# six step-pair runs still diverged in their last 20 updates (−0.52, −0.34). A 5e-4 + clamp pilot on one of those
# seeds gained +0.017 without diverging; 2e-3 + clamp diverged.
UNGUIDED = {"train": {"lr": 5.0e-4}, "loss": {"kind": "dpo_logprob", "ratio_clip": 0.1}}
# A δ the stable references reach: the pilot's δ (τ = 1) froze the τ = 4 runs only at update 68-72 in 4 of 6 and
# never in 2, so stable_uniform against uncapped_uniform could not test the cap. Their recorded checks reach
# D = 0.0086-0.0126 by update 24, so at δ = 0.01 the cap acts at about update 24-28, after 5-6 replacements.
TIGHT_DELTA = 0.01


def chain_pairs(positions: tuple[int, ...]) -> dict[str, Any]:
    """Chain pairs trained at every one of ``positions``, as many a batch as keeps STEP_TERMS terms an update."""
    return {"pairs": {"kind": "trajectory"}, "loss": {"chain_steps": positions},
            "train": {"batch_size": STEP_TERMS // len(positions)}}


TRAJECTORY_BUDGET = {"pairs": {"kind": "trajectory"}, "guidance": {"kind": "none"}, "train": {"batch_size": 32}}


@dataclass(frozen=True)
class Contrast:
    """Per seed, Σ_cell weight · (the run's ``metric``) − ``margin``; the claim says its mean is positive. Judged
    only where every check in ``checks`` (of the contrast's cells) says the runs delivered the treatment."""

    text: str
    weights: Mapping[str, float]
    metric: str = "gain"
    margin: float = 0.0
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Grid:
    claim: str
    cells: Mapping[str, Mapping[str, Any]]  # cell -> overrides on ``base_config`` + ``shared``
    contrasts: tuple[Contrast, ...]
    shared: Mapping[str, Any] = field(default_factory=dict)
    seeds: int = MIN_SEEDS
    match_images: bool = False  # scale updates so every cell samples as many chains as the first
    # cell -> (reference, probe): the cell's updates are the probe's, scaled so its latents through the networks
    # match the reference's (both measured by runs of this grid: the cell runs after them)
    match_net_rows: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    compare_n: int = 256
    base_config: Path = DEFAULT_CONFIG  # the config every cell overrides
    world_metrics: Path = WORLD_METRICS  # the model's headroom table (rewards.world_headroom)


# ---- manipulation checks: did the runs deliver the treatment a contrast compares? -----------------------------
def reference_moved(*cells: str) -> Check:
    """A stable reference that froze at its first check is the frozen reference under another name."""
    return every_run(f"the stable reference was replaced ≥ {MIN_MOVES} times in every run of {' and '.join(cells)}",
                     cells, ("ref_replacements",), lambda d: d["ref_replacements"] >= MIN_MOVES)


def trained_earlier(cell: str, than: str) -> Check:
    """γ < 1 (discount_as=sample) must draw earlier denoising steps than γ = 1, or γ changed nothing."""
    return compare_cells(f"{cell} trained earlier denoising steps on average than {than}", "trained_step_mean",
                         (cell, than), lambda a, b: a < b)


def reference_capped(cell: str, action: str = "frozen") -> Check:
    """'The cap matters' compares a capped reference with an uncapped one: the cap must have acted in every run
    (``action``: it froze the reference, or sent it back to the initial model)."""
    return every_run(f"the cap {'froze' if action == 'frozen' else 're-initialised'} the stable reference in every "
                     f"run of {cell}", (cell,), ("ref_checks",), lambda d: d[f"ref_{action}_at"] is not None)


def calibrated_reference(tau: int = 4) -> dict[str, Any]:
    """τ and δ of the committed calibration pilot (docs/study/rethinking/pilot.json), or only τ before it ran."""
    if PILOT.exists():
        for c in json.loads(PILOT.read_text())["calibrations"]:
            if c["tau"] == tau:
                return {"tau": tau, "delta": c["delta"]}
    return {"tau": tau}


def guided(cell: str) -> Check:
    return every_run(f"guidance accepted some steps in every {cell} run", (cell,), ("guidance_accept_rate",),
                     lambda d: d["guidance_accept_rate"] > 0)


def within(share: float) -> Callable[[float, float], bool]:
    """Two cell means equal up to ``share`` of the larger: the budget a contrast holds equal was delivered."""
    return lambda a, b: abs(a - b) <= share * max(a, b)


def same_terms(cell: str) -> Check:
    return compare_cells(f"step_branch and {cell} trained the same step terms (within 5 %)", "trained_step_terms",
                         ("step_branch", cell), within(0.05))


def same_passes(cell: str, other: str = "step_branch") -> Check:
    return compare_cells(f"{other} and {cell} sent the same latents through the networks (within 10 %)",
                         "net_rows", (other, cell), within(0.1))


def trained(cell: str) -> Check:
    return every_run("every run made all its learner updates, none skipped as non-finite", (cell,),
                     ("updates_planned", "nonfinite_skipped"),
                     lambda d: d["optimizer_updates"] == d["updates_planned"] and d["nonfinite_skipped"] == 0)


def merge(*trees: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts merged left to right (later values win; dicts merge key by key)."""
    out: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) \
                else value
    return out


# The grids: data, in one place. β per loss: dpo_logprob on summed log-probs follows the default (β = 0.1);
# diffusion_dpo's ε-MSE surrogate is a per-element MEAN, orders of magnitude smaller than a summed log-ratio, so it
# takes the Diffusion-DPO paper's β = 5000 (Wallace et al. 2024, SD-1.5 setting, also a per-element mean);
# dense_dpo has no β: C = 10 and κ = 1e-4 of the dense-reward paper, whose κ is on per-element MEAN log-probs.
# 10-update probes (trajectory pairs, 16 a batch): diffusion_dpo at β = 5000 takes the loss from 0.69 to 0.35 and
# the held-out reward up 5.6 s.e.; dense_dpo's clip holds its logit under 2Cκ = 2e-3 (loss stays 0.693) and its
# gradient norm falls 30× as log-ratios leave [−κ, κ] (the paper's trust region), +1.8 s.e. in 10 updates.
GRIDS: dict[str, Grid] = {
    "tailorpo": Grid(
        claim="TailorPO: step-level pairs (two children of one x_t ranked by their x̂_0, the winner continues) beat "
              "whole-chain pairs (D3PO) for the same loss, at equal optimizer updates and trained step terms, and "
              "at equal network passes.",
        # guidance off: it needs step pairs, and the claim is about the pairs alone. Every update trains 60 step
        # terms: 60 step pairs, or 6 chain pairs at the ten branch positions, or 3 at all 20 (D3PO).
        shared=merge(UNGUIDED, {"guidance": {"kind": "none"}, "pairs": {"branch_steps": BRANCH_STEPS},
                                "train": {"batch_size": STEP_TERMS}}),
        cells={"step_branch": {"pairs": {"kind": "step_branch"}},
               "chain_branch_steps": chain_pairs(BRANCH_STEPS),
               "chain_all_steps": chain_pairs(tuple(range(20))),
               "chain_all_steps_calls": chain_pairs(tuple(range(20)))},
        contrasts=(Contrast("step pairs beat chain pairs trained at the same positions (equal updates and terms)",
                            {"step_branch": 1, "chain_branch_steps": -1},
                            checks=(trained("step_branch"), trained("chain_branch_steps"),
                                    same_terms("chain_branch_steps"))),
                   Contrast("step pairs beat D3PO's all-step chain pairs (equal updates and terms)",
                            {"step_branch": 1, "chain_all_steps": -1},
                            checks=(trained("step_branch"), trained("chain_all_steps"), same_terms("chain_all_steps"))),
                   Contrast("step pairs beat D3PO's all-step chain pairs at equal network passes",
                            {"step_branch": 1, "chain_all_steps_calls": -1},
                            checks=(trained("step_branch"), trained("chain_all_steps_calls"),
                                    same_passes("chain_all_steps_calls")))),
        match_net_rows={"chain_all_steps_calls": ("step_branch", "chain_all_steps")}),
    "tailorpo_g": Grid(
        claim="TailorPO-G: a reward-gradient step on each step pair's winner adds reward over TailorPO, at equal "
              "images and at equal network passes (guidance costs a decode and a backward pass a branch step).",
        # η: the paper's cosine 0.1 → 0.2 (a ~0.03 step against ~10 of sampling noise here), 2, and 20 (the
        # default's, docs/alignment_diagnosis.md); tailorpo_calls is TailorPO given η = 20's network passes. The lr is
        # the unguided one, so that the TailorPO arm does not diverge (see UNGUIDED).
        shared=merge(UNGUIDED, {"pairs": {"kind": "step_branch"}}),
        cells={"tailorpo": {"guidance": {"kind": "none"}},
               "eta_paper": {"guidance": {"kind": "reward_gradient", "eta_lo": 0.1, "eta_hi": 0.2}},
               "eta2": {"guidance": {"kind": "reward_gradient", "eta_lo": 2.0, "eta_hi": 2.0}},
               "eta20": {"guidance": {"kind": "reward_gradient", "eta_lo": 20.0, "eta_hi": 20.0}},
               "tailorpo_calls": {"guidance": {"kind": "none"}}},
        contrasts=(*(Contrast(f"guidance at {cell} adds reward over TailorPO at equal images",
                              {cell: 1, "tailorpo": -1}, checks=(trained(cell), trained("tailorpo"), guided(cell)))
                     for cell in ("eta_paper", "eta2", "eta20")),
                   Contrast("guidance at eta20 adds reward over TailorPO at equal network passes",
                            {"eta20": 1, "tailorpo_calls": -1},
                            checks=(trained("eta20"), guided("eta20"), same_passes("eta20", "tailorpo_calls")))),
        match_net_rows={"tailorpo_calls": ("eta20", "tailorpo")}),
    "dense": Grid(
        claim="Dense-reward DPO: discounting later denoising steps (γ < 1) beats the undiscounted objective (γ = 1).",
        shared={**TRAJECTORY_BUDGET, "sampler": {"logprob_reduce": "mean"},
                "loss": {"kind": "dense_dpo", "scale_c": 10.0, "kappa": 1.0e-4, "num_step_samples": 3},
                "time_weight": {"mode": "discount", "discount_as": "sample"}},
        cells={"gamma1": {"time_weight": {"gamma": 1.0}}, "gamma0.9": {"time_weight": {"gamma": 0.9}},
               "gamma0.7": {"time_weight": {"gamma": 0.7}}},
        contrasts=(Contrast("γ = 0.9 beats γ = 1", {"gamma0.9": 1, "gamma1": -1},
                            checks=(trained_earlier("gamma0.9", "gamma1"),)),
                   Contrast("γ = 0.7 beats γ = 1", {"gamma0.7": 1, "gamma1": -1},
                            checks=(trained_earlier("gamma0.7", "gamma1"),)))),
    "comparator": Grid(
        claim="Each preference method beats the papers' policy-gradient comparator (DDPO-style PPO with GRPO's "
              "group-normalised advantages) for the same number of images sampled.",
        # the comparator first: every other cell gets its images. Trajectory cells train on the same records at the
        # same updates; step-branch cells draw ten pairs from a chain, so they make 20x the updates (of 64 pairs).
        # 15 trajectory updates (960 chains a run): at 30, tailorpo_g's 300 guided updates would take ~8 CPU minutes
        # a run (4x the default's 75), and the grid would not fit the session it had to run in.
        shared={"train": {"steps": 15}},
        cells={"ppo": {**TRAJECTORY_BUDGET, "loss": {"kind": "ppo", "clip_range": 0.2, "num_step_samples": 3},
                       "sampler": {"logprob_reduce": "mean"}},
               "d3po": {**TRAJECTORY_BUDGET, "loss": {"kind": "dpo_logprob"}},
               "dense": {**TRAJECTORY_BUDGET, "sampler": {"logprob_reduce": "mean"},
                         "loss": {"kind": "dense_dpo", "scale_c": 10.0, "kappa": 1.0e-4, "num_step_samples": 3},
                         "time_weight": {"mode": "discount", "gamma": 0.9}},
               "diffusion_dpo": {**TRAJECTORY_BUDGET, "loss": {"kind": "diffusion_dpo", "beta": DIFFUSION_DPO_BETA}},
               "tailorpo_g": {}},
        contrasts=tuple(Contrast(f"{cell} beats ppo", {cell: 1, "ppo": -1}, checks=(trained(cell), trained("ppo")))
                        for cell in ("d3po", "dense", "diffusion_dpo", "tailorpo_g")),
        match_images=True),
    "rethinking": Grid(
        claim="Rethinking-DPO on Diffusion-DPO: a stable reference (replaced every τ updates while its divergence from "
              "the initial model stays under δ) beats a frozen one, its cap matters (and freezing at the cap beats "
              "going back to the initial model there), and timestep-aware training adds on top of it, beyond the "
              "larger average β its λ(t) gives.",
        # τ and δ from the committed calibration pilot (python -m learner.reference_pilot), so the stable cells are
        # replaced >= 4 times before they freeze; every arm draws t over the same grid (the sampler's 20 steps).
        shared={**TRAJECTORY_BUDGET, "loss": {"kind": "diffusion_dpo", "beta": DIFFUSION_DPO_BETA},
                "reference": calibrated_reference(), "time_weight": {"grid": "inference", "gamma": 0.9}},
        cells={"frozen_uniform": {"reference": {"strategy": "frozen"}, "time_weight": {"mode": "uniform"}},
               "stable_uniform": {"reference": {"strategy": "stable_update"}, "time_weight": {"mode": "uniform"}},
               "uncapped_uniform": {"reference": {"strategy": "stable_update", "delta": 1e9},
                                    "time_weight": {"mode": "uniform"}},
               "stable_timestep": {"reference": {"strategy": "stable_update"},
                                   "time_weight": {"mode": "timestep_aware"}},
               "stable_cat": {"reference": {"strategy": "stable_update"},
                              "time_weight": {"mode": "discount", "discount_as": "sample"}},
               "stable_beta_lambda": {"reference": {"strategy": "stable_update"}, "time_weight": {"mode": "uniform"},
                                      "loss": {"beta": DIFFUSION_DPO_BETA * MEAN_LAMBDA}},
               "capped_tight": {"reference": {"strategy": "stable_update", "delta": TIGHT_DELTA},
                                "time_weight": {"mode": "uniform"}},
               "reinit_tight": {"reference": {"strategy": "stable_update", "delta": TIGHT_DELTA, "past_cap": "reinit"},
                                "time_weight": {"mode": "uniform"}}},
        contrasts=(
            Contrast("the stable reference beats the frozen one", {"stable_uniform": 1, "frozen_uniform": -1},
                     checks=(reference_moved("stable_uniform"),)),
            Contrast("timestep-aware training adds on top of the stable reference",
                     {"stable_timestep": 1, "stable_uniform": -1},
                     checks=(reference_moved("stable_timestep", "stable_uniform"),)),
            Contrast("λ(t) adds beyond its larger average β", {"stable_timestep": 1, "stable_beta_lambda": -1},
                     checks=(reference_moved("stable_timestep", "stable_beta_lambda"),)),
            Contrast("the Cat(γ^k) draw alone adds on top of the stable reference",
                     {"stable_cat": 1, "stable_uniform": -1},
                     checks=(reference_moved("stable_cat", "stable_uniform"),)),
            Contrast("the cap matters, at a δ the runs reach: the tightly capped reference beats the uncapped one",
                     {"capped_tight": 1, "uncapped_uniform": -1},
                     checks=(reference_moved("capped_tight"), reference_capped("capped_tight"))),
            Contrast("freezing at the cap beats re-initialising there (the paper's Table 3)",
                     {"capped_tight": 1, "reinit_tight": -1},
                     checks=(reference_moved("capped_tight", "reinit_tight"), reference_capped("capped_tight"),
                             reference_capped("reinit_tight", "reinit"))))),
    "default": Grid(
        claim="The shipped default (configs/default.yaml) raises the held-out reward and closes at least half of "
              "the headroom between the base model and the ideal renders.",
        cells={"default": {}},
        contrasts=(Contrast("the default raises the held-out reward", {"default": 1}, checks=(trained("default"),)),
                   Contrast("the default closes at least half of the headroom", {"default": 1},
                            metric="headroom_closed", margin=0.5, checks=(trained("default"),)))),
    "flow_default": Grid(
        claim="The flow default (configs/flow_default.yaml: the embedded flow world, world/flow_model, sampled by "
              "the flow SDE) raises the held-out reward and closes at least half of its headroom.",
        cells={"flow_default": {}},
        contrasts=(Contrast("the flow default raises the held-out reward", {"flow_default": 1},
                            checks=(trained("flow_default"),)),
                   Contrast("the flow default closes at least half of the headroom", {"flow_default": 1},
                            metric="headroom_closed", margin=0.5, checks=(trained("flow_default"),))),
        base_config=ROOT / "configs" / "flow_default.yaml",
        world_metrics=ROOT / "world" / "assets" / "flow_metrics.json"),
}


# ---- configs --------------------------------------------------------------------------------------------------
def pairs_per_chain(cfg: Config) -> float:
    """Preference pairs one sampled chain yields: one per branch step, or half a pair (two chains a pair)."""
    return float(len(cfg.pairs.branch_steps)) if cfg.pairs.kind == "step_branch" else 0.5


def cell_trees(grid: Grid, quick: bool = False, updates: int | None = None, out: Path | None = None
               ) -> dict[str, dict[str, Any]]:
    """Each cell's config tree without seed and output dir: default.yaml + study + shared + cell (+ quick), its
    updates set (``updates``, or scaled to the first cell's images with ``match_images``, or to another cell's
    network passes with ``match_net_rows``, read from the finished records under ``out``: a cell whose records
    are not there yet is left out) and an eval every ~1/5 of the run so a curve exists."""
    default = load_yaml(grid.base_config)
    cells = dict(list(grid.cells.items())[:2]) if quick else dict(grid.cells)
    trees = {c: merge(default, STUDY_RUN, grid.shared, o, QUICK if quick else {}) for c, o in cells.items()}
    if updates is not None:
        trees = {c: merge(t, {"train": {"steps": updates}}) for c, t in trees.items()}
    ref = build_config(next(iter(trees.values())))
    for cell, tree in trees.items():
        cfg = build_config(tree)
        steps = cfg.train.steps
        if grid.match_images:
            chains = ref.train.steps * ref.train.batch_size / pairs_per_chain(ref)  # the first cell's images
            steps = max(1, round(chains * pairs_per_chain(cfg) / cfg.train.batch_size))
        trees[cell] = merge(tree, {"train": {"steps": steps}, "eval": {"every": math.ceil(steps / 5)}})
    for cell, (reference, probe) in grid.match_net_rows.items():
        rows = {c: [delivered(r)["net_rows"] for r in finished_records(out, c)] if out else []
                for c in (reference, probe)}
        if cell not in trees or not all(rows.values()) or None in rows[reference] + rows[probe]:
            trees.pop(cell, None)
            continue
        steps = max(1, round(build_config(trees[probe]).train.steps * np.mean(rows[reference]) / np.mean(rows[probe])))
        trees[cell] = merge(trees[cell], {"train": {"steps": steps}, "eval": {"every": math.ceil(steps / 5)}})
    return trees


def run_config(tree: Mapping[str, Any], out: Path, cell: str, seed: int) -> Config:
    return build_config(merge(tree, {"train": {"seed": seed}, "output": {"dir": str(run_dir(out, cell, seed))}}))


def config_digest(cfg: Config) -> str:
    """What a finished record was trained with (its output folder and null options aside): a record whose digest
    differs from the cell's config today is from an older grid, and is rerun rather than mixed in."""
    tree = cfg.model_dump(mode="json")
    tree["output"].pop("dir")
    return hashlib.sha256(json.dumps(without_nulls(tree), sort_keys=True).encode()).hexdigest()[:16]


def without_nulls(tree: Any) -> Any:
    """``tree`` without its null options: an option added later, off (null) by default, leaves what ran the same,
    so it must not turn the records of the runs before it into strangers."""
    if isinstance(tree, dict):
        return {k: without_nulls(v) for k, v in tree.items() if v is not None}
    return tree


def finished(out: Path, cell: str, seed: int, cfg: Config) -> bool:
    path = record_path(out, cell, seed)
    return path.exists() and json.loads(path.read_text()).get("config_digest") == config_digest(cfg)


def run_dir(out: Path, cell: str, seed: int) -> Path:
    return out / "runs" / cell / f"seed{seed}"


def record_path(out: Path, cell: str, seed: int) -> Path:
    return out / "cells" / cell / f"seed{seed}.json"


def finished_records(out: Path, cell: str) -> list[dict[str, Any]]:
    """The records of ``cell``'s finished runs under ``out``, in seed order."""
    paths = sorted((out / "cells" / cell).glob("seed*.json"), key=lambda p: int(p.stem.removeprefix("seed")))
    return [json.loads(p.read_text()) for p in paths]


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
    headroom: tuple[float, float]  # (base, ceiling) of the world reward on held-out prompts

    @classmethod
    def build(cls, cfg: Config, n: int, world_metrics: Path = WORLD_METRICS) -> Baseline:
        from learner.evaluate import build_rewards, load_policy
        from learner.prompts import load_prompts

        unique = load_prompts(cfg.data.eval_prompts)
        prompts = [unique[i % len(unique)] for i in range(n)]
        rewards, main = build_rewards(cfg, ["world_fidelity", JUDGE], prompts)
        return cls(cfg, prompts, [COMPARE_SEED + i for i in range(n)], load_policy("base", cfg)[0], rewards, main,
                   headroom(world_metrics))


def headroom(world_metrics: Path = WORLD_METRICS) -> tuple[float, float]:
    """(base, ceiling) held-out ``world`` reward measured for an embedded world model (rewards.world_headroom)."""
    rows = json.loads(world_metrics.read_text())["rows"]
    return rows["base model, held-out"]["world"]["mean"], rows["ideal (ceiling), held-out"]["world"]["mean"]


def judged(scores: Mapping[str, Any]) -> dict[str, Any]:
    """A record's held-out-judge fields from the comparison's ``world_judge`` scores."""
    return {"judge": scores["B"], "judge_gain": scores["B-A"], "base_judge": scores["A"]}


def gain_by_area(result: Comparison) -> dict[str, Any]:
    """Every score's mean paired B − A within thirds of the base samples' drawn area (the mask of the prompt's
    colour, ``rewards.world``): whether a gain comes from drawing bigger, which the preference term pays for, or
    from drawing what the prompt asks, and for which samples. The base samples are the same in every cell, so
    the thirds are too."""
    from rewards.world import WorldReward

    area = WorldReward().mask_stats(result.images["A"], result.prompts)[0].double()
    edges = torch.quantile(area, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    third = torch.bucketize(area, edges)  # 0: area <= edges[0], 1: <= edges[1], 2: above
    a, b = result.scores["A"], result.scores["B"]
    return {"area_edges": edges.tolist(), "n": [int((third == k).sum()) for k in range(len(AREA_THIRDS))],
            "B-A": {name: [float((b[name] - a[name]).double()[third == k].mean()) for k in range(len(AREA_THIRDS))]
                    for name in a}}


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
    base, ceiling = baseline.headroom
    record = {
        "cell": cell, "seed": seed, "config_digest": config_digest(cfg), "steps": summary["steps"],
        "batch_size": cfg.train.batch_size,
        "chains": summary["chains"], "seconds": summary["seconds"], "n": stats["n"],
        "reward": main["B"], "base_reward": main["A"], "gain": main["B-A"], "win_rate": stats["win_rate"],
        "headroom_closed": main["B-A"]["mean"] / (ceiling - base) if baseline.main == "world" else None,
        "fidelity": stats["rewards"]["world_fidelity"]["B"], "shape": stats["rewards"].get("world_shape", {}).get("B"),
        **judged(stats["rewards"][JUDGE]), "base_fidelity": stats["rewards"]["world_fidelity"]["A"],
        "base_shape": stats["rewards"].get("world_shape", {}).get("A"),
        "curve": eval_curve(Path(cfg.output.dir) / "metrics.jsonl"), "grid_prompts": baseline.prompts[:GRID_PROMPTS],
        "delivered": delivered_by_run(Path(cfg.output.dir), summary, cfg), "by_area": gain_by_area(result),
    }
    path = record_path(out, cell, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_strip(result.images["B"][:GRID_PROMPTS], path.with_name(f"seed{seed}_samples.png"))
    if not (out / "cells" / "base_samples.png").exists():
        save_strip(result.images["A"][:GRID_PROMPTS], out / "cells" / "base_samples.png")
    path.write_text(json.dumps(record, indent=1))  # last: its existence marks the cell × seed finished
    return record


def metric_rows(metrics: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def eval_curve(metrics: Path) -> list[list[float]]:
    """[update, seconds since the first evaluation, held-out mean, s.e.] of every ``eval`` row of a run."""
    rows = [r for r in metric_rows(metrics) if r["metrics"].get("eval/heldout_reward_mean") is not None]
    t0 = rows[0]["time"] if rows else 0.0
    return [[r["step"], r["time"] - t0, r["metrics"]["eval/heldout_reward_mean"],
             r["metrics"].get("eval/heldout_reward_sem") or math.nan] for r in rows]


# What a run delivered of its treatment, as far as its outputs expose it (None where a record predates a field).
DELIVERED = ("updates_planned", "nonfinite_skipped", "pairs_trained", "ref_checks", "guidance_accept_rate",
             "guidance_shift", "guidance_logp_deficit", "trained_step_mean", "trained_step_terms", "net_rows_actors",
             "net_rows_learner")


def delivered_by_run(run: Path, summary: Mapping[str, Any], cfg: Config) -> dict[str, Any]:
    """The record's ``delivered`` fields, from the run's summary.json counts and metrics.jsonl: every reference
    check as [update, D, "replaced" | "frozen" | "reinit"] (none for a frozen reference), the pairs and step terms
    of applied updates, the mean grid position of the trained steps, and the latents through the actors' and the
    learner's networks (the compute the contrasts' "equal UNet calls" compares)."""
    train = [(r["step"], r["metrics"]) for r in metric_rows(run / "metrics.jsonl")
             if r["metrics"].get("train/pairs") is not None]
    applied = [(step, m) for step, m in train if not m.get("train/skipped_nonfinite")]
    return {**dict.fromkeys(DELIVERED), "updates_planned": cfg.train.steps,
            "nonfinite_skipped": summary["nonfinite_skipped"],
            **{k: summary.get(k) for k in ("guidance_accept_rate", "guidance_shift", "guidance_logp_deficit")},
            "pairs_trained": int(sum(m["train/pairs"] for _, m in applied)),
            "trained_step_terms": int(sum(m["train/pairs"] * m["train/step_terms"] for _, m in applied)),
            "trained_step_mean": (sum(m["train/pairs"] * m["train/trained_step"] for _, m in applied)
                                  / max(1, sum(m["train/pairs"] for _, m in applied))),
            "net_rows_actors": summary["net_rows"]["actors"], "net_rows_learner": summary["net_rows"]["learner"],
            "ref_checks": [[step, m["train/ref_divergence"], "replaced" if m.get("train/ref_replaced") else
                            "reinit" if m.get("train/ref_reinit") else "frozen"]
                           for step, m in applied if "train/ref_divergence" in m]}


def delivered(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the manipulation checks and the report read of a run: its ``delivered`` fields (all None in records
    from before they were kept), its counts, and the reference replacements and freeze update from its checks."""
    d = {**dict.fromkeys(DELIVERED), **record.get("delivered", {}),
         "optimizer_updates": record["steps"], "chains": record["chains"], "wall_seconds": record["seconds"]}
    d["net_rows"] = None if d["net_rows_actors"] is None else d["net_rows_actors"] + d["net_rows_learner"]
    checks = d["ref_checks"]
    d["ref_replacements"] = None if checks is None else sum(action == "replaced" for _, _, action in checks)
    for action in ("frozen", "reinit"):  # the update at which the cap first acted, as the run's config says
        d[f"ref_{action}_at"] = None if checks is None else next((u for u, _, a in checks if a == action), None)
    return d


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


def run_value(record: Mapping[str, Any], metric: str) -> float | None:
    """A run's value of ``metric``: its mean for the paired comparisons with the base model, else the number."""
    v = record.get(metric)
    return v["mean"] if isinstance(v, Mapping) else v


def evaluate_contrast(c: Contrast, by_cell: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The contrast over the seeds its cells share (per-seed differences, so shared seed effects cancel), its
    Student-t interval and MDE, its manipulation checks on those seeds' runs, and the verdict."""
    values = {cell: {r["seed"]: v for r in by_cell[cell] if (v := run_value(r, c.metric)) is not None}
              for cell in c.weights}
    diffs = paired_differences(values, c.weights, c.margin)
    interval = t_interval(list(diffs.values()))
    runs = {cell: [delivered(r) for r in rs if r["seed"] in diffs] for cell, rs in by_cell.items()}
    checks = [(k.text, None if (ok := k.test(runs)) is None else bool(ok)) for k in c.checks]
    verdict, reason = decide(interval, checks)
    judge = None
    if c.metric == "gain":  # the same contrast under the held-out judge: reported beside it, not judged
        judge_values = {cell: {r["seed"]: v for r in by_cell[cell] if (v := run_value(r, "judge_gain")) is not None}
                        for cell in c.weights}
        judge_diffs = paired_differences(judge_values, c.weights)
        judge = t_interval(list(judge_diffs.values())) if judge_diffs else None
    return {"text": c.text, "metric": c.metric, "weights": dict(c.weights), "margin": c.margin,
            "seeds": list(diffs), "differences": list(diffs.values()), **interval,
            "checks": [{"text": text, "passed": ok} for text, ok in checks], "verdict": verdict, "reason": reason,
            "judge": judge}


METRICS = ("reward", "gain", "headroom_closed", "win_rate", "fidelity", "shape", "judge", "judge_gain", "seconds",
           "chains", "steps")


def cell_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric, mean ± s.e. over the cell's seeds of each run's value (a run's mean for the comparisons)."""
    out = {}
    for m in METRICS:
        values = [v for r in records if (v := run_value(r, m)) is not None]
        if values:
            out[m] = over_seeds(values)
    return out


DELIVERED_MEANS = ("optimizer_updates", "trained_step_terms", "net_rows", "ref_replacements", "guidance_accept_rate",
                   "guidance_shift", "guidance_logp_deficit")


def delivered_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean ± s.e. over the cell's seeds of each delivered count or rate that every run recorded: what the write-ups
    quote of a treatment (RESULTS.md lists each seed's)."""
    ds = [delivered(r) for r in records]
    return {k: over_seeds([d[k] for d in ds]) for k in DELIVERED_MEANS if all(d[k] is not None for d in ds)}


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


def num(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else f"{x:{spec}}"


STATISTICS = {"contrasts": "paired by seed", "interval": f"Student-t, {percent(1 - ALPHA)}", "alpha": ALPHA,
              "power": POWER, "min_seeds": MIN_SEEDS, "source": "learner/verdict.py"}


def write_report(name: str, grid: Grid, out: Path, records: Sequence[Mapping[str, Any]], command: str,
                 figures: bool = True) -> dict[str, Any]:
    """results.json and RESULTS.md (its hand-written notes kept) from the records; with ``figures`` also the
    curves and the sample grids."""
    by_cell = {c: sorted((r for r in records if r["cell"] == c), key=lambda r: r["seed"]) for c in grid.cells}
    by_cell = {c: rs for c, rs in by_cell.items() if rs}
    cells = {c: {**cell_stats(rs), "by_area": area_stats(rs), "delivered": delivered_stats(rs)}
             for c, rs in by_cell.items()}
    contrasts = [evaluate_contrast(c, by_cell) for c in grid.contrasts if all(n in by_cell for n in c.weights)]
    result = overall([c["verdict"] for c in contrasts]) if len(contrasts) == len(grid.contrasts) else "incomplete"
    base, ceiling = headroom(grid.world_metrics)
    first = records[0]
    summary = {"grid": name, "claim": grid.claim, "command": command, "verdict": result, "contrasts": contrasts,
               "statistics": STATISTICS,
               "headroom": {"base": base, "ceiling": ceiling, "source": str(grid.world_metrics.relative_to(ROOT))},
               "base_model": {k: first[k] for k in ("base_reward", "base_fidelity", "base_shape")},
               "cells": {c: {"overrides": grid.cells[c], **cells[c]} for c in cells}, "shared": grid.shared,
               "runs": list(records)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    if out.resolve().parent == study_index.STUDIES:  # a committed study: its row in docs/study/README.md
        study_index.write()
    if figures:
        save_figures(out, by_cell, first["grid_prompts"])
    report = out / "RESULTS.md"
    notes = hand_notes(report.read_text()) if report.exists() else ""
    report.write_text(markdown(name, grid, summary, sorted(by_cell)) + notes)
    return summary


def save_figures(out: Path, by_cell: Mapping[str, Sequence[Mapping[str, Any]]], captions: Sequence[str]) -> None:
    """curves.png (cells whose every run has a curve) and each cell's samples_<cell>.png."""
    from learner.plots import save_comparison_grid

    curves = {c: mean_curve([r["curve"] for r in rs]) for c, rs in by_cell.items() if all(r["curve"] for r in rs)}
    if curves:
        save_curves(curves, out / "curves.png")
    strips = out / "cells"
    for c, rs in by_cell.items():
        rows = {"base": load_strip(strips / "base_samples.png", GRID_PROMPTS)}
        rows.update({f"seed {r['seed']}": load_strip(strips / c / f"seed{r['seed']}_samples.png", GRID_PROMPTS)
                     for r in rs})
        save_comparison_grid(rows, list(captions), out / f"samples_{c}.png")


def hand_notes(text: str) -> str:
    """The hand-written end of a RESULTS.md (from its first ``## Note added by hand`` on), or nothing."""
    i = text.find(HAND_NOTES)
    return "" if i < 0 else "\n" + text[i:]


def contrast_rows(contrasts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The verdict table: one row per contrast (per-seed differences, interval, MDE, checks, verdict)."""
    rows = [f"| contrast | paired seeds | mean | {percent(1 - ALPHA)} CI | MDE ({percent(POWER)} power) "
            f"| manipulation check | verdict | held-out judge: mean, {percent(1 - ALPHA)} CI |", "|" + "---|" * 8]
    for c in contrasts:
        margin = f" − {c['margin']:g}" if c["margin"] else ""
        terms = " ".join(f"{'+' if w > 0 else '−'}{abs(w):g}·{n}" for n, w in c["weights"].items()).lstrip("+")
        ci = "–" if c["ci"] is None else f"[{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]"
        checks = "; ".join(f"{k['text']}: {({True: 'passed', False: 'FAILED'}).get(k['passed'], 'no data')}"
                           for k in c["checks"]) or "–"
        verdict = f"**{c['verdict']}**" + (f" ({c['reason']})" if c["verdict"] == "not tested" else "")
        judge = c.get("judge")
        judged = "–" if not judge or judge["ci"] is None else \
            f"{judge['mean']:+.4f} [{judge['ci'][0]:+.4f}, {judge['ci'][1]:+.4f}]"
        rows.append(f"| {c['text']} (`{c['metric']}` {terms}{margin}) | {c['n']} | {num(c['mean'], '+.4f')} | {ci} "
                    f"| {num(c['mde'])} | {checks} | {verdict} | {judged} |")
    return rows


def delivered_rows(runs: Sequence[Mapping[str, Any]], cells: Sequence[str]) -> list[str]:
    """Per cell, what each seed's run delivered (values in seed order; – where the run did not record it)."""

    def reference(d: Mapping[str, Any]) -> str:
        if d["ref_replacements"] is None:
            return "–"
        return f"{d['ref_replacements']}" + (f" (froze at {d['ref_frozen_at']})" if d["ref_frozen_at"] else "")

    columns = {"updates (of planned)": lambda d: f"{d['optimizer_updates']} ({num(d['updates_planned'], 'd')})",
               "non-finite skipped": lambda d: num(d["nonfinite_skipped"], "d"),
               "pairs trained": lambda d: num(d["pairs_trained"], "d"),
               "reference replacements": reference,
               "guidance accept rate": lambda d: num(d["guidance_accept_rate"], ".2f"),
               "guided move ‖Δ‖/(σ√D)": lambda d: num(d["guidance_shift"], ".3f"),
               "guided log π deficit": lambda d: num(d["guidance_logp_deficit"], ".3f"),
               "mean trained step": lambda d: num(d["trained_step_mean"], ".1f"),
               "step terms trained": lambda d: num(d["trained_step_terms"], "d"),
               "network passes, actors + learner": lambda d: (
                   "–" if d["net_rows_actors"] is None else f"{d['net_rows_actors'] + d['net_rows_learner']:,}")}
    rows = ["| cell | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for c in cells:
        ds = [delivered(r) for r in sorted((r for r in runs if r["cell"] == c), key=lambda r: r["seed"])]
        rows.append(f"| {c} | " + " | ".join(" / ".join(f(d) for d in ds) for f in columns.values()) + " |")
    return rows


def area_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per score, each third's paired gain as mean ± s.e. over the cell's seeds, with the thirds' area bounds; None
    when a run predates ``by_area``."""
    if not records or not all("by_area" in r for r in records):
        return None
    areas = [r["by_area"] for r in records]
    return {"area_edges": areas[0]["area_edges"],
            "B-A": {name: [over_seeds([a["B-A"][name][k] for a in areas]) for k in range(len(AREA_THIRDS))]
                    for name in areas[0]["B-A"]}}


def area_rows(cells: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The gains-by-drawn-area table from the cells' ``by_area`` statistics (cells without them are left out)."""
    kept = {c: st["by_area"] for c, st in cells.items() if st.get("by_area")}
    if not kept:
        return ["No run of this grid recorded its gains by drawn area yet (`--rejudge` adds them)."]
    edges = next(iter(kept.values()))["area_edges"]
    bounds = (f"≤ {edges[0]:.3f}", f"{edges[0]:.3f}–{edges[1]:.3f}", f"> {edges[1]:.3f}")
    rows = ["| cell | score | " + " | ".join(f"{t} ({b})" for t, b in zip(AREA_THIRDS, bounds, strict=True)) + " |",
            "|" + "---|" * (2 + len(AREA_THIRDS))]
    for c, areas in kept.items():
        rows += [f"| {c} | {name} | " + " | ".join(fmt(t) for t in thirds) + " |"
                 for name, thirds in areas["B-A"].items()]
    return rows


def reproduce(command: str, name: str) -> str:
    """The command without an ``--out`` that names the grid's default folder (an absolute path of one machine)."""
    return re.sub(rf" --out \S*docs/study/{re.escape(name)}/?(?=\s|$)", "", command)


def markdown(name: str, grid: Grid, s: Mapping[str, Any], cells: Sequence[str]) -> str:
    b, hr = s["base_model"], s["headroom"]
    budget = ("updates scaled so that every cell samples as many images as the first (pairs per chain: one per "
              "branch step, ½ for trajectory pairs)") if grid.match_images else \
        "the same learner updates of the same number of pairs"
    lines = [f"# Study `{name}`", "", f"**Claim.** {grid.claim}", "", f"**Verdict: {s['verdict']}**. Each contrast "
             "is paired by seed (every cell runs the same seeds, so a seed's luck cancels in the per-seed "
             f"difference) and judged on its {percent(1 - ALPHA)} Student-t interval: **holds** when the interval "
             "excludes 0 in the claimed direction, **contradicted** when it excludes 0 in the other, **no effect "
             f"detected** when it includes 0 (MDE: the smallest effect the design detects with {percent(POWER)} "
             f"power), **not tested** with fewer than {MIN_SEEDS} paired seeds or when a manipulation check says the "
             "runs did not deliver the treatment, or cannot say (`learner/verdict.py`).", "",
             f"Reproduce: `{reproduce(s['command'], name)}`", "",
             "## Budget and measurement", "",
             f"Each cell: {budget}; cells are overrides on `{grid.base_config.relative_to(ROOT)}` (listed below). "
             f"After each run its final checkpoint and the base model sample the same {s['runs'][0]['n']} held-out "
             "prompt × noise-seed pairs "
             "(`learner.evaluate`); every number below is a mean ± s.e. over seeds of the per-run value. Wall time is "
             "the whole run: actor start-up and the in-run evaluations of the curves included.",
             f"Base model on these samples: reward {fmt(b['base_reward'])}, fidelity {fmt(b['base_fidelity'])}, "
             f"shape {fmt(b['base_shape'])}. Headroom: base {hr['base']:.4f} → ideal renders {hr['ceiling']:.4f} "
             f"({hr['source']}); headroom closed = paired gain / (ceiling − base).", "",
             f"The held-out judge (`{JUDGE}`, world/judge.py: a CNN trained on renders only, sharing no code with "
             "the training reward) scores the same samples; its gain is reported beside every reward gain.", "",
             "| cell | seeds | updates × pairs | images | wall s | held-out reward | gain vs base | headroom closed "
             "| win rate vs base | fidelity | shape | judge gain |", "|" + "---|" * 12]
    for c in cells:
        st = s["cells"][c]
        batch = next(r["batch_size"] for r in s["runs"] if r["cell"] == c)
        lines.append(f"| {c} | {st['reward']['n']} | {st['steps']['mean']:.0f} × {batch} | {st['chains']['mean']:.0f} "
                     f"| {st['seconds']['mean']:.0f} | {fmt(st['reward'])} | {fmt(st['gain'])} "
                     f"| {fmt(st.get('headroom_closed'), 3)} | {fmt(st['win_rate'], 3)} | {fmt(st['fidelity'])} "
                     f"| {fmt(st.get('shape'), 3)} | {fmt(st.get('judge_gain'))} |")
    lines += ["", "## Verdict per contrast", "", *contrast_rows(s["contrasts"]), "",
              "## What the runs delivered", "",
              "Per seed, in seed order; – where the run did not record it (records from before these fields were "
              "kept). Network passes: latents through the actors' and the learner's networks, classifier-free "
              "guidance's two halves counted twice. Each reference check's D is in results.json "
              "(`runs[].delivered.ref_checks`).", "",
              *delivered_rows(s["runs"], cells), "",
              "## Gains by drawn area", "",
              "Each run's paired gain (B − A) on every score, within thirds of the base samples' drawn area (the mask "
              "of the prompt's colour, as `rewards.world` measures it; the thirds' bounds are fractions of the "
              "image); mean ± s.e. over seeds. A gain that lives only in the small third is the policy drawing "
              "bigger.", "",
              *area_rows({c: s["cells"][c] for c in cells}), "",
              "## Curves", "", "![held-out reward vs update and wall time](curves.png)", "",
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
    baseline, owns_ray, log = None, False, logging.getLogger("dpr")
    try:
        for _ in range(2):  # the second pass: cells whose budget matches the compute the first pass's runs measured
            trees = cell_trees(grid, quick, updates, out)
            jobs = [(c, k) for c in trees for k in range(seeds)]
            configs = {(c, k): run_config(trees[c], out, c, k) for c, k in jobs}  # all checked before any run
            todo = [j for j in jobs if not finished(out, *j, configs[j])]
            if stale := [j for j in todo if record_path(out, *j).exists()]:
                log.warning("%d finished runs of %s were trained with another config (an older grid or default): "
                            "rerunning them", len(stale), name)
            if todo and baseline is None:  # the same on every resume
                baseline = Baseline.build(configs[jobs[0]], 8 if quick else grid.compare_n, grid.world_metrics)
                owns_ray = start_ray(configs[todo[0]])
            for cell, k in tqdm(todo, desc=f"study {name}", unit="run", position=0):
                run_cell(configs[cell, k], cell, k, baseline, out)
    finally:
        if owns_ray:
            ray.shutdown()
    records = [json.loads(record_path(out, c, k).read_text()) for c, k in jobs]
    return write_report(name, grid, out, records, command)


def report_only(name: str, out: Path) -> dict[str, Any]:
    """Rewrite results.json and RESULTS.md from every finished record under ``out/cells`` with today's statistics,
    running nothing and leaving the figures as they are; the reproduce command stays the one that ran them."""
    grid = GRIDS[name]
    records = [r for c in grid.cells for r in finished_records(out, c)]
    if not records:
        raise ConfigError(f"--report-only: no finished run of grid {name!r} under {out / 'cells'}")
    previous = out / "results.json"
    command = json.loads(previous.read_text())["command"] if previous.exists() else \
        f"python -m learner.study --grid {name}"
    return write_report(name, grid, out, records, command, figures=False)


def rejudge(name: str, out: Path) -> dict[str, Any]:
    """Add the held-out judge and the gains by drawn area to every finished record of grid ``name`` that lacks
    them (records from before they were kept), scoring its run's final checkpoint on the same held-out samples,
    then rewrite the report."""
    from tqdm import tqdm

    from learner.evaluate import Comparison, load_policy, score

    grid = GRIDS[name]
    todo = [r for c in grid.cells for r in finished_records(out, c) if "judge_gain" not in r or "by_area" not in r]
    missing = [str(run_dir(out, r["cell"], r["seed"])) for r in todo if not run_dir(out, r["cell"], r["seed"]).exists()]
    if missing:
        raise ConfigError(f"--rejudge: {len(missing)} runs are not on this machine (e.g. {missing[0]}); runs stay "
                          "where they ran: rerun those cells, or judge them there")
    if todo:
        baseline = Baseline.build(build_config(next(iter(cell_trees(grid).values()))), todo[0]["n"],
                                  grid.world_metrics)  # the records' own comparison: the same prompts and seeds
        prompts, seeds, rewards = baseline.prompts, baseline.seeds, baseline.rewards
        base = baseline.policy.sample_images(prompts, seeds)
        base_scores = score(base, prompts, rewards)
        for record in tqdm(todo, desc=f"judge {name}", unit="run"):
            policy, _ = load_policy(run_dir(out, record["cell"], record["seed"]), baseline.cfg)
            images = policy.sample_images(prompts, seeds)
            comparison = Comparison(prompts, seeds, {"A": base, "B": images},
                                    {"A": base_scores, "B": score(images, prompts, rewards)}, baseline.main)
            added = {**judged(comparison.summary()["rewards"][JUDGE]), "by_area": gain_by_area(comparison)}
            record.update({k: v for k, v in added.items() if k not in record})  # what was measured stays
            record_path(out, record["cell"], record["seed"]).write_text(json.dumps(record, indent=1))
    return report_only(name, out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m learner.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, choices=sorted(GRIDS), help="the claim to test")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per cell (default: {MIN_SEEDS})")
    parser.add_argument("--quick", action="store_true", help="the grid's first two cells, 1 seed, 2 updates")
    parser.add_argument("--updates", type=int, default=None, help="learner updates (of the first cell)")
    parser.add_argument("--out", default=None, help="default: docs/study/<grid> (runs/study_quick/<grid> with --quick)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.json and RESULTS.md from the finished runs' records; runs nothing")
    parser.add_argument("--rejudge", action="store_true",
                        help="add the held-out judge and the gains by drawn area to finished records that lack "
                             "them (from the runs' checkpoints under <out>/runs), then rewrite the report")
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
        if args.rejudge:
            summary = rejudge(args.grid, out)
        elif args.report_only:
            summary = report_only(args.grid, out)
        else:
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
