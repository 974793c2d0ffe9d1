"""The learner role: recompute log-probs under policy and reference, apply the configured loss, step, publish.

A plain class (Ray wraps it at launch). It holds one frozen base UNet with a trainable "policy" LoRA adapter
and, when the reference moves, a "ref" adapter; a frozen reference is the base with adapters disabled.
With ``train.trainable: full`` the UNet itself is trained and the initial model, the moving reference and the
divergence candidate are frozen whole-UNet copies under the same names (DiffusionPolicy.train_full), so every
loss, reference strategy and checkpoint works unchanged.
Loss × time weighting × reference strategy are independent config choices; every combination runs except
dense_dpo with timestep_aware (λ(t) scales β, which dense_dpo does not have).
Each loss is a method registered per pair kind in learner/methods/ (one module per loss); this class gives
them the shared pieces: log-ratios of step and trajectory pairs, the denoising MSE, the time weighting and the
reference; noising, training targets and timestep grids come from the policy's noise process (``policy.process``).
With ``reference.compute_on: actors`` the records carry log π_ref from the rollout actors; an update uses them
(skipping its reference forward) only when every row's came from the reference held now, else it recomputes the
whole batch's and counts the rows (``ref_recomputed``), so stored and recomputed values are never mixed.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from actors.records import PairBatch, from_table, reference_columns
from actors.reward import RewardClient
from actors.stored import RowLayout
from learner.checkpoint import (
    RngSnapshot,
    capture_rng,
    optimizer_state_to_tensors,
    restore_rng,
    tensors_to_optimizer_state,
)
from learner.config import Config
from learner.group_lead import GroupLead
from learner.losses import PairLoss
from learner.methods import find_method
from learner.methods.context import MethodContext
from learner.reference import build_reference, divergence_estimate, kernel_kl
from learner.time_weighting import TimeWeighting
from policy import POLICY, REF, DiffusionPolicy
from policy.lora import snapshot
from policy.transport import OBJECT_STORE, Transport
from rewards.registry import build_reward

CANDIDATE = "candidate"  # scratch adapter where a reference candidate is evaluated
DIVERGENCE_TIMESTEPS = 4  # timesteps at which each winner is probed to estimate D
GROUP_TIMEOUT_S = 600  # a learner rank waiting this long for a collective gives up (a peer died or hangs)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: training has diverged."""


