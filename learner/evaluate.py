"""``python -m learner.evaluate A B``: compare two policies on held-out prompts with the same noise seeds.

A and B are each ``base`` (the config's model, or ``--model``) or a learner checkpoint: a ``step-N`` directory,
a run's ``checkpoints/`` directory or a run directory (→ its newest complete checkpoint). A checkpoint's LoRA
settings and base model come from the run's ``config.json`` beside ``checkpoints/``.

Sample i uses prompt ``prompts[i % len(prompts)]`` and seed ``seed + i`` on both sides, so every difference is
paired: same prompt, same x_T, same per-step noise (``DiffusionPolicy.sample``). For each reward — the config's
``reward.spec`` (the main reward), any named with ``--rewards`` and, on world prompts, ``world_shape`` — it
reports the mean ± s.e. of each side, the paired difference B − A ± s.e., and on the main reward the win rate
of B over A (share of prompt × seed pairs where B scores higher, ties counting half) ± s.e. The s.e.s treat
the n pairs as independent (several seeds share a prompt, so they are slightly optimistic). Writes
``comparison.json`` and ``comparison.png`` (rows: A and B at a few seeds; columns: prompts) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learner.checkpoint import MANIFEST, CheckpointError, latest_checkpoint, load_checkpoint
from learner.config import Config, ConfigError, build_config, load_yaml
from learner.plots import save_comparison_grid
from learner.prompts import load_prompts
from policy import POLICY, DiffusionPolicy
from rewards.base import Reward, RewardConfigError
from rewards.registry import build_reward

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SHAPE = "world_shape"


@dataclass
class Comparison:
    """Both sides' images and per-sample scores on the same prompts and seeds."""

    prompts: list[str]
    seeds: list[int]
    images: dict[str, torch.Tensor]  # side ("A", "B") -> [N, 3, H, W]
    scores: dict[str, dict[str, torch.Tensor]]  # side -> reward name -> [N]
    main: str  # the reward the win rate is taken on

    def summary(self) -> dict[str, Any]:
        """JSON-ready statistics (float64)."""
        a, b = self.scores["A"], self.scores["B"]
        out: dict[str, Any] = {"n": len(self.prompts), "main_reward": self.main, "rewards": {}}
        for name in a:
            out["rewards"][name] = {"A": mean_se(a[name]), "B": mean_se(b[name]), "B-A": mean_se(b[name] - a[name])}
        out["win_rate"] = mean_se(win_indicator(a[self.main], b[self.main]))
        return out


