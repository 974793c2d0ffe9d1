"""The driver's side of weight transport: publish versions, verify every actor's load, re-send after a restart.

Which transport carries the bytes is a ``policy.transport.Transport``; this part only knows its interface.
Over the object store a publish is one ``ray.put``: an actor that holds an older version gets the newest with its
next ``generate`` (``attach``), so a publish costs the driver no call per actor. The first publish, and every
publish over a collective (a broadcast needs every rank), load the version into every actor at once.
Every actor load reports (version, keys, checksum) and a checksum that differs from the sent one stops the run.
A rollout actor that dies is restarted by Ray (``max_restarts=-1``, ``max_task_retries=0``); it then gets the
published version again, over the object store, since a restarted actor is no longer in a collective group.
With ``reference.compute_on: actors`` a moved stable reference travels the same way (``publish_reference``), is
verified the same way, and a restarted actor gets it again too.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from learner.metrics import RunLogger
from policy.lora import POLICY, REF
from policy.transport import OBJECT_STORE, Collective, Getter, ObjectStore, Transport

RESTART_WAIT_S = 120  # how long a rollout actor may take to come back after a failure


class WeightSyncError(RuntimeError):
    """An actor reports weights that differ from what was published (a silent no-op sync)."""


class ActorLostError(RuntimeError):
    """An actor that Ray should restart did not come back in time; the run can only continue from a checkpoint."""


def open_transport(kind: str, backend: str, learner: Any, actors: list[Any], on_gpus: bool, logger: RunLogger
                   ) -> Transport:
    """The configured transport (``train.weight_sync``); a collective group holds the learner and every actor."""
    if kind == "object_store" or not actors:
        return OBJECT_STORE
    backend = ("nccl" if on_gpus else "gloo") if backend == "auto" else backend
    group = f"dpr-weights-{time.time_ns():x}"
    logger.event("collective_group", name=group, backend=backend, size=len(actors) + 1)
    return Collective.create([learner, *actors], backend, group)


class WeightSync:
    def __init__(self, transport: Transport, learner: Any, actors: list[Any], get: Getter, logger: RunLogger):
        self.transport, self.learner, self.actors, self.get, self.logger = transport, learner, actors, get, logger
        self.version = 0  # the last published version
        self.checksum = ""
        self.payload: Any = None  # object store: the last published version's ref, carried by generate calls
        self.failures = 0  # rollout actors restarted so far
        self.held = [-1] * len(actors)  # the version each rollout actor has verifiably loaded
        self.attached: dict[int, tuple[int, str]] = {}  # actor -> (version, checksum) its in-flight generate carries
        # (actor, LoadReport ref, (version, checksum) sent, POLICY or REF) not yet verified
        self.pending: list[tuple[int, Any, tuple[int, str], str]] = []
        self.reward_pids: list[int] | None = None  # each reward actor's process, to notice a silent restart
        self.ref_version, self.ref_checksum = 0, ""  # the moving reference last broadcast (0: none, the initial model)

    def publish(self, new_version: bool = True) -> None:
        """Publish the policy (a new version, or the current one again): into every rollout actor now when no
        version was published yet or over a collective; else only into the object store, for ``attach``."""
        everyone = self.payload is None or not isinstance(self.transport, ObjectStore)
        sent = self.transport.publish(self.learner, self.actors if everyone else [], self.version + int(new_version),
                                      self.get)
        self.version, self.checksum, self.payload = sent.version, sent.checksum, sent.payload
        self.pending.extend((actor, ref, (sent.version, sent.checksum), POLICY) for actor, ref in enumerate(sent.loads))

    def attach(self, actor: int) -> Any:
        """The weights ``actor``'s next ``generate`` carries: the published version's ref while the actor has not
        verifiably loaded it (object store), else None."""
        if self.payload is None or self.held[actor] == self.version:
            return None
        self.attached[actor] = (self.version, self.checksum)
        return self.payload

    def landed(self, actor: int, report: Any) -> None:
        """Verify the load that a finished ``generate`` of ``actor`` reports for the weights it carried."""
        sent = self.attached.pop(actor, None)
        if sent is not None:
            self._verify(actor, report, sent)

    def publish_reference(self, version: int) -> None:
        """Send the learner's moved reference, ``version``, to every rollout actor (they compute log π_ref)."""
        sent = self.transport.publish(self.learner, self.actors, version, self.get, what=REF)
        self.ref_version, self.ref_checksum = sent.version, sent.checksum
        self.pending.extend((actor, ref, (sent.version, sent.checksum), REF) for actor, ref in enumerate(sent.loads))
        self.logger.event("reference_published", version=sent.version, checksum=sent.checksum)

    def check(self, block: bool = False) -> None:
        """Verify the published loads that have finished (all of them when ``block``)."""
        if not self.pending:
            return
        refs = [ref for _, ref, _, _ in self.pending]
        done = set(ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)[0])
        for actor, ref, sent, what in self.pending:
            if ref in done:  # an actor that died is recovered when its generate fails, so its load is skipped
                with contextlib.suppress(RayActorError):
                    self._verify(actor, ray.get(ref), sent, what)
        self.pending = [p for p in self.pending if p[1] not in done]

    def recover(self, actor: int, error: Exception) -> None:
        """A rollout actor failed: wait for Ray to restart it, then give it the published version again."""
        self.failures += 1
        self.logger.event("actor_failed", role="rollout", actor=actor, error=type(error).__name__,
                          version=self.version)
        if not isinstance(self.transport, ObjectStore):
            self.logger.event("weight_sync_fallback", transport=OBJECT_STORE.name, was=self.transport.name)
            self.transport = OBJECT_STORE
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                (load,) = OBJECT_STORE.publish(self.learner, [self.actors[actor]], self.version, self.get).loads
                self.attached.pop(actor, None)  # what its lost call carried is superseded by this load
                self._verify(actor, ray.get(load, timeout=60), (self.version, self.checksum))
                if self.ref_version:  # a restarted actor's reference is the initial model again
                    (load,) = OBJECT_STORE.publish(self.learner, [self.actors[actor]], self.ref_version, self.get,
                                                   REF).loads
                    self._verify(actor, ray.get(load, timeout=60), (self.ref_version, self.ref_checksum), REF)
                break
            except RayActorError as e:
                if time.monotonic() > deadline:
                    raise ActorLostError(f"rollout actor {actor} did not come back within {RESTART_WAIT_S} s after "
                                         f"a failure ({type(e).__name__})") from None
                time.sleep(0.5)
        self.logger.event("actor_recovered", role="rollout", actor=actor, version=self.version)

    def recover_rewards(self, rewards: list[Any], seen_by: int, error: Exception) -> None:
        """A reward actor failed during rollout actor ``seen_by``'s call: wait until Ray has restarted every
        reward actor (each answers again), so that the caller can send the lost call again."""
        self.failures += 1
        self.logger.event("actor_failed", role="reward", seen_by=seen_by, error=str(getattr(error, "cause", error)))
        self.reward_pids = self._reward_processes(rewards)
        self.logger.event("actor_recovered", role="reward", seen_by=seen_by)

    def watch_rewards(self, rewards: list[Any]) -> None:
        """Log a reward actor that Ray restarted between two calls (its process changed): no call failed, so
        nothing is re-sent, but every failure is counted. The first call records the processes."""
        pids = self._reward_processes(rewards)
        for i, (old, new) in enumerate(zip(self.reward_pids or pids, pids, strict=True)):
            if old != new:
                self.failures += 1
                self.logger.event("actor_failed", role="reward", actor=i, error="restarted between calls")
                self.logger.event("actor_recovered", role="reward", actor=i)
        self.reward_pids = pids

    def _reward_processes(self, rewards: list[Any]) -> list[int]:
        """Each reward actor's process id, once it answers (waiting for Ray to restart one that is down)."""
        deadline = time.monotonic() + RESTART_WAIT_S
        pids = []
        for i, handle in enumerate(rewards):
            while True:
                try:
                    pids.append(ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=30))
                    break
                except (RayActorError, GetTimeoutError) as e:
                    if time.monotonic() > deadline:
                        raise ActorLostError(f"reward actor {i} did not come back within {RESTART_WAIT_S} s after a "
                                             f"failure ({type(e).__name__})") from None
                    time.sleep(0.5)
        return pids

    def _verify(self, actor: int, report: Any, sent: tuple[int, str], what: str = POLICY) -> None:
        """``report`` (a LoadReport, None when the actor sent none) must show the (version, checksum) of ``what``
        (the policy or the moving reference) that was sent."""
        version, checksum = sent
        if report is None or (report.version, report.checksum) != sent:
            got = "no load report" if report is None else f"v{report.version} with checksum {report.checksum}"
            raise WeightSyncError(f"rollout actor {actor} loaded {got}, sent {what} v{version} with checksum "
                                  f"{checksum}: weights did not land")
        if what == POLICY:
            self.held[actor] = version
        else:
            self.logger.event("reference_loaded", actor=actor, version=version, checksum=checksum)
