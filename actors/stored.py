"""Pair records that stay in Ray's object store until a learner rank reads them.

The driver calls ``generate`` with ``num_returns=2``: it fetches only the call's statistics (with the small
``record_summary`` of the records it logs) and keeps the record batch's ObjectRef, its row count and the version
that sampled it. An update hands each learner rank its ``StoredPairs`` share (through rank 0:
``learner.group_lead``): the batches as top-level arguments of ``update``, which Ray moves from the actor's node to
the rank's, and a ``RowLayout`` naming the rows. The latents never pass through the driver; at 64 simulated
actors, fetching, copying and re-sending them (as Arrow shards, one object per rank) cost the driver ~45 ms of its
main thread's CPU an update, two thirds of it.

Torch-free: the scale simulation's learner ranks unpickle it without importing torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class StoredPairs:
    """Rows of record batches in the object store, in training order: ``(ObjectRef, first row, rows)`` pieces."""

    pieces: tuple[tuple[Any, int, int], ...]

    def __len__(self) -> int:
        return sum(rows for _, _, rows in self.pieces)

    def split(self, k: int) -> list[StoredPairs]:
        """``k`` contiguous shares (``shard_bounds``)."""
        return [self._rows(a, b) for a, b in itertools.pairwise(shard_bounds(len(self), k))]

    def _rows(self, start: int, end: int) -> StoredPairs:
        pieces, at = [], 0  # at: the first row of the current piece in the whole
        for ref, first, rows in self.pieces:
            lo, hi = max(start, at), min(end, at + rows)
            if lo < hi:
                pieces.append((ref, first + lo - at, hi - lo))
            at += rows
        return StoredPairs(tuple(pieces))

    def send(self, method: Any, *leading: Any) -> Any:
        """``method.remote(*leading, layout, *batches)``: the record batches as top-level arguments, which Ray
        moves to the callee before the call runs (rather than references nested in an argument, which would make
        the callee a borrower that the driver, their owner, tracks), and a ``RowLayout`` of the rows to train on."""
        layout = RowLayout(tuple((first, rows) for _, first, rows in self.pieces))
        return method.remote(*leading, layout, *(ref for ref, _, _ in self.pieces))


@dataclass(frozen=True)
class RowLayout:
    """The ``(first row, rows)`` of each record batch that ``StoredPairs.send`` passes, in training order."""

    pieces: tuple[tuple[int, int], ...]

    def assemble(self, batches: tuple[pa.RecordBatch, ...]) -> pa.Table:
        """The rows as one table (one chunk per piece; ``actors.records.from_table`` joins them in its one copy)."""
        return pa.Table.from_batches([b.slice(first, rows)
                                      for b, (first, rows) in zip(batches, self.pieces, strict=True)])


def shard_bounds(n: int, k: int) -> list[int]:
    """The row bounds of ``k`` contiguous shares of ``n`` rows whose sizes differ by at most one."""
    return [n * i // k for i in range(k + 1)]


def record_summary(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """What the driver logs of a call's records (learner.report.RolloutStats): copies of the chosen samples'
    rewards and, for step pairs, their step indices and whether guidance moved the winner; a few bytes a pair
    against the pair's latents."""
    names = [n for n in ("reward_w", "step_index", "guided") if n in batch.schema.names]
    return {n: batch.column(n).to_numpy(zero_copy_only=False).copy() for n in names}