def mean_se(values: torch.Tensor) -> dict[str, float]:
    """Mean and standard error (sample std with ddof=1 over √n; 0 for n = 1)."""
    v = values.detach().double().cpu()
    se = float(v.std(correction=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "se": se}


def win_indicator(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where B beats A, ½ on a tie, 0 where A wins."""
    return (b > a).double() + 0.5 * (b == a).double()


# ---- policies -----------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint ``step-N`` directory, run directory) for a step dir, a ``checkpoints/`` dir or a run dir."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory: give 'base', a run directory or a checkpoint directory")
    if (p / MANIFEST).is_file():
        return p, p.parent.parent
    root, run = (p / "checkpoints", p) if (p / "checkpoints").is_dir() else (p, p.parent)
    step = latest_checkpoint(root)
    if step is None:
        raise CheckpointError(f"no complete checkpoint under {root}")
    return step, run


def load_policy(source: str, cfg: Config, device: str = "cpu") -> tuple[DiffusionPolicy, dict[str, Any]]:
    """``base`` → ``cfg.model.path``; a checkpoint → its run's base model with the stored LoRA adapter.

    Both use ``cfg.sampler`` so that the two sides of a comparison sample alike. Returns the policy and a
    description of where it came from (for the JSON).
    """
    if source == "base":
        return DiffusionPolicy.from_pretrained(cfg.model.path, device, cfg.model.dtype, cfg.sampler), \
            {"source": "base", "model": cfg.model.path}
    step_dir, run = resolve_checkpoint(source)
    run_config = run / "config.json"
    if not run_config.is_file():
        raise CheckpointError(f"{run_config} is missing: it holds the LoRA settings the checkpoint was trained with")
    run_cfg = build_config(json.loads(run_config.read_text()))
    tensors, state = load_checkpoint(step_dir)
    if "policy" not in tensors:
        raise CheckpointError(f"{step_dir} holds no 'policy' tensor group (groups: {sorted(tensors)})")
    policy = DiffusionPolicy.from_pretrained(run_cfg.model.path, device, cfg.model.dtype, cfg.sampler)
    slot = POLICY if run_cfg.train.trainable == "lora" else None  # a full checkpoint holds the whole UNet
    if slot:
        policy.add_lora(POLICY, run_cfg.lora, trainable=False)
    policy.copy_into(slot, tensors["policy"], int(state.get("step", 0)))
    return policy, {"source": str(step_dir), "model": run_cfg.model.path, "step": state.get("step")}


# ---- the comparison -----------------------------------------------------------------------------------------
def build_rewards(cfg: Config, extra: Sequence[str] = (), prompts: Sequence[str] = ()) -> tuple[dict[str, Reward], str]:
    """The config's reward (main), the extra names, and ``world_shape`` when every prompt is a world prompt."""
    main = build_reward(cfg.reward.spec, cfg.reward.options)
    rewards = {main.name: main}
    names = list(extra)
    if SHAPE not in names and prompts and _world_prompts(prompts):
        names.append(SHAPE)
    for name in names:
        rewards.setdefault(name, build_reward(name, cfg.reward.options))
    return rewards, main.name


def _world_prompts(prompts: Sequence[str]) -> bool:
    from world.scenes import parse_prompt

    try:
        for p in set(prompts):
            parse_prompt(p)
    except ValueError:
        return False
    return True


def score(images: torch.Tensor, prompts: Sequence[str], rewards: Mapping[str, Reward]) -> dict[str, torch.Tensor]:
    return {name: r(images, list(prompts)).float().cpu() for name, r in rewards.items()}


def compare(policy_a: DiffusionPolicy, policy_b: DiffusionPolicy, prompts: Sequence[str], seeds: Sequence[int],
            rewards: Mapping[str, Reward], main: str, batch: int = 64) -> Comparison:
    """Sample both policies on the same (prompt, seed) pairs and score every reward on both (one policy given
    twice is sampled once: the seeds make its two sides identical anyway)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if main not in rewards:
        raise ValueError(f"main reward {main!r} is not among the rewards {sorted(rewards)}")
    images = {"A": policy_a.sample_images(prompts, seeds, batch)}
    images["B"] = images["A"] if policy_b is policy_a else policy_b.sample_images(prompts, seeds, batch)
    return Comparison(list(prompts), list(seeds), images,
                      {side: score(x, prompts, rewards) for side, x in images.items()}, main)


def save_grid(comparison: Comparison, num_prompts: int, path: Path, grid_seeds: int = 3) -> None:
    """Rows: A and B at each of the first seeds of a prompt; columns: the first ``num_prompts`` distinct prompts."""
    k = len(dict.fromkeys(comparison.prompts))  # sample i has prompt i % k
    cols = min(num_prompts, k)
    rows = {}
    for j in range(min(grid_seeds, len(comparison.prompts) // k) or 1):
        idx = [j * k + c for c in range(cols)]
        if idx[-1] >= len(comparison.prompts):
            break
        for side in ("A", "B"):
            rows[f"{side} seed {comparison.seeds[idx[0]]}"] = comparison.images[side][idx]
    save_comparison_grid(rows, comparison.prompts[:cols], path)


def table(summary: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    lines = [f"A = {labels['A']}", f"B = {labels['B']}", f"n = {summary['n']} prompt × seed pairs", "",
             f"{'reward':<22}{'A':>20}{'B':>20}{'B − A':>22}"]
    for name, r in summary["rewards"].items():
        cells = "".join(f"{r[k]['mean']:>11.4f} ± {r[k]['se']:<6.4f}" for k in ("A", "B"))
        lines.append(f"{name:<22}{cells}{r['B-A']['mean']:>+13.4f} ± {r['B-A']['se']:<6.4f}")
    w = summary["win_rate"]
    lines.append(f"\nwin rate of B over A on {summary['main_reward']}: {w['mean']:.3f} ± {w['se']:.3f} (ties count ½)")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("a", metavar="A", help="'base' or a checkpoint / run directory")
    parser.add_argument("b", metavar="B", help="'base' or a checkpoint / run directory")
    parser.add_argument("--n", type=int, default=256, help="prompt × seed pairs")
    parser.add_argument("--prompts", default="world:heldout", help="world:heldout, world:train or a text file")
    parser.add_argument("--rewards", default="", help="extra rewards, comma-separated (e.g. world_fidelity)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML giving model, sampler and reward")
    parser.add_argument("--model", default=None, help="the base model directory (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses noise seed SEED + i")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--grid-prompts", type=int, default=8)
    parser.add_argument("--out", default="runs/evaluate", help="folder for comparison.json and comparison.png")
    args = parser.parse_args(argv)
    from policy.components import ModelPathError

    try:
        if args.n < 1 or args.batch < 1:
            raise ConfigError(f"--n and --batch must be >= 1, got {args.n} and {args.batch}")
        tree = load_yaml(args.config)
        if args.model is not None:
            tree.setdefault("model", {})["path"] = args.model
        cfg = build_config(tree)
        unique = load_prompts(args.prompts)
        prompts = [unique[i % len(unique)] for i in range(args.n)]
        seeds = [args.seed + i for i in range(args.n)]
        rewards, main_name = build_rewards(cfg, [r for r in args.rewards.split(",") if r.strip()], prompts)
        policy_a, info_a = load_policy(args.a, cfg)
        policy_b, info_b = (policy_a, info_a) if args.b == args.a else load_policy(args.b, cfg)
    except (ConfigError, CheckpointError, RewardConfigError, ModelPathError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = compare(policy_a, policy_b, prompts, seeds, rewards, main_name, args.batch)
    summary = {**result.summary(), "A": info_a, "B": info_b, "prompts": args.prompts, "seed": args.seed,
               "sampler": cfg.sampler.model_dump()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    if args.grid_prompts:
        save_grid(result, args.grid_prompts, out / "comparison.png")
    print(table(summary, {"A": args.a, "B": args.b}))
    print(f"\nwrote {out / 'comparison.json'}" + (f" and {out / 'comparison.png'}" if args.grid_prompts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
