"""Sampling throughput of the embedded model: ``python -m world.speed [--model world/model]``.

Why: the issue's budget is >= 10 images/s (target >= 30) at 20 DDIM steps with classifier-free guidance (two
UNet evaluations per step, batched as one call on the doubled batch) and VAE decoding included, on 2 CPU
cores. It is measured through ``DiffusionPolicy.sample``, the code the rollout actors run, after one warm-up
batch; the median of ``--repeats`` timed batches is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from policy import DiffusionPolicy, SamplerConfig
from world.scenes import split_prompts


def images_per_second(policy: DiffusionPolicy, prompts: list[str], repeats: int) -> tuple[float, list[float]]:
    seeds = list(range(len(prompts)))
    with torch.inference_mode():
        policy.sample(prompts, seeds)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = policy.sample(prompts, seeds)
            times.append(time.perf_counter() - start)
    assert out.images is not None and out.images.shape[0] == len(prompts)
    return len(prompts) / statistics.median(times), times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="world/model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--record", action="store_true", help="write the result into world/TRAINING.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = DiffusionPolicy.from_pretrained(args.model, device="cpu",
                                             sampler=SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance))
    train, _ = split_prompts(0)
    prompts = [train[i % len(train)] for i in range(args.batch)]
    rate, times = images_per_second(policy, prompts, args.repeats)
    line = (f"{rate:.1f} images/s: batch {args.batch}, {args.steps} DDIM steps, guidance {args.guidance} (CFG), "
            f"VAE decoding included; {torch.get_num_threads()} torch thread(s), load average "
            f"{os.getloadavg()[0]:.1f}; batch times {', '.join(f'{t:.2f}' for t in times)} s")
    print(line)
    if args.record:
        from world.train import update_section

        update_section("speed", f"## Sampling speed (`python -m world.speed`)\n\n{line}")


if __name__ == "__main__":
    main()
