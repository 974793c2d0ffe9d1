"""``learner.verdict``: the paired Student-t interval against a float64 hand computation, the minimum detectable
effect against the exact (noncentral t) power, every verdict, the seed minimum and the manipulation checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from learner.verdict import (
    MIN_SEEDS,
    compare_cells,
    decide,
    every_run,
    mde,
    overall,
    paired_differences,
    t_interval,
)

T975_DF5 = 2.5705818356363146  # Student-t 0.975 quantile, 5 degrees of freedom (tables: 2.5706)
T80_DF5 = 0.9195437802408271  # 0.80 quantile, 5 degrees of freedom (tables: 0.9195)


def test_t_interval_matches_a_float64_hand_computation():
    d = [0.12, 0.05, 0.20, 0.09, 0.15, 0.11]
    mean = math.fsum(d) / 6
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / 5)
    se = sd / math.sqrt(6)
    s = t_interval(d)
    assert s["n"] == 6 and s["mean"] == pytest.approx(mean, rel=1e-14)
    assert s["sd"] == pytest.approx(sd, rel=1e-12) and s["se"] == pytest.approx(se, rel=1e-12)
    assert s["t"] == pytest.approx(T975_DF5, rel=1e-12)
    assert s["ci"] == pytest.approx([mean - T975_DF5 * se, mean + T975_DF5 * se], rel=1e-12)
    one = t_interval([0.3])
    assert one["mean"] == 0.3 and one["ci"] is None and one["mde"] is None  # no spread to measure


def test_paired_differences_use_the_seeds_every_cell_ran():
    values = {"b": {0: 1.0, 1: 2.0, 2: 4.0}, "a": {1: 0.5, 2: 1.0, 3: 9.0}, "c": {1: 0.25, 2: 0.0}}
    assert paired_differences(values, {"b": 1, "a": -1}) == {1: 1.5, 2: 3.0}
    assert paired_differences(values, {"b": 1, "a": -1, "c": -1}, margin=0.5) == {1: 0.75, 2: 2.5}


def test_mde_formula_and_its_power():
    """MDE = (t_{0.975,n−1} + t_{0.80,n−1})·sd/√n; at that effect the exact power of the two-sided paired t-test
    (noncentral t) is 0.80 within 0.01 from n = 6 on."""
    assert mde(1.0, 6) == pytest.approx((T975_DF5 + T80_DF5) / math.sqrt(6), rel=1e-12)
    assert mde(0.02, 6) == pytest.approx(0.02 * mde(1.0, 6), rel=1e-12)
    for n in (6, 10, 30):
        crit, nc = stats.t.ppf(0.975, n - 1), mde(1.0, n) * math.sqrt(n)
        power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
        assert power == pytest.approx(0.80, abs=0.01), n


def test_every_verdict():
    up, down, flat = t_interval([1.0, 1.2, 0.9, 1.1, 1.0, 0.8]), t_interval([-1.0, -1.2, -0.9, -1.1, -1.0, -0.8]), \
        t_interval([0.1, -0.1, 0.2, -0.2, 0.05, -0.05])
    assert decide(up, [("delivered", True)]) == ("holds", "the 95 % CI excludes 0 in the claimed direction")
    assert decide(down, [])[0] == "contradicted"
    verdict, reason = decide(flat, [])
    assert verdict == "no effect detected" and f"{flat['mde']:.4f}" in reason
    assert decide(up, [("delivered", False)]) == ("not tested", "manipulation check failed")
    assert decide(up, [("delivered", None)]) == ("not tested", "no data for the manipulation check")
    assert decide(t_interval([1.0, 1.1, 0.9]), [("delivered", None)]) == \
        ("not tested", "n=3 < 6 seeds; no data for the manipulation check")


def test_six_seed_rule():
    assert MIN_SEEDS == 6
    five = t_interval([1.0, 1.2, 0.9, 1.1, 1.0])  # an effect ten s.e. wide, but 5 seeds
    assert five["ci"][0] > 0 and decide(five, []) == ("not tested", "n=5 < 6 seeds")
    assert decide(t_interval([1.0, 1.2, 0.9, 1.1, 1.0, 0.8]), [])[0] == "holds"


def test_false_positive_rates_under_no_effect():
    """The issue's numbers: with 3 seeds a 2-s.e. rule says 'holds' or 'does not hold' ~18 % of the time when
    nothing differs (P(|t_2| > 2) = 0.18); the t interval on 6 seeds excludes 0 ~5 % of the time."""
    rng = np.random.default_rng(0)
    three = rng.standard_normal((20000, 3))
    z = three.mean(1) / (three.std(1, ddof=1) / math.sqrt(3))
    assert np.mean(np.abs(z) > 2) == pytest.approx(2 * stats.t.sf(2, 2), abs=0.01)
    assert 2 * stats.t.sf(2, 2) == pytest.approx(0.18, abs=0.005)
    six = rng.standard_normal((2000, 6))
    rate = np.mean([decide(t_interval(d), [])[0] != "no effect detected" for d in six])
    assert rate == pytest.approx(0.05, abs=0.02)


def test_overall():
    assert overall(["holds", "holds"]) == "holds"
    assert overall(["holds", "contradicted", "not tested"]) == "contradicted"
    assert overall(["holds", "not tested"]) == "not tested"
    assert overall(["holds", "no effect detected"]) == "no effect detected"
    assert overall([]) == "not tested"


def test_checks_say_no_data_rather_than_guess():
    moved = every_run("moved", ("s",), ("moves",), lambda d: d["moves"] >= 4)
    assert moved.test({"s": [{"moves": 5}, {"moves": 4}]}) is True
    assert moved.test({"s": [{"moves": 5}, {"moves": 1}]}) is False
    assert moved.test({"s": [{"moves": 5}, {"moves": None}]}) is None
    assert moved.test({"s": []}) is None
    lower = compare_cells("a below b", "x", ("a", "b"), lambda a, b: a < b)
    assert lower.test({"a": [{"x": 1.0}, {"x": 2.0}], "b": [{"x": 3.0}]}) is True
    assert lower.test({"a": [{"x": 4.0}], "b": [{"x": 3.0}]}) is False
    assert lower.test({"a": [{"x": None}], "b": [{"x": 3.0}]}) is None
