"""``python -m learner.label_agreement``: how often a chain-level label disagrees with the step-level ranking.

Why: TailorPO's argument (arXiv 2502.01667, §3) is that the preference label of two whole chains, applied to
every step of them as D3PO does, is often wrong for a given step, while ranking the two children of one x_t by
their x̂_0 reward is not. The ``tailorpo`` study compares the two kinds of pairs by the reward they reach; this
measures the mechanism itself on the base model, at every sampler step k:

- ``chains``: two chains from one x_T with independent step noise (D3PO's pairs). Does the chain whose final
  image wins also have the better x̂_0 after step k?
- ``children``: two children of one x_t at step k (TailorPO's pairs), each continued to the end by the sampler
  with its own noise. Does the child with the better x̂_0 also end as the better image?

A disagreement rate of 0.5 means the chain label says nothing about that step. Writes
``docs/study/tailorpo/label_agreement.json`` and ``.png`` (rate per step with its binomial standard error, and the
mean |Δ reward| of the two x̂_0 that the step ranks); ``--reward`` ranks by another reward, ``--name`` names the
files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from learner.main import DEFAULT_CONFIG
from learner.study import ROOT

OUT = ROOT / "docs" / "study" / "tailorpo"
CHILD_SEED_OFFSET = 7_919  # child c of prompt i continues with noise seed seed_i + (c + 1) · offset


def disagreement(step_rewards: torch.Tensor, final_rewards: torch.Tensor) -> dict[str, float]:
    """Share of pairs whose ranking by ``step_rewards`` [2, B] differs from that by ``final_rewards`` [2, B], its
    binomial s.e., the mean |gap| of the step rewards, and of the final rewards (for children: the reward spread
    that the steps from k on still decide)."""
    disagree = ((step_rewards[1] > step_rewards[0]) != (final_rewards[1] > final_rewards[0])).double()
    p, n = float(disagree.mean()), disagree.numel()
    return {"rate": p, "se": math.sqrt(p * (1 - p) / n), "gap": float((step_rewards[1] - step_rewards[0]).abs().mean()),
            "final_gap": float((final_rewards[1] - final_rewards[0]).abs().mean()), "n": n}


class Measure:
    """The base model, its sampler and the training reward (the rollout actors' code paths)."""

    def __init__(self, reward: dict[str, float] | None = None, config: Path = DEFAULT_CONFIG):
        from learner.config import build_config, load_yaml
        from learner.study import merge
        from policy import DiffusionPolicy
        from rewards.registry import build_reward

        # the measurement samples the plain policy: guidance (which needs a differentiable reward) is off
        self.cfg = build_config(merge(load_yaml(config), {"guidance": {"kind": "none"}},
                                      {"reward": {"spec": reward}} if reward else {}))
        self.policy = DiffusionPolicy.from_pretrained(ROOT / self.cfg.model.path, "cpu", torch.float32,
                                                      self.cfg.sampler)
        self.reward = build_reward(self.cfg.reward.spec, self.cfg.reward.options)

    def x0_reward(self, x: torch.Tensor, k: int, embeds, prompts: list[str]) -> torch.Tensor:
        """Reward of the x̂_0 of x, the latent after step k (the final latent itself after the last step)."""
        return self.reward(self.policy.decode(self.policy.x0_after_step(x, k, embeds)[0]), prompts)

    def finish(self, x: torch.Tensor, k: int, embeds, gens) -> torch.Tensor:
        """The latent after step k carried to the end of the chain."""
        pol = self.policy
        for t in pol.timesteps[k + 1:]:
            x = pol.step(x, t, embeds, gens).x_prev
        return x

    @torch.no_grad()
    def chains(self, prompts: list[str], seeds: list[int]) -> list[dict[str, float]]:
        pol, b = self.policy, len(prompts)
        x_T = pol.initial_latents(pol.generators(seeds))
        roll = pol.sample(prompts * 2, seeds + [s + CHILD_SEED_OFFSET for s in seeds], x_T=torch.cat([x_T, x_T]))
        final = self.reward(roll.images, prompts * 2).view(2, b)
        embeds = pol.encode_prompts(prompts * 2)
        return [disagreement(self.x0_reward(roll.latents[k + 1], k, embeds, prompts * 2).view(2, b), final)
                for k in range(len(pol.timesteps))]

    @torch.no_grad()
    def children(self, prompts: list[str], seeds: list[int]) -> list[dict[str, float]]:
        pol, b = self.policy, len(prompts)
        gens, embeds, embeds2 = pol.generators(seeds), pol.encode_prompts(prompts), pol.encode_prompts(prompts * 2)
        x, rows = pol.initial_latents(gens), []
        for k, t in enumerate(pol.timesteps):
            kids = pol.branch(x, t, embeds, 2, gens).x_prev.flatten(0, 1)  # [2B]: child 0 of every prompt, then 1
            step = self.x0_reward(kids, k, embeds2, prompts * 2).view(2, b)
            child_gens = pol.generators([s + (c + 1) * CHILD_SEED_OFFSET * (k + 1) for c in (0, 1) for s in seeds])
            final = self.reward(pol.decode(self.finish(kids, k, embeds2, child_gens)), prompts * 2).view(2, b)
            rows.append(disagreement(step, final))
            x = pol.step(x, t, embeds, gens).x_prev  # the trunk goes on with an ordinary policy sample
        return rows


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    rate_ax, gap_ax = fig.subplots(1, 2)
    for name in ("chains", "children"):
        rows = result[name]
        k = range(len(rows))
        rate_ax.errorbar(k, [r["rate"] for r in rows], yerr=[2 * r["se"] for r in rows], marker=".", capsize=2,
                         label=name)
        gap_ax.plot(k, [r["gap"] for r in rows], marker=".", label=f"{name}: x̂_0 after step k")
    gap_ax.plot(k, [r["final_gap"] for r in result["children"]], ls="--", label="children: final images")
    rate_ax.axhline(0.5, ls="--", lw=0.8, color="grey")
    rate_ax.set(xlabel="sampler step k (0: first, from x_T)", ylabel="chain label ≠ x̂_0 ranking",
                title="disagreement rate (± 2 s.e.)")
    gap_ax.set(xlabel="sampler step k", ylabel="mean |Δ reward|", yscale="log", title="what a step ranks")
    for ax in (rate_ax, gap_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.label_agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="pairs per step (training prompts, cycled)")
    parser.add_argument("--reward", default=None, help="reward.spec to rank by, e.g. '{world: 1, world_crisp: 0.5}' "
                        "(default: the default config's)")
    parser.add_argument("--name", default="label_agreement", help="file name of the outputs under --out")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from learner.main import parse_value
    from learner.prompts import load_prompts

    measure = Measure(parse_value(args.reward, "--reward") if args.reward else None)
    pool = load_prompts(measure.cfg.data.train_prompts)
    prompts, seeds = [pool[i % len(pool)] for i in range(args.n)], list(range(args.n))
    result = {"command": "python -m learner.label_agreement " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": measure.cfg.model.path, "reward": measure.cfg.reward.spec, "n": args.n,
              "chains": measure.chains(prompts, seeds), "children": measure.children(prompts, seeds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    plot(result, args.out / f"{args.name}.png")
    for name in ("chains", "children"):
        print(name, " ".join(f"{r['rate']:.2f}" for r in result[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
