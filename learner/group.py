"""The driver's handle on the learner: one ``Learner`` actor, or K data-parallel ranks that act as one.

With ``train.num_learners: K`` the K ranks form one torch.distributed process group (gloo on CPU, nccl on GPUs).
Every update's batch is cut into K contiguous shards, one per rank (online, references to the rows in the object
store, ``actors.stored``, all sent in one call to rank 0, which starts the others: ``learner.group_lead``); each
rank's backward is followed by one all-reduce of its gradients and metrics weighted by shard size
(``Learner._average_over_ranks``), so every rank clips and steps with the whole batch's gradient and holds the
same parameters and optimizer state. Rank 0 stands for the group wherever one copy suffices: it publishes weights,
evaluates and writes the checkpoint (to which the other ranks add their RNG states); a restore loads every rank.
"""

from __future__ import annotations

import itertools
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayActorError

from actors.records import PairBatch
from actors.stored import StoredPairs, shard_bounds
from policy.transport import Getter


def shard(batch: pa.Table | PairBatch, k: int) -> list[Any]:
    """``batch`` (of at least ``k`` pairs) cut into ``k`` contiguous shards whose sizes differ by at most one."""
    if isinstance(batch, PairBatch):
        return batch.split(k)
    cuts = shard_bounds(len(batch), k)
    return [batch.slice(a, b - a) for a, b in itertools.pairwise(cuts)]


class LearnerGroup:
    def __init__(self, ranks: list[Any]):
        self.ranks = ranks
        self.lead = ranks[0]
        self._followers: dict[Any, list[Any]] = {}  # rank 0's ref of a call → the other ranks' refs of it

    @property
    def size(self) -> int:
        return len(self.ranks)

    def connect(self, backend: str) -> None:
        """Join every rank into one process group; rank 0's node serves the rendezvous."""
        if self.size == 1:
            return
        host, port = ray.get(self.lead.open_rendezvous.remote(self.size))
        ray.get([r.join_group.remote(backend, host, port, i, self.size) for i, r in enumerate(self.ranks)])
        ray.get(self.lead.set_peers.remote(self.ranks[1:]))

    def update(self, batch: pa.Table | PairBatch | StoredPairs) -> Any:
        """Start one update on every rank (a shard each); returns rank 0's ref, whose metrics are the batch's.
        Pairs by reference go to rank 0 alone, which starts the other ranks' shares (``learner.group_lead``);
        the offline loop's tables are sent to every rank by the driver."""
        if isinstance(batch, StoredPairs):
            if self.size == 1:
                return batch.send(self.lead.update)
            own, *others = batch.split(self.size)
            return own.send(self.lead.update_group, others)
        if self.size == 1:
            return self.lead.update.remote(batch)
        return self._all("update", [(s,) for s in shard(batch, self.size)])

    def restore(self, tensors: dict[str, Any], state: dict[str, Any]) -> Any:
        """Load a checkpoint on every rank; returns rank 0's ref."""
        return self._all("restore", [(tensors, state)] * self.size)

    def checkpoint(self, get: Getter) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0's checkpoint ``(groups, state)`` with every other rank's RNG states added."""
        groups, state = get(self.lead.checkpoint.remote())
        for rank, r in enumerate(self.ranks[1:], start=1):
            js, tensors = get(r.rng_state.remote())
            groups[f"rng_rank{rank}"], state[f"rng_rank{rank}"] = tensors, js
        return groups, state

    def get(self, ref: Any) -> Any:
        """``ray.get`` of a group call: rank 0's result, once every rank has finished it (a dead rank raises)."""
        return ray.get([ref, *self._followers.pop(ref, [])])[0]

    def alive(self) -> bool:
        """Whether every rank still answers (a rank's death fails the other ranks' collectives too)."""
        try:
            ray.get([r.__ray_ready__.remote() for r in self.ranks], timeout=30)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return False
        return True

    def _all(self, method: str, args: list[tuple]) -> Any:
        """Call ``method`` on every rank (``args[i]`` for rank i); returns rank 0's ref, the others follow it."""
        refs = [getattr(r, method).remote(*a) for r, a in zip(self.ranks, args, strict=True)]
        self._followers[refs[0]] = refs[1:]
        return refs[0]
