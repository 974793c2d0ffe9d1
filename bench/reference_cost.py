"""What ``reference.compute_on: actors`` saves the learner and costs a rollout actor, on the embedded world.

One process, the default config's model, sampler, pairs and batch size (configs/default.yaml). A rollout worker
with the reference on the actors and one without sample the same prompts and seeds, alternately (A/B, so that a
change in the machine's load hits both sides alike); two learners then take alternate updates on the same
records, one using the stored log π_ref, one computing its own reference forward. Medians of the repeats.
Writes bench/reference_cost.json and the Markdown block between the markers in bench/RESULTS.md.

    python -m bench.reference_cost [--repeats 3] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

from bench.common import ROOT, bench_tree, machine_info, make_config, table, write_block

RESULTS = ROOT / "bench" / "RESULTS.md"
JSON_OUT = ROOT / "bench" / "reference_cost.json"
BEGIN, END = "<!-- reference-cost:begin (python -m bench.reference_cost writes this block) -->", \
    "<!-- reference-cost:end -->"


def measure(repeats: int, prompts: int) -> dict[str, Any]:
    """Median seconds per generate call and per learner update, with the reference on the learner and on the
    actors, from ``repeats`` alternating A/B rounds."""
    from actors.records import from_table
    from actors.rollout import RolloutWorker
    from learner.prompts import load_prompts
    from learner.trainer import Learner

    with tempfile.TemporaryDirectory() as out:
        tree = bench_tree(ROOT / "world" / "model", updates=1, quick=False, out_dir=out)
        cfgs = {where: make_config(tree, reference={"compute_on": where}) for where in ("learner", "actors")}
        workers = {where: RolloutWorker(cfg.rollout_settings()) for where, cfg in cfgs.items()}
        learners = {where: Learner(cfg) for where, cfg in cfgs.items()}
    batch_size = cfgs["actors"].train.batch_size
    texts = load_prompts(cfgs["actors"].data.train_prompts)[:prompts]
    per_call = prompts * len(cfgs["actors"].pairs.branch_steps)
    calls = -(-batch_size // per_call)  # generate calls that fill one batch
    generate: dict[str, list[float]] = {w: [] for w in workers}
    update: dict[str, list[float]] = {w: [] for w in learners}
    ref_in_generate: list[float] = []  # the actors' own timing of their reference evaluations
    for r in range(repeats):
        records = []
        for c in range(calls):
            seeds = [1000 * r + 100 * c + i for i in range(prompts)]
            for where, worker in workers.items():
                t0 = time.perf_counter()
                batch, stats = worker.generate(texts, list(range(prompts)), seeds, expected_version=0)
                generate[where].append(time.perf_counter() - t0)
                if where == "actors":
                    records.append(from_table(batch))
                    ref_in_generate.append(stats["ref_seconds"])
        pairs = _first_rows(records, batch_size)
        for where, learner in learners.items():  # "learner" drops the stored columns and runs its own forward
            metrics = learner.update(pairs)
            if metrics.get("ref_recomputed"):
                raise RuntimeError(f"{metrics['ref_recomputed']} pairs recomputed: the A/B would not compare")
            update[where].append(metrics["update_seconds"])
    med = {f"{k}_{w}": statistics.median(v) for k, d in (("generate_s", generate), ("update_s", update))
           for w, v in d.items()}
    med["ref_s_in_generate"] = statistics.median(ref_in_generate)
    return {**med, "prompts_per_generate": prompts, "pairs_per_update": batch_size, "repeats": repeats,
            "update_saving": 1 - med["update_s_actors"] / med["update_s_learner"],
            "generate_extra_s": med["generate_s_actors"] - med["generate_s_learner"],
            "generate_extra_share": med["generate_s_actors"] / med["generate_s_learner"] - 1,
            "raw": {"generate_s": generate, "update_s": update, "ref_s_in_generate": ref_in_generate},
            "machine": machine_info()}


def _first_rows(batches: list, n: int):
    """The first ``n`` pairs of ``batches`` (PairBatch) as one batch."""
    import torch

    from actors.records import PairBatch

    tensors = {k: torch.cat([b.tensors[k] for b in batches])[:n] for k in batches[0].tensors}
    return PairBatch(batches[0].kind, tensors, [p for b in batches for p in b.prompts][:n])


def markdown(res: dict[str, Any]) -> str:
    rows = [["learner s / update", res["update_s_learner"], res["update_s_actors"],
             f"{res['update_saving']:.1%} saved"],
            [f"rollout s / generate ({res['prompts_per_generate']} chains)", res["generate_s_learner"],
             res["generate_s_actors"], f"{res['generate_extra_s']:+.3g} s ({res['generate_extra_share']:+.1%})"],
            ["of which log π_ref (the actor's own timer)", None, res["ref_s_in_generate"],
             f"{res['ref_s_in_generate'] / res['generate_s_actors']:.1%} of the call"]]
    m = res["machine"]
    return "\n".join([
        f"`python -m bench.reference_cost` ({m['date']}, {m['cores']} cores, load {m['load_avg'][0]}): the default "
        f"config (embedded world, {res['pairs_per_update']} step pairs per update, guidance on), medians of "
        f"{res['repeats']} alternating A/B repeats in one process.",
        "",
        table(["", "compute_on: learner", "compute_on: actors", "difference"], rows)])


def write_results(res: dict[str, Any]) -> None:
    JSON_OUT.write_text(json.dumps(res, indent=1) + "\n")
    write_block(RESULTS, BEGIN, END, markdown(res), "## 6. Reference log-probs on the actors")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reference_cost", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="alternating A/B rounds (median)")
    p.add_argument("--prompts", type=int, default=4, help="chains per generate call")
    args = p.parse_args(argv)
    res = measure(args.repeats, args.prompts)
    write_results(res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
