"""Held-out headroom of the world rewards on the embedded model: ``python -m rewards.world_headroom [--n 256]``.

Why: the default alignment run needs headroom, i.e. a base model clearly better than random weights yet clearly
below what the reward can give. Rows (mean ± standard error over ``n`` samples, prompts cycling over the
held-out combinations, seeds 0..n-1): random-init weights of the same architecture, the trained base model,
the base model on training prompts (generalisation gap), renders of the training distribution ("data", random
sizes) and ideal renders at the preferred (largest) size — the ceiling. Sampling goes through the project's
policy (``DiffusionPolicy.sample``), the same code the rollout actors run.
Writes world/assets/metrics.json, world/assets/samples_heldout.png and the table into world/TRAINING.md; for the
flow world (``--model world/flow_model``: the random-init row then uses its flow scheduler too)
world/assets/flow_metrics.json, flow_samples_heldout.png and world/FLOW_TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from policy import DiffusionPolicy, SamplerConfig
from policy.process import FlowMatchingSDE
from rewards.world import WorldFidelity, WorldPreference, WorldReward
from world.scenes import RADIUS_RANGE, render_batch, sample_scenes, split_prompts
from world.train import (
    ASSETS,
    FLOW_TRAINING_MD,
    TRAINING_MD,
    random_init_model,
    update_section,
)

REWARDS = {"world": WorldReward(), "world_fidelity": WorldFidelity(), "world_preference": WorldPreference()}


def summarise(images: torch.Tensor, prompts: list[str]) -> dict[str, dict[str, float]]:
    """Mean and standard error of every world reward."""
    out = {}
    for name, reward in REWARDS.items():
        s = reward(images, prompts).double()
        out[name] = {"mean": s.mean().item(), "se": (s.std() / math.sqrt(len(s))).item()}
    return out


def save_grid(columns: dict[str, torch.Tensor], prompts: list[str], path: Path) -> None:
    """One row per prompt, one column per named image set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(len(prompts), len(names), figsize=(1.1 * len(names) + 2.2, 1.1 * len(prompts)),
                             squeeze=False)
    for r, prompt in enumerate(prompts):
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.imshow(columns[name][r].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
        axes[r][0].set_ylabel(prompt.removeprefix("a "), fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("held-out prompts (combinations never seen in training)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    head = "| samples | " + " | ".join(REWARDS) + " |\n|---|" + "---|" * len(REWARDS)
    lines = [head]
    for row, metrics in rows.items():
        cells = " | ".join(f"{metrics[k]['mean']:.3f} ± {metrics[k]['se']:.3f}" for k in REWARDS)
        lines.append(f"| {row} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="world/model")
    parser.add_argument("--n", type=int, default=256, help="samples per row")
    parser.add_argument("--split-seed", type=int, default=0, help="the seed the model was trained with")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM's eta")
    parser.add_argument("--noise-level", type=float, default=0.7, help="a flow model's SDE noise level a")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=str(ASSETS), help="folder for metrics.json and samples_heldout.png")
    args = parser.parse_args(argv)
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                            noise_level=args.noise_level)
    train, heldout = split_prompts(args.split_seed)
    seeds = list(range(args.n))
    held_prompts = [heldout[i % len(heldout)] for i in seeds]
    train_prompts = [train[i % len(train)] for i in seeds]

    base = DiffusionPolicy.from_pretrained(args.model, device="cpu", sampler=sampler)
    flow = isinstance(base.process, FlowMatchingSDE)
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = random_init_model(tmp, scheduler=base.c.scheduler if flow else None)
        random_policy = DiffusionPolicy.from_pretrained(random_dir, device="cpu", sampler=sampler)
    images = {
        "random init": random_policy.sample_images(held_prompts, seeds, args.batch),
        "base model": base.sample_images(held_prompts, seeds, args.batch),
        "data (random sizes)": render_batch(sample_scenes(held_prompts, args.n, seed=1)),
        "ideal (ceiling)": render_batch(sample_scenes(held_prompts, args.n, seed=1, radius=RADIUS_RANGE[1])),
    }
    rows = {f"{name}, held-out": summarise(x, held_prompts) for name, x in images.items()}
    rows["base model, training prompts"] = summarise(base.sample_images(train_prompts, seeds, args.batch),
                                                     train_prompts)
    text = table(rows)
    print(text)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    noise = f"noise level a {args.noise_level}" if flow else f"eta {args.eta}"
    settings = {"n": args.n, "steps": args.steps, "guidance_scale": args.guidance,
                **({"noise_level": args.noise_level} if flow else {"eta": args.eta}),
                "split_seed": args.split_seed, "heldout_prompts": heldout}
    prefix = "flow_" if flow else ""
    (out / f"{prefix}metrics.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    k = len(heldout)  # seeds i, i+k, i+2k, ... all have prompt heldout[i]
    columns = {"ideal": images["ideal (ceiling)"][:k], "random init": images["random init"][:k]}
    for j in range(min(4, args.n // k)):
        columns[f"base, seed {j}"] = images["base model"][j * k : (j + 1) * k]
    save_grid(columns, heldout, out / f"{prefix}samples_heldout.png")
    if out.resolve() == ASSETS.resolve():  # the committed model's own record
        command = f"python -m rewards.world_headroom --n {args.n}" + (f" --model {args.model}" if flow else "")
        sampler_text = f"{args.steps} {'flow SDE' if flow else 'DDIM'} steps, {noise}, guidance {args.guidance}"
        update_section("evaluation", f"## Held-out evaluation (`{command}`)\n\n{sampler_text}; mean ± standard "
                       f"error over {args.n} samples.\n\n{text}\n\nSamples: assets/{prefix}samples_heldout.png",
                       FLOW_TRAINING_MD if flow else TRAINING_MD)


if __name__ == "__main__":
    main()
