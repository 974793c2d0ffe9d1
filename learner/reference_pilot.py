"""``python -m learner.reference_pilot``: calibrate the stable reference's cap δ before the ``rethinking`` study.

Why: a cap set at another β froze the reference at its first check in 5 of 6 study runs, so "stable" ran the
frozen treatment. The pilot runs the study's stable-reference cell (Diffusion-DPO, its β and lr, trajectory
pairs) with no cap (δ = 10⁹) and a short τ, so the reference is replaced at every check, and reads from its
metrics the divergence D(u) of the policy from the initial model at each check under both divergences. Then
``calibrate`` picks δ for a τ: the smallest cap under which the reference is replaced at least ``moves`` times
(the study's manipulation check), with a margin, and the update at which it would then freeze.

Writes ``docs/study/rethinking/pilot.json`` and ``pilot.png`` (D against update, both divergences).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from learner.study import GRIDS, MIN_MOVES, ROOT, cell_trees, merge, metric_rows

OUT = ROOT / "docs" / "study" / "rethinking"
DIVERGENCES = ("kernel_kl", "log_ratio")


def divergence_series(metrics: Sequence[Mapping[str, Any]]) -> dict[str, list[list[float]]]:
    """[[update, D], ...] per divergence, from a run's metrics.jsonl records."""
    series: dict[str, list[list[float]]] = {d: [] for d in DIVERGENCES}
    for r in metrics:
        for d in DIVERGENCES:
            value = r["metrics"].get(f"train/ref_divergence_{d}")
            if value is not None:
                series[d].append([r["step"], value])
    return series


def calibrate(series: Sequence[Sequence[float]], tau: int, moves: int = MIN_MOVES, margin: float = 1.5
              ) -> dict[str, float | int | None]:
    """δ for checks every ``tau`` updates: ``margin`` × the largest D among the first ``moves`` checks (so those
    replace the reference, with room for seed-to-seed spread), and the first later check whose D passes it (the
    reference freezes there; None if none in the pilot). D is read at the pilot's check nearest each update."""
    points = sorted((int(u), float(d)) for u, d in series)
    if not points:
        raise ValueError("the pilot logged no reference check: is reference.strategy stable_update?")

    def at(update: int) -> float:
        return min(points, key=lambda p: abs(p[0] - update))[1]

    checks = range(tau, points[-1][0] + 1, tau)
    first = [at(u) for u in list(checks)[:moves]]
    if len(first) < moves:
        raise ValueError(f"the pilot ran {points[-1][0]} updates: too few for {moves} checks every {tau}")
    delta = margin * max(abs(d) for d in first)
    freeze = next((u for u in checks if abs(at(u)) > delta), None)
    return {"tau": tau, "delta": delta, "moves": moves, "freezes_at": freeze}


def pilot_config(updates: int | None, tau: int, seed: int, out: Path):
    from learner.config import build_config

    tree = cell_trees(GRIDS["rethinking"])["stable_uniform"]
    steps = {"steps": updates} if updates else {}
    return build_config(merge(tree, {"reference": {"tau": tau, "delta": 1e9}, "train": {**steps, "seed": seed},
                                     "output": {"dir": str(out), "overwrite": True}}))


def plot(series: Mapping[str, Sequence[Sequence[float]]], calibrations: Sequence[Mapping[str, Any]], path: Path
         ) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(1, len(DIVERGENCES)), DIVERGENCES, strict=True):
        u, d = zip(*series[name], strict=True) if series[name] else ((), ())
        ax.plot(u, d, marker=".", label=f"D(u), {name}")
        if name == "kernel_kl":
            for c in calibrations:
                ax.axhline(c["delta"], ls="--", lw=0.8, label=f"δ for τ = {c['tau']}")
        ax.set_xlabel("learner update")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.reference_pilot", description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=None, help="default: the rethinking cells' updates")
    parser.add_argument("--tau", type=int, default=1, help="the pilot's τ (a check every τ updates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from learner.main import run

    run_dir = args.out / "runs" / "pilot"
    cfg = pilot_config(args.updates, args.tau, args.seed, run_dir)
    summary = run(cfg)
    series = divergence_series(metric_rows(run_dir / "metrics.jsonl"))
    calibrations = [calibrate(series["kernel_kl"], tau) for tau in (2, 4) if cfg.train.steps >= MIN_MOVES * tau]
    record = {"command": "python -m learner.reference_pilot " + " ".join(sys.argv[1:] if argv is None else argv),
              "beta": cfg.loss.beta, "lr": cfg.train.lr, "updates": cfg.train.steps, "pilot_tau": args.tau,
              "seed": args.seed, "decides": cfg.reference.divergence, "series": series,
              "calibrations": calibrations, "after": summary["after"], "before": summary["before"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pilot.json").write_text(json.dumps(record, indent=1, allow_nan=False))
    plot(series, calibrations, args.out / "pilot.png")
    for c in calibrations:
        print(f"tau {c['tau']}: delta {c['delta']:.3g} ({c['moves']} replacements, freezes at "
              f"{c['freezes_at'] if c['freezes_at'] is not None else 'no check of the pilot'})")
    return 0 if all(math.isfinite(c["delta"]) for c in calibrations) else 1


if __name__ == "__main__":
    sys.exit(main())
