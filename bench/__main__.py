"""``python -m bench [--quick]``: the whole benchmark suite in one command; prints tables, writes the measurements to
bench/results.json and the tables into the generated block of bench/RESULTS.md (the analysis around it is
written by hand and kept).

Sections: (1) the single-process baseline, (2) this system on Ray with 1/2 rollout actors, sync/async, on the
same work, (3) weight broadcast by LoRA rank and for the full UNet, (4) reward-actor batching. ``--gpu`` runs
the GPU section instead (bench/gpu.py; it needs CUDA and says so without it). ``--quick`` uses a tiny random
model and tiny settings: a smoke test, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    bench_tree,
    chains_per_record,
    fmt,
    machine_info,
    make_config,
    pairs_per_prompt,
    table,
)

SECTIONS = ("baseline", "system", "broadcast", "rewards")
DEFAULT_UPDATES = 20
QUICK_UPDATES = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model and settings (smoke test, < 90 s)")
    p.add_argument("--gpu", action="store_true", help="run the GPU section (SD-1.5 architecture, bf16) instead")
    p.add_argument("--model", default=None, help="model directory (default: configs/default.yaml's model.path; "
                   "--quick: a tiny random model)")
    p.add_argument("--updates", type=int, default=None,
                   help=f"learner updates per run (default {DEFAULT_UPDATES}, --quick {QUICK_UPDATES})")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--out", default=None, help="markdown report whose generated block is rewritten (default "
                   "bench/RESULTS.md; --gpu: RESULTS_GPU.md); the JSON data goes next to it")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {list(SECTIONS)}")
    if args.updates is not None and args.updates < 1:
        p.error(f"--updates must be >= 1, got {args.updates}")
    return args


def resolve_model(args: argparse.Namespace, tmp: Path) -> Path:
    """The model to benchmark: --model, else a tiny random one (--quick), else the default config's model."""
    from learner.config import load_yaml
    from policy.components import build_random_model, check_model_dir
    from world.scenes import vocabulary

    if args.model:
        return check_model_dir(args.model)
    if args.quick:
        return build_random_model(tmp / "tiny", arch="tiny", words=vocabulary())
    path = Path(load_yaml(ROOT / "configs" / "default.yaml")["model"]["path"])
    return check_model_dir(path if path.is_absolute() else ROOT / path)


# ---- running --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def section(res: dict[str, Any], name: str) -> Iterator[None]:
    """Announce a section and record its wall seconds (start-up included) in ``res["section_s"]``."""
    print(f"[bench] {name} ...", flush=True)
    t0 = time.perf_counter()
    yield
    res.setdefault("section_s", {})[name] = time.perf_counter() - t0


