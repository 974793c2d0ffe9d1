"""Driver-side bookkeeping that needs no Ray: the prompt stream and throughput-adaptive batch sizes."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptStream:
    """An endless, seeded, reshuffled-every-epoch stream of (prompt id, prompt, chain seed).

    Its position (``cursor``) is part of a checkpoint, so a resumed run continues with the same prompts and seeds.
    """

    prompts: list[str]
    seed: int = 0
    cursor: int = 0
    _epoch_order: tuple[int, list[int]] = field(default=(-1, []), repr=False, compare=False)

    def _order(self, epoch: int) -> list[int]:
        """The epoch's shuffled prompt order, shuffled once per epoch (not once per prompt: O(prompts) each)."""
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def take(self, n: int) -> tuple[list[int], list[str], list[int]]:
        ids, texts, seeds = [], [], []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.prompts))
            pid = self._order(epoch)[pos]
            ids.append(pid)
            texts.append(self.prompts[pid])
            seeds.append(self.seed * 10_000_019 + self.cursor)
            self.cursor += 1
        return ids, texts, seeds


@dataclass(frozen=True)
class CallCost:
    """seconds ≈ fixed + per_chain · chains: what one actor's generate call costs."""

    fixed: float
    per_chain: float

    def chains_for(self, seconds: float) -> float:
        return (seconds - self.fixed) / self.per_chain

    def floor(self, fixed_share: float) -> int:
        """The fewest chains at which the fixed part is at most ``fixed_share`` of a call."""
        return math.ceil(self.fixed * (1 - fixed_share) / (fixed_share * self.per_chain) - 1e-9)


@dataclass
class CostFit:
    """Least squares of one actor's call cost on its chains, each older call weighing ``forget`` times less (a
    changed machine is followed); kept as running weighted sums, so it is one small state.

    The cost is the call's own work: its CPU seconds where the actor runs on the CPU, since another process's
    load stretches wall time by a factor that has nothing to do with the call's size and turned the fitted fixed
    part to 0 on a loaded 2-core machine; else its wall seconds (a GPU's kernels do not show in CPU time).
    ``stretch`` is the recent wall seconds per second of that work, to aim calls at a duration in wall time."""

    forget: float = 0.95
    calls: int = 0
    last: tuple[float, float] = (0.0, 0.0)  # (chains, wall seconds) of the latest call
    sums: tuple[float, ...] = (0.0,) * 5  # Σw, Σw·n, Σw·n², Σw·s, Σw·n·s over the work seconds s
    stretch: float = 1.0
    steady: int = 0  # calls in a row within 20 % of the size before them: they teach the fit nothing new

    def observe(self, chains: float, seconds: float, work: float | None = None) -> None:
        work = seconds if work is None else work
        terms = (1.0, chains, chains * chains, work, chains * work)
        self.sums = tuple(self.forget * old + new for old, new in zip(self.sums, terms, strict=True))
        self.stretch = seconds / work if not self.calls else 0.5 * (self.stretch + seconds / work)
        self.steady = self.steady + 1 if self.calls and abs(chains - self.last[0]) <= 0.2 * self.last[0] else 0
        self.calls += 1
        self.last = (chains, seconds)

    def cost(self, min_calls: int = 4) -> CallCost | None:
        """The fitted cost; None before ``min_calls`` calls, with a single size, or when noise hides the per-chain
        part. A negative fixed part (noise) is taken as 0, with the slope through the origin."""
        w, n, nn, s, ns = self.sums
        spread = nn / w - (n / w) ** 2 if w else 0.0
        if self.calls < min_calls or spread <= 1e-9 * (n / w) ** 2:
            return None
        slope = (ns / w - n * s / w**2) / spread
        fixed = s / w - slope * n / w
        if fixed < 0:
            fixed, slope = 0.0, ns / nn
        return CallCost(fixed, slope) if slope > 0 else None
