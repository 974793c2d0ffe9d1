"""Rank 0's side of a learner group's update: it hands the other ranks their shares itself.

The driver makes one call per update, to rank 0, instead of one per rank: each Ray call costs the driver ~0.5 ms of
CPU (submitting it, its reply, its references), 16 ranks ~8 ms an update, the largest part of what the driver spends
at 64 actors. Rank 0 receives its own share as ``update``'s arguments and the others' as ``StoredPairs``, starts
their updates with the batches as top-level arguments, makes its own (the gradient all-reduce meets theirs), and
returns once every rank has finished; a dead rank fails the collective and so rank 0's call.

Torch-free: the scale simulation's ranks use it too.
"""

from __future__ import annotations

from typing import Any


class GroupLead:
    """Mixed into a learner rank's class (``Learner``, the simulation's ``SimLearner``), whose ``update`` it calls."""

    peers: tuple[Any, ...] = ()  # the other ranks' actor handles, rank 1 first

    def set_peers(self, peers: list[Any]) -> None:
        self.peers = tuple(peers)

    def update_group(self, shares: list[Any], records: Any, *batches: Any) -> dict[str, float]:
        """Start rank i's update on ``shares[i - 1]``, make rank 0's on ``records`` of ``batches``, wait for all;
        returns rank 0's metrics, which are the whole batch's."""
        import ray

        started = [share.send(peer.update) for peer, share in zip(self.peers, shares, strict=True)]
        metrics = self.update(records, *batches)
        ray.get(started)
        return metrics
