"""Does the flag-free run hold on a slower or loaded machine? Two measurements, each side by side in one run.

1. The rollout actor's chains/s at 1, 4 and 16 chains per call, with the LoRA adapter switched on every UNet call
   (what each call paid before ``policy.lora.activate`` skipped a switch to the adapter already running) and
   only on a change (now); alternating A/B repeats in one process, medians.
2. The default run (``python -m learner.main``, configs/default.yaml) as is and with ``--rollout.adapt_batch
   false`` (16 chains a call), on the quiet machine and with one core kept busy by another process: seconds per
   learner update, held-out reward after, and every generate call's size against the floor at which the fixed
   part of a call is a third of it (fitted from the adaptive run's own calls).

Writes bench/front_door.json and its block in bench/RESULTS.md.

    python -m bench.front_door [--updates 75] [--repeats 3] [--skip-runs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info, table, write_block
from learner.scheduling import CostFit

RESULTS = ROOT / "bench" / "RESULTS.md"
JSON_OUT = ROOT / "bench" / "front_door.json"
BEGIN, END = "<!-- front-door:begin (python -m bench.front_door writes this block) -->", "<!-- front-door:end -->"
FLOOR_SHARE = 1 / 3  # the fixed part's largest share of a call that the balancer guarantees
SIZES = (1, 4, 16)


# ---- 1. the actor's chains/s with and without a switch per UNet call ------------------------------------------
def _switch_every_call(unet: Any, name: str | None) -> None:
    """The walks every UNet call made before: set the adapter, re-enable and restore it, and put back every
    parameter's requires_grad, whether or not the adapter changed; then the state really asked for."""
    from policy.lora import POLICY, activate

    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.set_adapter(name or POLICY)
    unet.enable_adapters()
    unet.set_adapter(name or POLICY)
    for p, flag in flags:
        p.requires_grad_(flag)
    activate(unet, name)


def actor_rates(repeats: int) -> list[dict[str, Any]]:
    import policy.policy
    from actors.rollout import RolloutWorker
    from learner.main import parse_args

    cfg, _ = parse_args([])
    worker = RolloutWorker(cfg.rollout_settings())
    on_change = policy.policy.activate
    modes = {"switch per UNet call": _switch_every_call, "switch on change": on_change}
    seconds: dict[tuple[str, int], list[float]] = {(m, n): [] for m in modes for n in SIZES}
    prompts = ["a red circle on the left", "a blue square on the right"]
    worker.generate(prompts[:1], [0], [0], 0)  # warm-up
    try:
        for rep in range(repeats):
            for n in SIZES:
                for mode, fn in modes.items():
                    policy.policy.activate = fn
                    _, stats = worker.generate([prompts[i % 2] for i in range(n)], list(range(n)),
                                               [1000 * rep + i for i in range(n)], 0)
                    seconds[mode, n].append(stats["seconds"])
    finally:
        policy.policy.activate = on_change
    rows = []
    for n in SIZES:
        before, after = (statistics.median(seconds[m, n]) for m in modes)
        rows.append({"chains": n, "before_chains_per_s": n / before, "after_chains_per_s": n / after,
                     "speedup": before / after})
    return rows


# ---- 2. the default run, adaptive and fixed, quiet and loaded ---------------------------------------------------
@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """Another process spinning on one core for the duration (the loaded condition)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_run(out: Path, adapt: bool, loaded: bool, updates: int) -> dict[str, Any]:
    args = [sys.executable, "-m", "learner.main", "--output.dir", str(out), "--train.steps", str(updates),
            "--rollout.adapt_batch", "true" if adapt else "false"]
    t0 = time.perf_counter()
    with busy_core(loaded):
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                              env={"TQDM_DISABLE": "1", **os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    metrics = _records(out / "metrics.jsonl")
    updates_at = [r["time"] for r in metrics if "train/loss" in r["metrics"]]
    calls = [(m["rollout/actor0/batch"], m["rollout/actor0/batch"] / m["rollout/actor0/chains_per_s"],
              m.get("rollout/actor0/cpu_s")) for r in metrics if "rollout/actor0/batch" in (m := r["metrics"])]
    summary = json.loads((out / "summary.json").read_text())
    return {"adapt": adapt, "loaded": loaded, "wall_s": wall, "updates": len(updates_at),
            "s_per_update": (updates_at[-1] - updates_at[0]) / (len(updates_at) - 1),
            "calls": calls, "after": summary["after"], "before": summary["before"],
            "dropped_stale_pairs": summary["dropped_stale_pairs"], "waits": summary.get("rollout_waits", 0)}


def call_floor(calls: list[tuple[float, float, float | None]]) -> tuple[float, float, int] | None:
    """(fixed s, per-chain s, the floor at a third) fitted by plain least squares over a run's calls (their CPU
    seconds, the balancer's own measure on a CPU actor)."""
    fit = CostFit(forget=1.0)
    for chains, seconds, cpu_seconds in calls:
        fit.observe(chains, seconds, cpu_seconds)
    cost = fit.cost()
    return None if cost is None else (cost.fixed, cost.per_chain, cost.floor(FLOOR_SHARE))


