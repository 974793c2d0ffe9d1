"""How the policy adapter travels from the learner to the rollout actors: one interface, one class per transport.

A transport is a small picklable object with three halves, each run where it belongs: ``publish`` in the
driver (it calls the learner's ``send_weights`` and every rollout actor's ``receive_weights``, both of which
take the transport as an argument), ``send`` in the learner, ``receive`` in a rollout actor. ``send`` reads a
snapshot the learner took when it first published the version, so a re-send after an update still carries
exactly the weights that version names. Every ``receive`` returns ``LoadReport(version, keys matched,
checksum)`` computed from what the actor's module now holds; the driver compares it with the sent checksum, so
a load that silently did nothing stops the run. A new transport (say CUDA IPC) is one more subclass here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from policy.lora import POLICY, LoadReport, WeightState, checksum, flat_view, load_state, pack_state, unflatten_into

Getter = Callable[[Any], Any]  # the driver's ray.get of a learner call (turns the learner's death into one line)


@dataclass(frozen=True)
class Published:
    """What the driver gets back from a publish: the version, its checksum and one LoadReport ref per actor."""

    version: int
    checksum: str
    loads: list[Any]


class Transport(ABC):
    name: str

    @abstractmethod
    def publish(self, learner: Any, actors: list[Any], version: int, get: Getter) -> Published:
        """Driver: send ``version`` from the learner to ``actors``; the actors' loads are left in flight."""

    @abstractmethod
    def send(self, tensors: dict[str, torch.Tensor], version: int) -> Any:
        """Learner: put the snapshot ``tensors`` of ``version`` on the wire; returns what ``publish`` needs."""

    @abstractmethod
    def receive(self, unet: torch.nn.Module, payload: Any) -> LoadReport:
        """Rollout actor: load the version described by ``payload`` into the policy adapter."""


class ObjectStore(Transport):
    """safetensors bytes in Ray's object store: one ``ray.put`` per version, the same ref to every actor.

    An actor runs its calls in order, so a load queued behind its in-flight ``generate`` lands exactly at
    the rollout boundary."""

    name = "object_store"

    def publish(self, learner: Any, actors: list[Any], version: int, get: Getter) -> Published:
        import ray

        state: WeightState = get(learner.send_weights.remote(version, self))
        ref = ray.put(state)
        return Published(state.version, state.checksum, [a.receive_weights.remote(ref, self) for a in actors])

    def send(self, tensors: dict[str, torch.Tensor], version: int) -> WeightState:
        return pack_state(tensors, POLICY, version)

    def receive(self, unet: torch.nn.Module, payload: WeightState) -> LoadReport:
        return load_state(unet, payload, into=POLICY)


@dataclass(frozen=True)
class Collective(Transport):
    """A ``ray.util.collective`` broadcast from the learner (rank 0) to every rollout actor in ``group``.

    The adapter travels as one flat buffer in sorted-key order (same layout on both ends); gloo on CPU, nccl
    on GPUs. A restarted actor is not in the group any more: the driver then falls back to the object store.
    """

    group: str
    name = "collective"

    @staticmethod
    def create(members: list[Any], backend: str, group: str) -> Collective:
        """Driver: form the group (the learner first, so it is rank 0)."""
        import ray.util.collective as col

        col.create_collective_group(members, world_size=len(members), ranks=list(range(len(members))),
                                    backend=backend, group_name=group)
        return Collective(group)

    def publish(self, learner: Any, actors: list[Any], version: int, get: Getter) -> Published:
        loads = [a.receive_weights.remote(version, self) for a in actors]  # every rank must join the broadcast
        return Published(version, get(learner.send_weights.remote(version, self)), loads)

    def send(self, tensors: dict[str, torch.Tensor], version: int) -> str:
        import ray.util.collective as col

        col.broadcast(torch.cat([t.reshape(-1) for t in tensors.values()]), src_rank=0, group_name=self.group)
        return checksum(tensors)

    def receive(self, unet: torch.nn.Module, payload: int) -> LoadReport:
        import ray.util.collective as col

        buffer = torch.empty_like(flat_view(unet, POLICY)[0])
        col.broadcast(buffer, src_rank=0, group_name=self.group)
        return unflatten_into(unet, POLICY, buffer, payload)


OBJECT_STORE = ObjectStore()
