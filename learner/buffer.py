"""The pair buffer between rollouts and the learner; it owns staleness.

A record's staleness is how many versions were published after the one that sampled it. Records staler than
``max_staleness`` are dropped and counted (a bounded off-policy gap), when they arrive and again when the learner
asks for a batch (records that waited while newer versions were published age in the buffer); every record's
staleness on arrival goes into a histogram that the run summary reports, and so does every trained record's age:
the learner updates made between the publish of the version that sampled it and the update that trains on it (how
on-policy the updates are, in the unit the single-process loop has too, whatever the publish cadence).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


class PairBuffer:
    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.batches: list[pa.RecordBatch] = []
        self.seen = 0
        self.dropped = 0
        self.histogram: dict[str, int] = {}  # staleness -> records (str keys: the checkpoint is JSON)
        self.trained_age: dict[str, int] = {}  # age in updates when taken for an update -> records
        self.published_at: dict[int, int] = {}  # version -> learner updates made when it was published

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)

    def accept(self, batch: pa.RecordBatch, version: int) -> np.ndarray:
        """Keep the records of ``batch`` fresh enough for ``version``; returns every record's staleness."""
        staleness = version - batch.column("policy_version").to_numpy()
        _count(self.histogram, staleness)
        self.seen += len(batch)
        self.batches.extend(self._fresh(batch, staleness))
        return staleness

    def ready(self, n: int, version: int) -> bool:
        """Drop what has become too stale for ``version`` while it waited; True when ``n`` pairs remain."""
        self.batches = [kept for batch in self.batches
                        for kept in self._fresh(batch, version - batch.column("policy_version").to_numpy())]
        return len(self) >= n

    def _fresh(self, batch: pa.RecordBatch, staleness: np.ndarray) -> list[pa.RecordBatch]:
        """``batch`` without its records staler than ``max_staleness`` (counted as dropped): the batch itself when
        all are fresh (the usual case: no copy), nothing when none is."""
        keep = staleness <= self.max_staleness
        self.dropped += int((~keep).sum())
        if keep.all():
            return [batch]
        return [batch.filter(pa.array(keep))] if keep.any() else []

    def published(self, version: int, step: int) -> None:
        """Note that ``version`` was published after ``step`` learner updates."""
        self.published_at.setdefault(version, step)

    def take(self, n: int, step: int) -> pa.Table:
        """The oldest ``n`` pairs, for the update after ``step`` (only the batches that hold them are copied into one
        chunk: a long backlog is not copied at every update)."""
        used = int(np.searchsorted(np.cumsum([len(b) for b in self.batches]), n)) + 1  # batches holding them
        table = pa.Table.from_batches(self.batches[:used]).combine_chunks()
        rest = table.slice(n)
        self.batches = [*(rest.to_batches() if len(rest) else []), *self.batches[used:]]
        taken = table.slice(0, n)
        versions = taken.column("policy_version").to_numpy()
        _count(self.trained_age, step - np.array([self.published_at.get(int(v), step) for v in versions]))
        return taken

    def clear(self) -> None:
        self.batches = []

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


def _count(histogram: dict[str, int], values: np.ndarray) -> None:
    for v, c in zip(*np.unique(values, return_counts=True), strict=True):
        histogram[str(v)] = histogram.get(str(v), 0) + int(c)
