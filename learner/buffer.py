"""The pair buffer between rollouts and the learner; it owns staleness.

A record's staleness is how many versions were published after the one that sampled it. Records staler than
``max_staleness`` are dropped and counted (a bounded off-policy gap), when they arrive and again when the learner
asks for a batch (records that waited while newer versions were published age in the buffer); every record's
staleness on arrival goes into a histogram that the run summary reports, and so does every trained record's age:
the learner updates made between the publish of the version that sampled it and the update that trains on it (how
on-policy the updates are, in the unit the single-process loop has too, whatever the publish cadence).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from actors.stored import StoredPairs


class PairBuffer:
    """Rollout calls' records, held by reference (``actors.stored``): one entry per call, all of one version."""

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.held: deque[tuple[Any, int, int, int]] = deque()  # (records ref, first row, rows, version), oldest first
        self.rows = 0
        self.seen = 0
        self.dropped = 0
        self.histogram: dict[str, int] = {}  # staleness -> records (str keys: the checkpoint is JSON)
        self.trained_age: dict[str, int] = {}  # age in updates when taken for an update -> records
        self.published_at: dict[int, int] = {}  # version -> learner updates made when it was published

    def __len__(self) -> int:
        return self.rows

    def accept(self, records: Any, rows: int, sampled_by: int, version: int) -> int:
        """Keep the ``rows`` records of one call, sampled by version ``sampled_by``, if fresh enough for
        ``version``; returns their staleness."""
        staleness = version - sampled_by
        _count(self.histogram, staleness, rows)
        self.seen += rows
        if staleness <= self.max_staleness:
            self.held.append((records, 0, rows, sampled_by))
            self.rows += rows
        else:
            self.dropped += rows
        return staleness

    def ready(self, n: int, version: int) -> bool:
        """Drop what has become too stale for ``version`` while it waited; True when ``n`` pairs remain."""
        fresh = [held for held in self.held if version - held[3] <= self.max_staleness]
        if len(fresh) < len(self.held):
            kept = sum(held[2] for held in fresh)
            self.dropped += self.rows - kept
            self.held, self.rows = deque(fresh), kept
        return self.rows >= n

    def published(self, version: int, step: int) -> None:
        """Note that ``version`` was published after ``step`` learner updates."""
        self.published_at.setdefault(version, step)

    def take(self, n: int, step: int) -> StoredPairs:
        """The oldest ``n`` pairs (references to them), for the update after ``step``."""
        if n > self.rows:
            raise ValueError(f"asked for {n} pairs, {self.rows} are buffered")
        pieces, need = [], n
        while need:
            records, first, rows, version = self.held.popleft()
            used = min(rows, need)
            pieces.append((records, first, used))
            if used < rows:  # the rest of this call's records waits for the next update
                self.held.appendleft((records, first + used, rows - used, version))
            _count(self.trained_age, step - self.published_at.get(version, step), used)
            need -= used
        self.rows -= n
        return StoredPairs(tuple(pieces))

    def clear(self) -> None:
        self.held.clear()
        self.rows = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters (buffered records are not saved: a resumed run samples afresh)."""
        return {"pairs_seen": self.seen, "pairs_dropped_stale": self.dropped, "staleness_hist": self.histogram,
                "trained_age_hist": self.trained_age}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.dropped = int(state["pairs_seen"]), int(state["pairs_dropped_stale"])
        self.histogram = dict(state["staleness_hist"])
        self.trained_age = dict(state.get("trained_age_hist", {}))  # absent in checkpoints of older runs


def mean_age(histogram: dict[str, int]) -> float:
    """The mean of a ``{age: records}`` histogram (NaN when empty)."""
    n = sum(histogram.values())
    return sum(int(k) * v for k, v in histogram.items()) / n if n else float("nan")


def _count(histogram: dict[str, int], value: int, records: int) -> None:
    histogram[str(value)] = histogram.get(str(value), 0) + records