class Learner(GroupLead):
    def __init__(self, cfg: Config, own_reward_handles: Sequence[Any] = ()):
        torch.set_num_threads(cfg.train.torch_threads)
        self.cfg = cfg
        self.method = find_method(cfg.loss.kind, cfg.pairs.record_kind)
        torch.manual_seed(cfg.train.seed)
        self.policy = DiffusionPolicy.from_pretrained(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.sampler)
        self.device = self.policy.device
        full = cfg.train.trainable == "full"
        if full:
            self.policy.train_full()
        else:
            self.policy.add_lora(POLICY, cfg.lora, trainable=True)
        self.moving_ref = cfg.reference.strategy == "stable_update"
        self.reference = build_reference(cfg.reference)
        if self.moving_ref:
            for name in (REF, CANDIDATE):
                if full:
                    self.policy.add_copy(name)
                else:
                    self.policy.add_lora(name, cfg.lora, trainable=False)
        self.params = self.policy.trainable_parameters()
        self.weight_dtype = getattr(torch, cfg.train.weight_dtype) if cfg.train.weight_dtype else None
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.time_weighting = TimeWeighting(cfg.time_weight, self.policy.process)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.rank, self.world = 0, 1  # position in a data-parallel learner group (learner/group.py)
        self._store: dist.TCPStore | None = None  # rank 0 of a group: the rendezvous it serves
        self.step = 0  # optimizer steps taken
        self.version = 0  # the last published policy version
        self._published: dict[str, torch.Tensor] | None = None  # its snapshot
        self.nan_in_a_row = 0
        self.nan_total = 0
        self._eval_reward: RewardClient | None = None
        self._own_rewards = list(own_reward_handles)  # reward actors in their own environments (evaluation)
        self._last_x0_w: torch.Tensor | None = None
        self.divergences: dict[str, float] = {}  # the last check's D under each divergence (this rank's)
        self._last_prompts: list[str] = []

    # ---- the update ---------------------------------------------------------------------------------------------
    def update(self, records: pa.Table | pa.RecordBatch | PairBatch | RowLayout, *batches: pa.RecordBatch
               ) -> dict[str, float]:
        """One optimizer step on a batch of pairs (or on the rows ``records`` names of ``batches``, as
        ``actors.stored.StoredPairs.send`` passes them); returns metrics. A non-finite loss or gradient skips the
        step."""
        t0, rows0 = time.perf_counter(), self.policy.net_rows
        if isinstance(records, RowLayout):
            records = records.assemble(batches)
        batch = records if isinstance(records, PairBatch) else from_table(records)
        batch, recompute = self._stored_reference(batch)
        self.policy.train_mode(True)
        self.optimizer.zero_grad(set_to_none=True)
        self._remember_winners(batch)  # the whole batch's, not the last micro-batch's: D needs its sample count
        metrics = self._accumulate(batch)
        t = batch.tensors
        metrics["reward_w"] = float(t["reward_w"].mean())
        metrics["reward_l"] = float(t["reward_l"].mean())
        if self.cfg.reference.compute_on == "actors":  # as a share, so that averaging over ranks adds the counts up
            metrics["ref_recomputed"] = recompute / len(batch)
        if self.world > 1:
            metrics = self._average_over_ranks(metrics)
        if "ref_recomputed" in metrics:
            metrics["ref_recomputed"] = float(round(metrics["ref_recomputed"] * metrics["pairs"]))
        if not math.isfinite(metrics["loss"]):
            return self._skip(metrics, "loss")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        if not torch.isfinite(grad_norm):
            return self._skip(metrics, "gradient")
        self.optimizer.step()
        self.policy.train_mode(False)
        self.step += 1
        self.nan_in_a_row = 0
        metrics["grad_norm"] = float(grad_norm)
        if self.step == 1:
            metrics.update(self.memory())
        metrics.update(self._maybe_move_reference())
        metrics["update_seconds"] = time.perf_counter() - t0
        metrics["net_rows"] = float(self.policy.net_rows - rows0)  # this rank's forward passes, divergence included
        return metrics

    def _accumulate(self, batch: PairBatch) -> dict[str, float]:
        """Backward the batch's mean loss in ``train.grad_accum`` micro-batches (each loss weighted by its share of
        the pairs, so the accumulated gradient is the whole batch's); metrics are the pair-weighted means. A
        non-finite micro-batch loss is not backwarded and makes the batch's loss non-finite (the step is skipped)."""
        sums: dict[str, float] = {}
        for part in batch.split(self.cfg.train.grad_accum):
            out, extra = self._loss(part)
            share = len(part) / len(batch)
            m = {"loss": float(out.loss.detach()), "accuracy": float((out.margin > 0).float().mean()),
                 "margin": float(out.margin.mean()), **extra}
            if math.isfinite(m["loss"]):
                (out.loss * share).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + share * v
        return {**sums, "pairs": float(len(batch))}

    # ---- data parallelism -----------------------------------------------------------------------------------------
    def open_rendezvous(self, world: int) -> tuple[str, int]:
        """Rank 0: serve the process group's store on a port the OS picks while binding it (a port chosen first
        and bound later can be taken by another process in between); returns (host, port) for the other ranks."""
        import ray

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, world, True, datetime.timedelta(seconds=GROUP_TIMEOUT_S),
                                    wait_for_workers=False)
        return host, self._store.port

    def join_group(self, backend: str, host: str, port: int, rank: int, world: int) -> None:
        """Become ``rank`` of ``world`` data-parallel learners. Every rank starts from the same seed, so the same
        parameters; its own generator stream (seed + rank) keeps the shards' noise and timestep draws independent."""
        timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
        store = self._store if rank == 0 else dist.TCPStore(host, port, world, False, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        self.rank, self.world = rank, world
        self.generator.manual_seed(self.cfg.train.seed + rank)

    def _average_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Turn this rank's gradients and metrics into those of the whole batch: one all-reduce of (gradients,
        metrics, pair count), each rank's scaled by its shard's size. Every loss is a mean over pairs, so the
        size-weighted mean of the shards' gradients is the gradient of the batch's mean loss; all ranks then clip
        and step identically. A rank whose loss is not finite sends zero gradients and a non-finite loss, so every
        rank skips the step together."""
        keys = sorted(metrics)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        tail = torch.tensor([*(metrics[k] for k in keys), 1.0], device=self.device)
        flat = torch.cat([*(g.float().flatten() for g in grads), tail]) * metrics["pairs"]
        dist.all_reduce(flat)
        pairs = float(flat[-1])  # the whole batch's
        flat /= pairs
        grad_flat, tail = flat[: -len(tail)], flat[-len(tail) :]
        for p, g in zip(self.params, grad_flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p).to(p.dtype)
        return {**dict(zip(keys, tail[:-1].tolist(), strict=True)), "pairs": pairs}

    def memory(self) -> dict[str, float]:
        """Bytes held for training (reported with the first update): trainable parameters, the optimizer's state
        (AdamW: two moments per parameter), and every UNet weight held (frozen copies included)."""
        def nbytes(tensors) -> float:
            return float(sum(t.numel() * t.element_size() for t in tensors))

        unets = {id(m): m for m in (self.policy.unet, *self.policy.copies())}
        return {"memory/trainable_bytes": nbytes(self.params),
                "memory/optimizer_bytes": nbytes(v for s in self.optimizer.state.values() for v in s.values()
                                                 if isinstance(v, torch.Tensor)),
                "memory/unet_bytes": nbytes(p for m in unets.values() for p in m.parameters())}

    def _skip(self, metrics: dict[str, float], what: str) -> dict[str, float]:
        """Drop this step's gradients; ``what`` (loss or gradient) was non-finite."""
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.train_mode(False)
        self.nan_in_a_row += 1
        self.nan_total += 1
        metrics.update(skipped_nonfinite=1.0, nonfinite_total=float(self.nan_total))
        if self.nan_in_a_row >= self.cfg.train.max_nan_steps:
            raise NonFiniteLossError(
                f"{self.nan_in_a_row} steps in a row with a non-finite loss or gradient (the last: its {what}) at "
                f"step {self.step}: training diverged; lower train.lr or loss.beta (limit: "
                f"train.max_nan_steps={self.cfg.train.max_nan_steps})")
        return metrics

    @property
    def ref_adapter(self) -> str | None:
        return REF if self.moving_ref and self.reference.state is not None else None

    def _loss(self, batch: PairBatch) -> tuple[PairLoss, dict[str, float]]:
        method = self.method if batch.kind == self.cfg.pairs.record_kind else find_method(
            self.cfg.loss.kind, batch.kind)  # offline data may hold the other kind
        return method(self.method_context(), batch)

    def method_context(self) -> MethodContext:
        """What a method may use (built per update: the reference's adapter changes when it is first replaced)."""
        return MethodContext(self.cfg.loss, self.time_weighting, self.generator, self.device, self.policy.process,
                             self.ref_adapter, self.step_logratios, self.trajectory_logratios,
                             self.trajectory_logprobs, clean_pairs, self.denoising_mse, self.policy.encode_prompts)

    def _stored_reference(self, batch: PairBatch) -> tuple[PairBatch, int]:
        """The batch to train on, and how many of its rows need log π_ref computed here although the actors were to
        store it. Stored values are kept only when every row's came from the reference held now; a row from an
        older (moved) reference, or without them, makes the whole batch recompute (its stored columns dropped)."""
        on_actors, names = self.cfg.reference.compute_on == "actors", reference_columns(batch.kind)
        if not names:
            return batch, 0
        stored = names[0] in batch.tensors
        stale = int((batch.tensors["ref_version"] != self.reference.version).sum()) if stored else len(batch)
        if on_actors and stale == 0:
            return batch, 0
        kept = {k: v for k, v in batch.tensors.items() if k not in names}
        # compute_on=learner: whatever a record stores is ignored, and nothing is counted
        return PairBatch(batch.kind, kept, batch.prompts), stale if on_actors else 0

    def _logratios(self, x_t: torch.Tensor, t: torch.Tensor, emb, *x_prev: torch.Tensor,
                   ref_logps: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """log π_θ − log π_ref of each ``x_prev`` given x_t: one policy and one reference evaluation, or with
        ``ref_logps`` (the actors' float64 log π_ref) the policy's float64 log-prob minus those (docs/math.md §2)."""
        if ref_logps is None:
            with torch.no_grad():
                mu_ref, _, _ = self.policy.mean(x_t, t, emb, adapter=self.ref_adapter)
        mu, sigma, _ = self.policy.mean(x_t, t, emb, adapter=POLICY)
        if ref_logps is not None:
            return [(self.policy.logprob64(x, mu, sigma) - r.to(self.device)).float()
                    for x, r in zip(x_prev, ref_logps, strict=True)]
        return [self.policy.logratio(x, mu, mu_ref, sigma) for x in x_prev]

    def step_logratios(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Winner's and loser's log-ratio [B] of step pairs: both children share x_t, so one policy and one
        reference evaluation per pair give both."""
        t, dev = batch.tensors, self.device
        emb = self.policy.encode_prompts(batch.prompts)
        ref = (t["ref_logp_w"], t["ref_logp_l"]) if "ref_logp_w" in t else None
        lw, ll = self._logratios(t["x_t"].to(dev), t["timestep"].to(dev), emb, t["x_w"].to(dev), t["x_l"].to(dev),
                                 ref_logps=ref)
        return lw, ll, {"kl_ref": float((lw + ll).detach().mean() / 2)}

    def _transitions(self, batch: PairBatch, k: torch.Tensor):
        """The winners' then the losers' transitions at chain positions ``k`` [B, M] of trajectory pairs, flattened:
        x_t, x_{t−1}, t, the prompts' embeddings, and ``gather(column, offset)`` for other per-step columns."""
        t, dev = batch.tensors, self.device
        b, m = k.shape
        rows = torch.arange(b).view(b, 1).expand(b, m)

        def gather(name: str, offset: int = 0) -> torch.Tensor:
            return torch.cat([t[f"{name}_{side}"][rows, k + offset].flatten(0, 1).to(dev) for side in "wl"])

        ts = t["timesteps"][rows, k].flatten().to(dev).repeat(2)
        emb = self.policy.encode_prompts([p for p in batch.prompts for _ in range(m)] * 2)
        return gather("latents"), gather("latents", 1), ts, emb, gather

    def trajectory_logratios(self, batch: PairBatch, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  dict[str, float]]:
        """Winner's and loser's log-ratios [B, M] of trajectory pairs at chain positions ``k`` [B, M]."""
        b, m = k.shape
        x_t, x_prev, ts, emb, gather = self._transitions(batch, k)
        ref = [gather("ref_logps")] if "ref_logps_w" in batch.tensors else None
        (lr,) = self._logratios(x_t, ts, emb, x_prev, ref_logps=ref)
        return lr[: b * m].view(b, m), lr[b * m :].view(b, m), {"kl_ref": float(lr.detach().mean())}

    def trajectory_logprobs(self, batch: PairBatch, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's float64 log-probs [B, M] of the winners' and losers' transitions at chain positions ``k``
        (compared with the sampler's stored ones, as a policy gradient needs)."""
        b, m = k.shape
        x_t, x_prev, ts, emb, _ = self._transitions(batch, k)
        mu, sigma, _ = self.policy.mean(x_t, ts, emb, adapter=POLICY)
        lp = self.policy.logprob64(x_prev, mu, sigma)
        return lp[: b * m].view(b, m), lp[b * m :].view(b, m)

    def _noised(self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noise process's x_t of ``x0`` (kept for tests/test_method_behaviour.py, which noises through it)."""
        return self.policy.process.add_noise(x0, timesteps, noise)

    def denoising_mse(self, x_t, t, emb, target, adapter) -> torch.Tensor:
        """Per-sample ‖f̂ − target‖² (mean over elements) of the plain conditional model output f̂ under
        ``adapter``; ``target`` is the noise process's (ε for DDIM-ε)."""
        out = self.policy.eps(x_t, t, emb, adapter=adapter, guidance_scale=1.0)
        return (out - target).square().flatten(1).mean(1)

    # ---- reference ----------------------------------------------------------------------------------------------
    def _remember_winners(self, batch: PairBatch) -> None:
        if self.moving_ref:
            n = self.cfg.reference.divergence_samples
            self._last_x0_w = clean_pairs(batch)[0][:n].float()
            self._last_prompts = batch.prompts[:n]

    def policy_tensors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.policy.adapter_parameters(POLICY).items()}

    def divergence(self, candidate: dict[str, torch.Tensor]) -> float:
        """D(candidate ‖ initial model) (see learner.reference) on the last batch's winners, each noised at
        DIVERGENCE_TIMESTEPS timesteps spread evenly over the training grid, with noise from a fixed seed.

        One freeze decision is final, so D must not hinge on one lucky draw: from 4 winners at one random t each,
        kernel_kl had a relative s.d. of 50-85% between draws (measured on the embedded world; docs/math.md);
        every winner probed at several t, with fixed noise, brings it to about 1%, and two checks then differ only
        by the candidate and the winners.
        """
        self.policy.copy_into(CANDIDATE, candidate)
        grid = self.time_weighting.grid
        where = torch.linspace(0, len(grid) - 1, min(DIVERGENCE_TIMESTEPS, len(grid))).round().long()
        x0_w = self._last_x0_w
        n, k = len(x0_w), len(where)
        x0 = x0_w.repeat(k, *([1] * (x0_w.ndim - 1))).to(self.device)  # every winner at every timestep
        ts = grid[where].repeat_interleave(n)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.cfg.train.seed)).to(self.device)
        process = self.policy.process
        x_t, target, ts = process.add_noise(x0, ts, noise), process.target(x0, noise, ts), ts.to(self.device)
        emb = self.policy.encode_prompts(self._last_prompts * k)
        with torch.no_grad():
            out_c = self.policy.eps(x_t, ts, emb, adapter=CANDIDATE, guidance_scale=1.0)
            out_i = self.policy.eps(x_t, ts, emb, adapter=None, guidance_scale=1.0)
        both = {"kernel_kl": kernel_kl(out_c, out_i), "log_ratio": divergence_estimate(target, out_c, out_i)}
        self.divergences = {name: float(v) for name, v in both.items()}  # both logged: δ's calibration reads them
        d = both[self.cfg.reference.divergence]
        if self.world > 1:  # every rank decides on the same D (the mean of the ranks' estimates), so all move or freeze
            d = d.detach().clone().reshape(1)
            dist.all_reduce(d)
            d /= self.world
        return float(d)

    def _maybe_move_reference(self) -> dict[str, float]:
        if not self.moving_ref or self._last_x0_w is None:
            return {}
        event = self.reference.maybe_update(self.step, self.policy_tensors(), self.divergence)
        if event is None:
            return {}
        if event.action == "replaced":
            self.policy.copy_into(REF, self.reference.state, self.reference.version)
        return {"ref_divergence": event.divergence, "ref_replaced": float(event.action == "replaced"),
                "ref_reinit": float(event.action == "reinit"),
                **{f"ref_divergence_{name}": d for name, d in self.divergences.items()},
                "ref_frozen": float(self.reference.frozen), "ref_version": float(self.reference.version)}

    # ---- publishing, evaluation ---------------------------------------------------------------------------------
    def send_weights(self, version: int, transport: Transport = OBJECT_STORE, what: str = POLICY) -> Any:
        """Publish the policy adapter as ``version`` over ``transport`` (the driver picks it; see policy.transport).

        The first send of a version snapshots the adapter, so a later re-send (to a restarted actor) carries the
        same weights even after further updates. ``what=REF``: the moving reference, whose ``version`` is its own
        (the driver learns it from the update's ``ref_version``; its state is never changed in place)."""
        if what == REF:
            if version != self.reference.version or self.reference.state is None:
                raise ValueError(f"asked to send reference v{version}; the learner holds v{self.reference.version}")
            return transport.send(self._cast(self.reference.state), version, self.policy.place(REF)[1])
        if version != self.version or self._published is None:
            self.version, self._published = version, self._cast(snapshot(self.policy.unet, self.policy.slot))
        return transport.send(self._published, version, self.policy.slot)

    def _cast(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` in the dtype published weights travel in (``train.weight_dtype``)."""
        return state if self.weight_dtype is None else {k: t.to(self.weight_dtype) for k, t in state.items()}

    def evaluate(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        """Fixed-seed samples of the current policy and their rewards (held-out evaluation)."""
        if self._eval_reward is None:
            main = self.cfg.reward.main_env_spec() if self._own_rewards else self.cfg.reward.spec
            local = build_reward(main, self.cfg.reward.options).to(self.device) if main else None
            self._eval_reward = RewardClient(local, own=self._own_rewards)
        roll = self.policy.sample(prompts, seeds, adapter=POLICY)
        with torch.no_grad():
            rewards = self._eval_reward(roll.images, prompts).float().cpu()
        return {"rewards": rewards, "images": roll.images.cpu()}

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Everything needed to resume exactly: adapter and reference tensors, optimizer, counters, RNG states
        (captured here, in the learner's process, which is where they live)."""
        opt_tensors, opt_skeleton = optimizer_state_to_tensors(self.optimizer.state_dict())
        rng = self.rng_state()
        ref = self.reference.state_dict()
        ref_state = ref.pop("state", None)
        ref["history"] = [list(e) for e in ref.get("history", [])]
        groups = {"policy": {k: v.clone() for k, v in self.policy_tensors().items()}, "optimizer": opt_tensors,
                  "rng": rng.tensors}
        if ref_state is not None:
            groups["ref"] = ref_state
        state = {"step": self.step, "version": self.version, "nan_total": self.nan_total,
                 "nan_in_a_row": self.nan_in_a_row, "reference": ref, "optimizer": opt_skeleton, "rng": rng.json}
        return groups, state

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> int:
        """Load a checkpoint made by ``checkpoint``; returns the step it resumes from."""
        self.policy.copy_into(POLICY, tensors["policy"])
        self.reference.load_state_dict(dict(state["reference"], state=tensors.get("ref")))
        if self.moving_ref and self.reference.state is not None:
            self.policy.copy_into(REF, self.reference.state, self.reference.version)
        self.optimizer.load_state_dict(tensors_to_optimizer_state(tensors["optimizer"], state["optimizer"]))
        self.step, self.version, self._published = int(state["step"]), int(state["version"]), None
        self.nan_total, self.nan_in_a_row = int(state["nan_total"]), int(state["nan_in_a_row"])
        key = "rng" if self.rank == 0 else f"rng_rank{self.rank}"
        if key in state:  # a checkpoint of a group with fewer ranks has none for this one: its own stream goes on
            restore_rng(RngSnapshot(state[key], tensors[key]), {"learner": self.generator})
        return self.step

    def rng_state(self) -> RngSnapshot:
        """This rank's RNG states (a group's checkpoint holds every rank's, so its resume is exact)."""
        return capture_rng({"learner": self.generator})


def clean_pairs(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The winners' and losers' clean latents: a step pair's children's x̂_0, a trajectory's last latent."""
    t = batch.tensors
    if "x0_w" in t:  # step and clean pairs
        return t["x0_w"], t["x0_l"]
    return t["latents_w"][:, -1], t["latents_l"][:, -1]
