"""Throughput-adaptive call sizes against the cost shapes they meet: a fixed part per call plus a part per chain
(as on a GPU, or a CPU with per-step overheads), with timing noise and a machine that slows down mid-run."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from learner.scheduling import CallCost, CostFit, ThroughputBalancer

SLOW_BOX = CallCost(fixed=3.4, per_chain=0.3)  # measured on a 2-core machine where sizing by rate fell to 1 chain


def _drive(bal: ThroughputBalancer, seconds, calls: int = 120) -> list[int]:
    """The sizes the balancer asks for when call i of n chains takes ``seconds(i, n)``."""
    sizes = []
    for i in range(calls):
        n = bal.size(0)
        sizes.append(n)
        bal.observe(0, n, seconds(i, n))
    return sizes


def _slow_box(noise: float, seed: int, slowdown_at: int = 40):
    """SLOW_BOX with ±``noise`` on every call, twice as slow from call ``slowdown_at`` (another process's load)."""
    rng = random.Random(seed)

    def seconds(i: int, n: int) -> float:
        load = 2.0 if i >= slowdown_at else 1.0
        return load * (SLOW_BOX.fixed + SLOW_BOX.per_chain * n) * rng.uniform(1 - noise, 1 + noise)
    return seconds


def test_a_large_fixed_cost_never_spirals_down_to_one_chain():
    """3.4 s a call + 0.3 s a chain, 16 chains first, 3 s targeted: sizing by the mean rate went 16 → 4 → 3 → 2 →
    1. The fixed part must stay ≤ a third of a call instead: ≥ 23 chains once the fit holds (27 at the 30 % aim)."""
    bal = ThroughputBalancer(num_actors=1, initial=16, target_seconds=3.0, max_size=64)
    sizes = _drive(bal, lambda i, n: SLOW_BOX.fixed + SLOW_BOX.per_chain * n)
    assert sizes[:4] == [16, 24, 32, 32]  # learning the fit: growing only, up to twice the first size
    assert min(sizes[4:]) >= SLOW_BOX.floor(1 / 3) == 23
    assert statistics.median(sizes) == SLOW_BOX.floor(0.3) == 27
    fitted = bal.cost(0)
    assert (fitted.fixed, fitted.per_chain) == pytest.approx((3.4, 0.3))


@pytest.mark.parametrize(("cost", "target", "max_size", "expected"), [
    (CallCost(0.0, 0.2), 3.0, 64, 15),          # no fixed part: the target's chains, as sizing by rate gave
    (CallCost(0.5, 0.1), 9.0, 64, 64),          # capped at max_size (the target's 85 is above the floor, 12)
    (CallCost(0.5, 0.1), 9.0, 256, 85),
    (CallCost(0.05, 0.001), 3.0, 4096, 2950),   # a GPU: 50 ms a call + 1 ms a chain
    (CallCost(1.0, 0.28), 3.0, 64, 9),          # a CPU: the floor (9) is above the target (7)
])
def test_sizes_aim_at_the_target_above_the_floor(cost, target, max_size, expected):
    bal = ThroughputBalancer(1, initial=16, target_seconds=target, max_size=max_size)
    sizes = _drive(bal, lambda i, n: cost.fixed + cost.per_chain * n)
    assert statistics.median(sizes[20:]) == expected


def test_calls_are_capped_by_the_room_the_learner_has_and_wait_below_the_floor():
    cost = CallCost(0.5, 0.1)
    bal = ThroughputBalancer(1, initial=16, target_seconds=6.0, max_size=64)
    _drive(bal, lambda i, n: cost.fixed + cost.per_chain * n, calls=40)
    size, floor = bal.size(0), cost.floor(0.3)
    assert size > floor + 5
    assert bal.size_within(0, math.inf) == bal.size_within(0, size + 0.5) == size
    assert bal.size_within(0, floor + 3.7) == floor + 3  # only what the learner can still use
    assert bal.size_within(0, floor) == floor
    assert bal.size_within(0, floor - 0.5) == 0  # below the floor: wait for the learner rather than pay the fixed part
    unfitted = ThroughputBalancer(1, initial=16, target_seconds=3.0, max_size=64)
    assert unfitted.size_within(0, 15.9) == 0 and unfitted.size_within(0, 16) == 16  # no floor known: the whole call
    fixed = ThroughputBalancer(1, initial=16, target_seconds=3.0, max_size=64, adapt=False)
    assert fixed.size_within(0, 0.0) == 16  # fixed-size calls are the comparator: never capped


@pytest.mark.parametrize("seed", range(20))
def test_noisy_calls_on_a_machine_that_slows_down_stay_at_the_floor(seed):
    """Wall-time fits (a GPU actor): ±5 % timing noise and the machine twice as slow from call 40. The fit follows,
    a uniform slowdown leaves the floor where it is, most calls stay at or above it and none falls near 1."""
    sizes = _drive(ThroughputBalancer(1, initial=16, target_seconds=3.0, max_size=64), _slow_box(0.05, seed))
    assert min(sizes) >= 6
    assert sum(n < SLOW_BOX.floor(1 / 3) for n in sizes) <= 0.4 * len(sizes)


def test_very_noisy_calls_still_do_not_spiral():
    """±20 % on every call: the sizes wander, but none falls near 1 and they centre on the floor."""
    runs = [_drive(ThroughputBalancer(1, initial=16, target_seconds=3.0, max_size=64), _slow_box(0.2, seed))
            for seed in range(20)]
    assert min(min(sizes) for sizes in runs) >= 5
    assert statistics.mean(statistics.median(sizes) for sizes in runs) >= SLOW_BOX.floor(1 / 3)


def test_a_fit_needs_several_calls_two_sizes_and_a_positive_slope():
    def fitted(*calls):
        fit = CostFit()
        for n, s in calls:
            fit.observe(n, s)
        return fit.cost()

    assert fitted((4, 2.2), (8, 3.4), (4, 2.2)) is None  # too few calls
    assert fitted(*[(8, 2.0)] * 6) is None  # one size
    assert fitted((8, 2.0), (16, 1.9), (8, 2.0), (16, 1.9)) is None  # noise hides the per-chain cost
    assert fitted((4, 1.0), (8, 2.2), (4, 1.0), (8, 2.2)).fixed == 0.0  # a negative fixed part is noise
    cost = fitted((4, 2.2), (8, 3.4), (16, 5.8), (8, 3.4))
    assert (cost.fixed, cost.per_chain) == pytest.approx((1.0, 0.3))


def test_balancer_state_round_trips_exactly():
    bal = ThroughputBalancer(2, initial=8, target_seconds=2.0, max_size=64)
    for n, s in ((8, 3.1), (12, 4.3), (18, 5.9), (27, 8.2), (20, 6.5)):
        bal.observe(1, n, s)
    copy = ThroughputBalancer(2, initial=8, target_seconds=2.0, max_size=64)
    copy.load_state_dict(bal.state_dict())
    assert (copy.fits, copy.size(1), copy.rates) == (bal.fits, bal.size(1), bal.rates)
    assert json.loads(json.dumps(bal.state_dict())) == bal.state_dict()  # checkpoints hold strict JSON


def test_slow_actors_get_less_work_in_sync_rounds():
    bal = ThroughputBalancer(num_actors=2, initial=8, target_seconds=2.0, max_size=64)
    assert bal.split(16) == [8, 8] and bal.size(1) == 8
    bal.observe(0, chains=8, seconds=1.0)  # 8 chains/s
    bal.observe(1, chains=8, seconds=4.0)  # 2 chains/s
    assert bal.split(20) == [16, 4] and sum(bal.split(7)) == 7
    assert bal.size(0) == 16 and bal.size(1) == 12  # short: grows in proportion; long: by half, to learn the fit
    fixed = ThroughputBalancer(2, 8, 2.0, 64, adapt=False)
    fixed.observe(0, 8, 1.0)
    assert fixed.split(16) == [8, 8] and fixed.size(0) == 8


@pytest.mark.parametrize("seed", range(10))
def test_on_a_loaded_cpu_the_fit_uses_the_calls_own_cpu_time(seed):
    """Another process takes a random share of the cores: wall time stretches by 1-3x call to call, unrelated to
    the call's size, while the actor's CPU seconds stay its work (±2 %). The floor (23 chains at a third) holds for
    every call once fitted (within the fit's 10 %); calls aim at the target in wall time (the floor dominates)."""
    rng = random.Random(seed)
    bal = ThroughputBalancer(1, initial=16, target_seconds=3.0, max_size=64)
    sizes = []
    for _ in range(80):
        n = bal.size(0)
        sizes.append(n)
        work = (SLOW_BOX.fixed + SLOW_BOX.per_chain * n) * rng.uniform(0.98, 1.02)
        bal.observe(0, n, work * rng.uniform(1.0, 3.0), cpu_seconds=work)
    assert min(sizes) >= 16 and min(sizes[4:]) >= 0.9 * SLOW_BOX.floor(1 / 3)
    fitted = bal.cost(0)
    assert fitted.fixed == pytest.approx(3.4, rel=0.25) and fitted.per_chain == pytest.approx(0.3, rel=0.1)
