"""How the policy travels from the learner to the rollout actors: one interface, one class per transport.

A transport is a small picklable object with three halves, each run where it belongs: ``publish`` in the
driver (it calls the learner's ``send_weights`` and the given rollout actors' ``receive_weights``, both of which
take the transport as an argument), ``send`` in the learner, ``receive`` in a rollout actor. ``send`` reads a
snapshot the learner took when it first published the version, so a re-send after an update still carries
exactly the weights that version names. Every ``receive`` returns ``LoadReport(version, keys matched,
checksum)`` computed from what the actor's module now holds; the driver compares it with the sent checksum, so
a load that silently did nothing stops the run. A new transport (say CUDA IPC) is one more subclass here.
``what`` names which weights travel: the policy (POLICY) or a moving reference (REF, broadcast when the stable
reference moves and the actors compute log π_ref); both take the same path and checks.
``slot`` names where the weights live in the UNet on both ends (``policy.DiffusionPolicy.slot``): the POLICY
adapter, or ``None`` for the UNet itself. A full UNet travels in the dtype the learner cast it to
(``train.weight_dtype``: bfloat16 halves the bytes) and, over a collective, in buckets of at most
``BUCKET_BYTES``, so that no 1-D copy of the whole model (3.4 GB for SD-1.5 in float32) is ever made.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from policy.lora import (
    POLICY,
    LoadReport,
    WeightState,
    adapter_parameters,
    checksum,
    copy_into,
    load_state,
    pack_state,
)

Getter = Callable[[Any], Any]  # the driver's ray.get of a learner call (turns the learner's death into one line)
BUCKET_BYTES = 256 << 20  # one collective broadcast carries at most this much (a larger tensor goes alone)


def buckets(nbytes: dict[str, int], max_bytes: int | None = None) -> list[list[str]]:
    """Sorted keys cut into consecutive runs of at most ``max_bytes`` (default ``BUCKET_BYTES``): the same cut on
    both ends of a broadcast."""
    max_bytes = max_bytes or BUCKET_BYTES
    out: list[list[str]] = [[]]
    size = 0
    for key in sorted(nbytes):
        if out[-1] and size + nbytes[key] > max_bytes:
            out.append([])
            size = 0
        out[-1].append(key)
        size += nbytes[key]
    return out


@dataclass(frozen=True)
class Published:
    """What the driver gets back from a publish: the version, its checksum, one LoadReport ref per actor it was
    sent to, and (object store) the ref of the weights, which an actor's next ``generate`` can carry instead."""

    version: int
    checksum: str
    loads: list[Any]
    payload: Any = None


class Transport(ABC):
    name: str

    @abstractmethod
    def publish(self, learner: Any, actors: list[Any], version: int, get: Getter, what: str = POLICY) -> Published:
        """Driver: send ``version`` of ``what`` from the learner to ``actors`` (which may be none, where the
        transport can deliver it later); the actors' loads are left in flight."""

    @abstractmethod
    def send(self, tensors: dict[str, torch.Tensor], version: int, slot: str | None) -> Any:
        """Learner: put the snapshot ``tensors`` of ``version`` on the wire; returns what ``publish`` needs."""

    @abstractmethod
    def receive(self, unet: torch.nn.Module, payload: Any, slot: str | None, dtype: torch.dtype | None = None
                ) -> LoadReport:
        """Rollout actor: load the version described by ``payload`` into ``slot``; ``dtype``: the one it was sent in
        (None: the actor's own)."""


class ObjectStore(Transport):
    """safetensors bytes in Ray's object store: the learner's ``send_weights`` result, one object per version, and
    the same ref to every actor (the driver reads the version and checksum from it, and puts nothing itself).

    The driver hands the ref to an actor with its next ``generate`` (``Published.payload``), which loads it before
    sampling: the version lands exactly at the rollout boundary, without one extra call per actor and publish."""

    name = "object_store"

    def publish(self, learner: Any, actors: list[Any], version: int, get: Getter, what: str = POLICY) -> Published:
        ref = learner.send_weights.remote(version, self, what)
        state: WeightState = get(ref)
        return Published(state.version, state.checksum, [a.receive_weights.remote(ref, self, what) for a in actors],
                         ref)

    def send(self, tensors: dict[str, torch.Tensor], version: int, slot: str | None) -> WeightState:
        return pack_state(tensors, slot, version)

    def receive(self, unet: torch.nn.Module, payload: WeightState, slot: str | None, dtype: torch.dtype | None = None
                ) -> LoadReport:
        return load_state(unet, payload, into=slot)


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

    def publish(self, learner: Any, actors: list[Any], version: int, get: Getter, what: str = POLICY) -> Published:
        loads = [a.receive_weights.remote(version, self, what) for a in actors]  # every rank must join the broadcast
        return Published(version, get(learner.send_weights.remote(version, self, what)), loads)

    def send(self, tensors: dict[str, torch.Tensor], version: int, slot: str | None) -> str:
        import ray.util.collective as col

        for keys in buckets({k: t.numel() * t.element_size() for k, t in tensors.items()}):
            col.broadcast(torch.cat([tensors[k].reshape(-1) for k in keys]), src_rank=0, group_name=self.group)
        return checksum(tensors)

    def receive(self, unet: torch.nn.Module, payload: int, slot: str | None, dtype: torch.dtype | None = None
                ) -> LoadReport:
        import ray.util.collective as col

        params = adapter_parameters(unet, slot)
        first = next(iter(params.values()))
        dtype = dtype or first.dtype  # one dtype for the whole state, as the learner's snapshot has
        got: dict[str, torch.Tensor] = {}
        for keys in buckets({k: p.numel() * dtype.itemsize for k, p in params.items()}):
            buffer = torch.empty(sum(params[k].numel() for k in keys), dtype=dtype, device=first.device)
            col.broadcast(buffer, src_rank=0, group_name=self.group)
            parts = torch.split(buffer, [params[k].numel() for k in keys])
            got.update({k: part.view(params[k].shape) for k, part in zip(keys, parts, strict=True)})
        return copy_into(unet, slot, got, payload)


OBJECT_STORE = ObjectStore()
