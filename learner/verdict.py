"""The verdict on one contrast of a study: paired by seed, a Student-t interval, a power statement, and a
manipulation check that must pass before anything is claimed.

Why paired: every cell of a grid runs the same seeds (prompt order, noise, initial sampling), so a lucky seed is
lucky in every cell. Differencing per seed removes that shared part; adding the cells' variances as if they were
independent does not, and a 2-s.e. rule on 3 seeds then calls "holds" about 18 % of the time when nothing differs.
Why Student-t: with a handful of seeds the normal quantile understates the interval (t_{0.975,2} = 4.30, not 1.96).
Why a minimum of seeds and a manipulation check: an interval from 3 seeds detects only effects several times its
spread, and a treatment that the runs never delivered (a "moving" reference that froze at its first check) tests
nothing, whatever the numbers say.

The verdicts: **holds** (the 95 % CI excludes 0 in the claimed direction), **contradicted** (it excludes 0 in the
other), **no effect detected** (it includes 0; stated with the minimum detectable effect, MDE, at 80 % power) and
**not tested** (fewer than ``MIN_SEEDS`` paired seeds, or a manipulation check failed or has no data).

MDE of a two-sided paired t-test at level α with power 1 − β, n pairs and per-pair sd s (the usual approximation,
which ignores the non-centrality of t; it is within 0.01 of the exact power from n = 6 on, 0.77 at n = 3):

    MDE = (t_{1−α/2, n−1} + t_{1−β, n−1}) · s / √n
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05  # two-sided: a 95 % interval
POWER = 0.80  # for the minimum detectable effect
MIN_SEEDS = 6  # every verdict contrast has at least this many paired seeds

Runs = Mapping[str, Sequence[Mapping[str, Any]]]  # cell -> what each of its runs delivered (study.delivered)


@dataclass(frozen=True)
class Check:
    """Whether the runs delivered the treatment a contrast compares. ``test`` sees the delivered records of
    ``cells`` (the paired seeds' runs) and answers True, False, or None when the runs do not record what it needs."""

    text: str
    cells: tuple[str, ...]
    test: Callable[[Runs], bool | None]


def every_run(text: str, cells: Sequence[str], fields: Sequence[str], ok: Callable[[Mapping[str, Any]], bool]
              ) -> Check:
    """A check that ``ok`` holds in every run of ``cells``; None (no data) when any run lacks one of ``fields``."""

    def test(runs: Runs) -> bool | None:
        delivered = [d for c in cells for d in runs[c]]
        if not delivered or any(d.get(f) is None for d in delivered for f in fields):
            return None
        return all(ok(d) for d in delivered)

    return Check(text, tuple(cells), test)


def compare_cells(text: str, field: str, cells: tuple[str, str], relation: Callable[[float, float], bool]
                  ) -> Check:
    """A check that ``relation`` holds between two cells' means over runs of ``field``; None (no data) when any
    run lacks it."""

    def test(runs: Runs) -> bool | None:
        values = [[d.get(field) for d in runs[c]] for c in cells]
        if not all(values) or any(v is None for vs in values for v in vs):
            return None
        return relation(*(float(np.mean(vs)) for vs in values))

    return Check(text, cells, test)


def paired_differences(values: Mapping[str, Mapping[int, float]], weights: Mapping[str, float], margin: float = 0.0
                       ) -> dict[int, float]:
    """Per seed that every weighted cell ran: Σ_cell weight · value − margin (float64)."""
    seeds = sorted(set.intersection(*(set(values.get(c, {})) for c in weights)))
    return {s: math.fsum(w * float(values[c][s]) for c, w in weights.items()) - margin for s in seeds}


def percent(p: float) -> str:
    return f"{100 * p:g} %"


def t_quantile(p: float, n: int) -> float:
    return float(stats.t.ppf(p, n - 1))


def mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test with n pairs and per-pair sd finds with
    probability ``power`` (module docstring)."""
    return (t_quantile(1 - alpha / 2, n) + t_quantile(power, n)) * sd / math.sqrt(n)


def t_interval(d: Sequence[float], alpha: float = ALPHA) -> dict[str, Any]:
    """n, mean, sd (ddof 1), s.e. = sd/√n, the two-sided 1−α Student-t interval and the MDE of differences ``d``;
    the spread-based values are None below two values (no spread to measure)."""
    v = np.asarray(d, dtype=np.float64)
    n = len(v)
    out: dict[str, Any] = {"n": n, "mean": float(v.mean()) if n else None, "sd": None, "se": None, "t": None,
                           "ci": None, "mde": None}
    if n >= 2:
        sd = float(v.std(ddof=1))
        se, t = sd / math.sqrt(n), t_quantile(1 - alpha / 2, n)
        out.update(sd=sd, se=se, t=t, ci=[out["mean"] - t * se, out["mean"] + t * se], mde=mde(sd, n, alpha))
    return out


def decide(interval: Mapping[str, Any], checks: Sequence[tuple[str, bool | None]], min_seeds: int = MIN_SEEDS
           ) -> tuple[str, str]:
    """(verdict, reason) of a contrast from its ``t_interval`` and its checks' (text, passed) pairs; the reason
    names what is missing, not the checks (the report lists those)."""
    n = interval["n"]
    passed = [ok for _, ok in checks]
    untested = [f"n={n} < {min_seeds} seeds"] if n < min_seeds else []
    untested += ["manipulation check failed"] if False in passed else []
    untested += ["no data for the manipulation check"] if None in passed else []
    if untested:
        return "not tested", "; ".join(untested)
    lo, hi = interval["ci"]
    if lo > 0:
        return "holds", f"the {percent(1 - ALPHA)} CI excludes 0 in the claimed direction"
    if hi < 0:
        return "contradicted", f"the {percent(1 - ALPHA)} CI excludes 0 in the other direction"
    return "no effect detected", (f"the {percent(1 - ALPHA)} CI includes 0; the smallest effect this design "
                                  f"detects with {percent(POWER)} power is {interval['mde']:.4f}")


def overall(verdicts: Sequence[str]) -> str:
    """The claim's verdict: contradicted if any contrast is (a tested finding); holds if all hold; not tested if
    any is not tested; else no effect detected."""
    if "contradicted" in verdicts:
        return "contradicted"
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "not tested" if "not tested" in verdicts or not verdicts else "no effect detected"