def run_cpu(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ray

    res: dict[str, Any] = {"machine": machine_info(), "quick": args.quick}
    t0 = time.perf_counter()
    model = resolve_model(args, tmp)
    updates = args.updates or (QUICK_UPDATES if args.quick else DEFAULT_UPDATES)
    tree = bench_tree(model, updates, args.quick, tmp / "run")
    cfg = make_config(tree)
    cores = os.cpu_count() or 1
    res.update(model=str(model), updates=updates, cores=cores, batch_size=cfg.train.batch_size,
               pairs_per_prompt=pairs_per_prompt(cfg), num_steps=cfg.sampler.num_steps,
               prompts_per_task=cfg.rollout.prompts_per_task, lora_rank=cfg.lora.rank,
               chains_per_prompt=chains_per_record(cfg))
    if "baseline" in args.sections:  # first, before Ray's processes exist: the machine is the baseline's alone
        from bench.baseline import run_baseline

        with section(res, "baseline (one process, no Ray)"):
            res["baseline"] = run_baseline(make_config(tree, rollout={"torch_threads": cores},
                                                       train={"torch_threads": cores}, reward={"num_actors": 0}),
                                           threads=tuple(sorted({1, cores})), probe_chains=2 if args.quick else 8)
    owns_ray = False
    try:
        if any(s in args.sections for s in ("system", "broadcast", "rewards")):
            from bench.system import CONFIGS, QUICK_CONFIGS, run_system, start_shared_ray

            with section(res, "Ray start"):
                owns_ray = start_shared_ray(tree, max(n for n, _ in CONFIGS))
        if "system" in args.sections:
            res["system"] = []
            for n, mode in QUICK_CONFIGS if args.quick else CONFIGS:
                with section(res, f"system: {n} rollout actor(s), {mode}"):
                    res["system"].append(run_system(tree, n, mode, tmp / f"run-{n}-{mode.replace(' ', '-')}"))
        if "broadcast" in args.sections:
            from bench.broadcast import FULL, RANKS, bench_broadcast, sd15_sizes

            with section(res, "weight broadcast"):
                res["broadcast"] = bench_broadcast(model, ranks=(4, FULL) if args.quick else (*RANKS, FULL),
                                                   repeats=2 if args.quick else 5)
                res["sd15_sizes"] = sd15_sizes()
        if "rewards" in args.sections:
            from bench.rewards import bench_actor, bench_score_now

            with section(res, "reward batching"):
                res["reward_local"] = bench_score_now(cfg.reward.spec, cfg.reward.options,
                                                      min_seconds=0.1 if args.quick else 0.5)
                res["reward_actor"] = bench_actor(cfg.reward.spec, cfg.reward.options,
                                                  request_images=2 * cfg.rollout.prompts_per_task,
                                                  requests_per_caller=5 if args.quick else 20,
                                                  max_wait_ms=cfg.reward.max_wait_ms)
    finally:
        if owns_ray:
            ray.shutdown()
    res["seconds"] = time.perf_counter() - t0
    res["load_avg_end"] = machine_info()["load_avg"]
    return res


# ---- the report -----------------------------------------------------------------------------------------------
def gflops(run: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    """Sustained GFLOP/s of a run, from the baseline's FLOP counts per chain and per update (the same work)."""
    if "flops_per_chain" not in baseline:
        return None
    work = run["chains"] * baseline["flops_per_chain"] + run["updates"] * baseline["flops_per_update"]
    return work / run["wall_s"] / 1e9


def throughput_table(res: dict[str, Any]) -> str:
    rows = ([res["baseline"]] if "baseline" in res else []) + res.get("system", [])
    b = res.get("baseline", {})
    base, base_u = b.get("images_per_s"), b.get("updates_per_s")

    headers = ["run", "updates", "chains", "loop s", "images/s", "× baseline", "denoise steps/s", "updates/s",
               "updates × baseline", "s/update", "learner idle", "chains/call", "gen chains/s (busy)", "busy procs",
               "GFLOP/s",
               "stale pairs dropped", "trained pair age"]
    body = [[r["name"], r["updates"], r["chains"], r["wall_s"], r["images_per_s"],
             r["images_per_s"] / base if base else None, r["steps_per_s"], r["updates_per_s"],
             r["updates_per_s"] / base_u if base_u else None, r["s_per_update"], f"{100 * r['not_training']:.0f}%",
             r["chains_per_call"], r["gen_chains_per_s"], r["busy_processes"], gflops(r, b),
             r.get("dropped_stale_pairs", 0), r.get("trained_age_mean")] for r in rows]
    return table(headers, body)


def probe_table(probe: dict[str, dict[int, float]]) -> str:
    threads = sorted(probe["gen_chains_per_s"])
    return table(["torch threads", "generate chains/s", "one update s"],
                 [[n, probe["gen_chains_per_s"][n], probe["update_s"][n]] for n in threads])


def broadcast_tables(res: dict[str, Any]) -> str:
    rows = res["broadcast"]
    first = table(["weights", "params", "MB (fp32)", "export ms", "ray.put ms", "2 actors load ms (object store)",
                   "in-process load ms"],
                  [[r["what"], r["params"], r["mb"], r["export_ms"], r["put_ms"], r["actors_ms"], r["local_load_ms"]]
                   for r in rows])
    second = table(["SD-1.5 UNet weights", "params", "MB fp32", "MB bf16/fp16"],
                   [[r["what"], r["params"], r["mb_fp32"], r["mb_bf16"]] for r in res["sd15_sizes"]])
    return first + "\n\nSD-1.5 architecture (sizes computed on the meta device, not timed):\n\n" + second


def reward_tables(res: dict[str, Any]) -> str:
    local, actor = res["reward_local"], res["reward_actor"]
    one, solo = local[0]["scores_per_s"], actor[0]["scores_per_s"]
    first = table(["batch", "scores/s", "ms per call", "× batch 1"],
                  [[r["batch"], r["scores_per_s"], r["ms_per_call"], r["scores_per_s"] / one] for r in local])
    second = table(["concurrent callers", "images per request", "scores/s", "images per scored batch",
                    "latency ms", "× 1 caller"],
                   [[r["callers"], r["request_images"], r["scores_per_s"], r["images_per_batch"], r["latency_ms"],
                     r["scores_per_s"] / solo] for r in actor])
    return ("In process, `RewardWorker.score_now` (1 thread):\n\n" + first +
            "\n\nThrough one async Ray reward actor, callers waiting for each answer like rollout actors:\n\n" + second)


def gpu_tables(gpu: dict[str, Any]) -> str:
    if "skipped" in gpu:
        return gpu["skipped"]
    parts = [f"Device: {gpu['device']}, {gpu['steps']} steps, peak {gpu['peak_tflops']:.0f} TFLOP/s bf16.", "",
             table(["batch", "images/s", "GFLOP/image", "TFLOP/s", "MFU", "peak GiB"],
                   [[r["batch"], r["images_per_s"], r["gflop_per_image"], r["tflops"], r["mfu"], r["peak_gib"]]
                    for r in gpu["sampling"]]), "",
             table(["speed-up (batch 4)", "images/s or error"], [[k, v] for k, v in gpu["tries"].items()]), "",
             table(["LoRA r16 pairs", "update s", "peak GiB"],
                   [[r["pairs"], r["update_s"], r["peak_gib"]] for r in gpu["learner"]["updates"]]), "",
             table(["weights (bf16)", "MB", "export ms", "load ms"],
                   [[r["what"], r["mb"], r["export_ms"], r["load_ms"]] for r in gpu["learner"]["broadcast"]])]
    return "\n".join(parts)


GENERATED = ("<!-- BEGIN GENERATED by `python -m bench`: every run rewrites this block; write analysis outside it -->",
             "<!-- END GENERATED -->")


def write_report(path: Path, tables: str) -> None:
    """Replace the generated block of ``path`` (appended when missing); the hand-written text around it stays."""
    begin, end = GENERATED
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    head, _, rest = text.partition(begin)
    _, found, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{tables}\n{end}{tail if found else chr(10)}")


def render(res: dict[str, Any], command: str) -> str:
    """The measured tables as markdown, with the run's command, machine and settings; no analysis."""
    m = res["machine"]
    out = []
    if res.get("quick"):
        out += ["**--quick smoke run: tiny random model and settings; these numbers mean nothing.**", ""]
    out += [f"- command: `{command}` ({res['seconds']:.0f} s)", f"- date: {m['date']}",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, GPU: "
            f"{'yes' if m['cuda'] else 'none'}",
            f"- load average (1/5/15 min) at start: {m['load_avg']}, at end: {res.get('load_avg_end', '–')}",
            f"- versions: Python {m['python']}, torch {m['torch']}, ray {m['ray']}, diffusers {m['diffusers']}"]
    if "section_s" in res:
        out += ["- wall seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in res["section_s"].items())]
    if "model" in res:
        out += [f"- model: `{res['model']}`; {res['updates']} learner updates per run, batch {res['batch_size']} "
                f"pairs, {res['pairs_per_prompt']} pairs per prompt, {res['num_steps']} sampler steps"]
    if "baseline" in res or "system" in res:
        out += ["", "## 1-2. Throughput: single-process baseline vs this system on Ray", "",
                "Training loop only. Baseline: from after model loading and the first weight sync to the last "
                "update. System: from the 'before' evaluation's line in metrics.jsonl (just before the loop) to "
                "the last `train/update_seconds` line; Ray start-up"
                + (f" ({res['section_s']['Ray start']:.0f} s)" if "Ray start" in res.get("section_s", {}) else "")
                + ", actor creation and the evaluations are excluded (each run's total, start-up included: "
                + ", ".join(f"{r['name']} {r['total_s']:.0f} s" for r in res.get("system", [])) + "). "
                "images/s = chains sampled per second; learner idle = 1 − Σ update_seconds / loop time; busy "
                "procs = (Σ generate seconds + Σ update seconds) / loop time; gen chains/s = chains per second of "
                "a rollout call while it runs; trained pair age = mean number of updates between the policy that "
                "sampled a pair and the update that trains on it (how on-policy the updates are).", "",
                throughput_table(res)]
        if "baseline" in res:
            b = res["baseline"]
            out += ["", f"Baseline rounds of {b['round_prompts']} prompts (the fewest that fill whole batches; no "
                    f"pair is dropped, and update i of a round trains on pairs i updates old); "
                    f"generate {b['generate_s']:.1f} s, update {b['update_s']:.1f} s, publish + "
                    f"receive_weights {b['publish_s']:.2f} s of {b['wall_s']:.1f} s."]
            if "probe" in b:
                out += ["", "Thread scaling in the baseline's process (before its loop, before Ray starts):", "",
                        probe_table(b["probe"])]
    if "broadcast" in res:
        out += ["", "## 3. Weight broadcast (object-store path; median of repeats)", "", broadcast_tables(res)]
    if "reward_local" in res:
        out += ["", "## 4. Reward batching (the default `world` reward)", "", reward_tables(res)]
    if "gpu" in res:
        out += ["", "## GPU", "", gpu_tables(res["gpu"])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from policy.components import ModelPathError

    args = parse_args(argv)
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out) if args.out else ROOT / "bench" / ("RESULTS_GPU.md" if args.gpu else "RESULTS.md")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            if args.gpu:
                from bench.gpu import run_gpu

                t0 = time.perf_counter()
                res = {"machine": machine_info(), "gpu": run_gpu(args.quick, args.model)}
                res["seconds"] = time.perf_counter() - t0
                if "skipped" in res["gpu"]:
                    print(f"[bench] --gpu skipped: {res['gpu']['skipped']}")
                    return 0
            else:
                res = run_cpu(args, Path(tmp))
    except ModelPathError as e:
        print(f"error: {e}; train it with `python -m world.train --out world/model`, pass --model DIR, "
              "or use --quick", file=sys.stderr)
        return 2
    report = render(res, command)
    print("\n" + report)
    data = out.with_name("results_gpu.json" if args.gpu else "results.json")
    data.write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_report(out, report)
    print(f"[bench] wrote {data} and the tables of {out} ({fmt(res['seconds'])} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
