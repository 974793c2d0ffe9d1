"""Driver-side bookkeeping that needs no Ray: the prompt stream and throughput-adaptive batch sizes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


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


@dataclass
class ThroughputBalancer:
    """Per-actor batch sizes proportional to measured speed, so a round never waits on the slowest actor.

    Each actor's rate (chains per second) is an exponential moving average of what its calls report. In async
    mode an actor gets ``rate × target_seconds`` chains per call; in sync mode a round's work is split in
    proportion to the rates. Actors not measured yet count as the mean of the others (or get ``initial``).
    """

    num_actors: int
    initial: int
    target_seconds: float
    max_size: int
    adapt: bool = True
    smoothing: float = 0.5
    rates: dict[int, float] = field(default_factory=dict)

    def observe(self, actor: int, chains: float, seconds: float) -> None:
        if seconds <= 0 or chains <= 0:
            return
        rate = chains / seconds
        old = self.rates.get(actor)
        self.rates[actor] = rate if old is None else self.smoothing * rate + (1 - self.smoothing) * old

    def _rate(self, actor: int) -> float | None:
        if actor in self.rates:
            return self.rates[actor]
        return sum(self.rates.values()) / len(self.rates) if self.rates else None

    def size(self, actor: int) -> int:
        """Chains for ``actor``'s next call (async mode)."""
        rate = self._rate(actor)
        if not self.adapt or rate is None:
            return self.initial
        return max(1, min(self.max_size, round(rate * self.target_seconds)))

    def split(self, total: int) -> list[int]:
        """Split ``total`` chains over the actors in proportion to their rates (sync mode); sums to ``total``."""
        rates = [self._rate(a) for a in range(self.num_actors)]
        if not self.adapt or any(r is None for r in rates):
            rates = [1.0] * self.num_actors
        norm = sum(rates)
        shares = [total * r / norm for r in rates]
        sizes = [int(s) for s in shares]
        for a in sorted(range(self.num_actors), key=lambda a: sizes[a] - shares[a])[: total - sum(sizes)]:
            sizes[a] += 1
        return sizes