def default_runs(updates: int) -> list[dict[str, Any]]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="front_door_") as tmp:
        for loaded in (False, True):
            for adapt in (True, False):
                name = f"{'adaptive' if adapt else 'fixed'}_{'loaded' if loaded else 'quiet'}"
                print(f"[front_door] default run, {name} ...", flush=True)
                runs.append(default_run(Path(tmp) / name, adapt, loaded, updates))
    for loaded in (False, True):
        adaptive, fixed = (r for r in runs if r["loaded"] == loaded)
        fitted = call_floor(adaptive["calls"])
        adaptive["fit"] = fitted
        adaptive["ratio_to_fixed"] = adaptive["s_per_update"] / fixed["s_per_update"]
        if fitted is not None:
            adaptive["calls_below_floor"] = sum(n < fitted[2] for n, _, _ in adaptive["calls"])
    return runs


# ---- report -------------------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    parts = [f"`python -m bench.front_door` ({m['date']}, {m['cores']} cores, {m['cpu']}, load before "
             f"{m['load_avg'][0]}).", "",
             f"Rollout actor, default config, medians of {res['repeats']} alternating repeats:", "",
             table(["chains per call", "chains/s, switch per UNet call", "chains/s, switch on change", "speed-up"],
                   [[r["chains"], r["before_chains_per_s"], r["after_chains_per_s"], f"{r['speedup']:.2f}x"]
                    for r in res["actor"]])]
    if res.get("runs"):
        rows = []
        for r in res["runs"]:
            sizes = [int(n) for n, _, _ in r["calls"]]
            fit = r.get("fit")
            rows.append(["loaded" if r["loaded"] else "quiet", "adaptive" if r["adapt"] else "fixed 16",
                         r["s_per_update"], f"{r['ratio_to_fixed']:.2f}x" if "ratio_to_fixed" in r else "1",
                         f"{min(sizes)}–{max(sizes)} (median {statistics.median(sizes):g})", len(sizes),
                         "–" if fit is None else f"{fit[0]:.2f} + {fit[1]:.3f}·n → {fit[2]}",
                         r.get("calls_below_floor", "–"), r.get("waits", "–"), r["dropped_stale_pairs"],
                         f"{r['after']:.4f}",
                         r["wall_s"]])
        parts += ["", f"The default run ({res['updates']} updates), side by side; 'loaded': one core kept busy by "
                  "another process. s/update is the training loop's (first to last update, the evaluations at "
                  "25 and 50 included); the fit is CPU seconds = fixed + per-chain · n over the adaptive run's calls, "
                  "and its floor the fewest chains at which the fixed part is a third of a call; 'waits for room': "
                  "calls held back until the learner could use their pairs before max_staleness.", "",
                  table(["machine", "sizing", "s/update", "vs fixed", "chains per call", "calls",
                         "fitted call cost → floor", "calls below floor", "waits for room", "dropped pairs",
                         "reward after",
                         "wall s"], rows)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.front_door", description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=75, help="learner updates per default run (the default's 75)")
    p.add_argument("--repeats", type=int, default=3, help="alternating A/B repeats of the actor measurement")
    p.add_argument("--skip-runs", action="store_true", help="only the actor measurement (about a minute)")
    args = p.parse_args(argv)
    res: dict[str, Any] = {"machine": machine_info(), "repeats": args.repeats, "updates": args.updates}
    print("[front_door] rollout actor chains/s ...", flush=True)
    res["actor"] = actor_rates(args.repeats)
    if not args.skip_runs:
        res["runs"] = default_runs(args.updates)
    JSON_OUT.write_text(json.dumps(res, indent=1) + "\n")
    block = markdown(res)
    write_block(RESULTS, BEGIN, END, block, "## 7. The flag-free run on a slower or loaded machine")
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