@dataclass
class ThroughputBalancer:
    """Per-actor batch sizes from each actor's measured cost of a call, so a round never waits on the slowest
    actor and no call is mostly overhead.

    A call costs a fixed part (text encoding, per-step overheads, reward round trips) plus a part per chain.
    Sizing by the mean rate alone (chains/s × target) spirals down when the fixed part is large: each smaller call
    has a lower rate, so the next is smaller still, down to 1 chain at a tenth of the throughput. So each actor's
    calls are fitted (``CostFit``) and, in async mode, an actor gets the chains that fill ``target_seconds``, but
    never fewer than the floor at which the fixed part is ``fixed_share`` of a call. The floor aims at 30 %, so
    that timing noise rarely takes a call below the third it guarantees (tests/test_scheduling.py). Not lower:
    larger calls bring pairs the learner cannot use before ``train.max_staleness`` drops them; at a 20 % floor the
    default run's calls grew to 26 chains, dropped 3–4 thousand stale pairs and ran 1.6–2× slower per update
    (bench/RESULTS.md §7). A call shrinks to at most ``max_shrink`` of the last one, so one noisy fit cannot halve
    it. Until the fit holds (a few calls of different sizes) an actor only grows: in proportion when its call was
    short, by ``growth`` when it was long, up to twice ``initial``. After ``explore_every`` calls of one size it
    gets one call ``growth`` times larger, since a fit fed a single size cannot correct itself (it probes upwards:
    never below the floor).
    In sync mode a round's work is split in proportion to the actors' rates. Unmeasured actors get ``initial``.
    """

    num_actors: int
    initial: int
    target_seconds: float
    max_size: int
    adapt: bool = True
    fixed_share: float = 0.3
    growth: float = 1.5
    max_shrink: float = 0.75
    explore_every: int = 6
    fits: dict[int, CostFit] = field(default_factory=dict)

    def observe(self, actor: int, chains: float, seconds: float, cpu_seconds: float | None = None) -> None:
        """One finished call; ``cpu_seconds``, the actor's own CPU time where it runs on the CPU (see ``CostFit``)."""
        if seconds > 0 and chains > 0 and (cpu_seconds is None or cpu_seconds > 0):
            self.fits.setdefault(actor, CostFit()).observe(float(chains), float(seconds), cpu_seconds)

    @property
    def rates(self) -> dict[int, float]:
        """Each measured actor's throughput (chains per second), weighted to its recent calls."""
        return {a: fit.sums[1] / (fit.sums[3] * fit.stretch) for a, fit in self.fits.items()}

    def cost(self, actor: int) -> CallCost | None:
        return self.fits[actor].cost() if actor in self.fits else None

    def size(self, actor: int) -> int:
        """Chains for ``actor``'s next call (async mode)."""
        if not self.adapt or actor not in self.fits:
            return self.initial
        fit = self.fits[actor]
        last, seconds = fit.last
        cost = fit.cost()
        if cost is None:
            want = min(last * max(self.target_seconds / seconds, self.growth), 2 * self.initial)
        else:
            want = max(cost.chains_for(self.target_seconds / fit.stretch), cost.floor(self.fixed_share),
                       self.max_shrink * last)
            want *= self.growth if fit.steady >= self.explore_every else 1.0
        return max(1, min(self.max_size, round(want)))

    def size_within(self, actor: int, room: float) -> int:
        """Chains for ``actor``'s next call when the learner can train on only ``room`` more before
        ``train.max_staleness`` drops them: at most ``room``, and 0 (wait for the learner to make room) while
        ``room`` is below the call's floor, where a call is mostly fixed cost. Larger calls only feed the
        buffer's drop counter, and on a machine the actors share with the learner their CPU slows every update:
        uncapped, the default run's calls grew to 23 chains and dropped 2.3 thousand stale pairs (RESULTS §7).
        Fixed-size calls (``adapt`` off) are not capped."""
        size = self.size(actor)
        if not self.adapt:
            return size
        cost = self.cost(actor)
        floor = min(size, cost.floor(self.fixed_share)) if cost else size
        return int(min(size, room)) if room >= max(1, floor) else 0

    def state_dict(self) -> dict[str, Any]:
        return {str(a): {**dataclasses.asdict(fit), "last": list(fit.last), "sums": list(fit.sums)}
                for a, fit in self.fits.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fits = {int(a): CostFit(f["forget"], f["calls"], tuple(f["last"]), tuple(f["sums"]), f["stretch"],
                                     f["steady"]) for a, f in state.items()}

    def split(self, total: int) -> list[int]:
        """Split ``total`` chains over the actors in proportion to their rates (sync mode); sums to ``total``."""
        measured = self.rates
        rates = [measured.get(a) for a in range(self.num_actors)]
        if not self.adapt or any(r is None for r in rates):
            rates = [1.0] * self.num_actors
        norm = sum(rates)
        shares = [total * r / norm for r in rates]
        sizes = [int(s) for s in shares]
        for a in sorted(range(self.num_actors), key=lambda a: sizes[a] - shares[a])[: total - sum(sizes)]:
            sizes[a] += 1
        return sizes
