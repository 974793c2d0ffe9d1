"""The rollout role: samples chains with the current policy and turns them into preference pairs.

``step_branch`` (TailorPO, docs/math.md §6): at each configured step k, two children of the same x_t are
drawn, each is scored by the reward of its x̂_0 (Tweedie's estimate at the next timestep, decoded by the VAE,
with CFG: our reading where the paper is silent), the preferred child continues the chain. With
``guidance: reward_gradient`` the winner is first pushed up the reward gradient (TailorPO-G; the gradient goes
through x̂_0, i.e. through the UNet, as Guo et al. do) and kept only if its reward rose; the pushed sample
replaces the winner in the record and in the chain, and its log-prob is taken under the same Gaussian.
At steps that do not branch the chain takes one ordinary policy sample.
``trajectory`` (D3PO, dense-reward DPO): two chains per prompt from the same x_T with independent step noise,
ranked by the reward of their final images.
Each call names the weights version it expects, and may carry that version's weights (the object store's
``WeightState``, loaded first and its ``LoadReport`` returned in the stats); a worker holding another version
refuses (the driver then re-sends weights), so no record is ever attributed to the wrong policy.
With ``reference.compute_on: actors`` every stored transition also carries log π_ref (float64, docs/math.md §2)
and the version of the reference that computed it: the initial model for a frozen reference (adapters off, or the
kept initial UNet with full training), the broadcast "ref" weights for a moving one (the initial model until the
first broadcast, as on the learner).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.config import RolloutSettings
from actors.records import to_record_batch
from actors.reward import RewardClient
from actors.stored import record_summary
from policy import POLICY, REF, DiffusionPolicy, LoadReport
from policy.guidance import guidance_eta, reward_gradient_step
from policy.schedule import gaussian_logprob
from policy.transport import OBJECT_STORE, Transport
from rewards.registry import build_reward

SECOND_CHAIN_SEED_OFFSET = 1_000_003  # trajectory pairs: noise seed of the second chain


def guidance_delivery(x: torch.Tensor, moved: torch.Tensor, sigma: torch.Tensor, logp: torch.Tensor,
                      moved_logp: torch.Tensor) -> torch.Tensor:
    """[B, 2] float64: how far guidance moved each winner in units of the step's sampling noise, ‖x⁺ − x‖/(σ√D)
    (D: the latent's size; ~1 moves it as far as the sampler's own noise), and the log π it cost,
    log π(x) − log π(x⁺) (the loss's reduction): what TailorPO-G delivered, beside how often it was accepted."""
    d = x[0].numel()
    delta = (moved.double() - x.double()).flatten(1).norm(dim=1)
    scale = sigma.double().expand_as(x).flatten(1)[:, 0] * math.sqrt(d)
    return torch.stack([delta / scale, logp.double() - moved_logp.double()], dim=1).cpu()


class StaleWeightsError(RuntimeError):
    """The worker does not hold the weights version the caller expects."""


class RolloutWorker:
    def __init__(self, cfg: RolloutSettings, actor_id: int = 0, reward_handles: Sequence[Any] = (),
                 own_reward_handles: Sequence[Any] = ()):
        torch.set_num_threads(cfg.rollout.torch_threads)
        self.cfg = cfg
        self.actor_id = actor_id
        self.policy = DiffusionPolicy.from_pretrained(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.sampler)
        if cfg.trainable == "lora":
            self.policy.add_lora(POLICY, cfg.lora, trainable=False)
        elif cfg.reference_on_actors:  # full training overwrites the UNet: keep the initial model (the reference)
            self.policy.train_full()
            self.policy.unet.requires_grad_(False)
        if cfg.reference_on_actors == "moving":
            if cfg.trainable == "lora":
                self.policy.add_lora(REF, cfg.lora, trainable=False)
            else:
                self.policy.add_copy(REF)
        self.ref_version = 0  # the reference held (0: the initial model)
        self.ref_seconds = 0.0  # spent on log π_ref in the current generate call
        self.weight_dtype = getattr(torch, cfg.weight_dtype) if cfg.weight_dtype else None
        self.version = 0
        self.guided = cfg.guidance.kind == "reward_gradient"
        self.guide_moves: list[torch.Tensor] = []  # guidance_delivery of the winners moved in this generate call
        local = None
        main = cfg.reward.main_env_spec() if own_reward_handles else cfg.reward.spec
        # guidance needs the reward's gradient, so the reward must live here (the Config checked it has one)
        if main and (self.guided or not reward_handles):
            local = build_reward(main, cfg.reward.options).to(self.policy.device)
        self.reward = RewardClient(local, reward_handles, own_reward_handles)

    # ---- weights ----------------------------------------------------------------------------------------------
    def receive_weights(self, payload: Any, transport: Transport = OBJECT_STORE, what: str = POLICY) -> LoadReport:
        """Load the version ``payload`` describes over ``transport`` (see ``Learner.send_weights``); ``what``: the
        policy, or (REF) the moving reference."""
        if what != POLICY and self.cfg.reference_on_actors != "moving":
            raise ValueError(f"actor {self.actor_id} holds no moving reference (reference.compute_on=actors with "
                             "strategy stable_update), so it cannot load one")
        module, slot = self.policy.place(what)
        report = transport.receive(module, payload, slot, self.weight_dtype)
        if what == POLICY:
            self.version = report.version
        else:
            self.ref_version = report.version
        return report

    def _ref_logps(self, x_t: torch.Tensor, t: torch.Tensor, embeds, *x_prev: torch.Tensor) -> list[torch.Tensor]:
        """float64 log π_ref of each ``x_prev`` given x_t (one reference evaluation for all of them)."""
        t0 = time.perf_counter()
        adapter = REF if self.cfg.reference_on_actors == "moving" and self.ref_version > 0 else None
        mu, sigma, _ = self.policy.mean(x_t, t, embeds, adapter=adapter)
        out = [self.policy.logprob64(x, mu, sigma).cpu() for x in x_prev]
        self.ref_seconds += time.perf_counter() - t0
        return out

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], prompt_ids: Sequence[int], seeds: Sequence[int],
                 expected_version: int, round_index: int = 0, weights: Any = None
                 ) -> tuple[pa.RecordBatch, dict[str, Any]]:
        """Pairs for ``prompts`` as an Arrow record batch, plus stats: timings for throughput-adaptive batching, the
        version that sampled the pairs, the records' ``record_summary`` and, when the call carries ``weights``,
        their ``LoadReport`` under ``"load"``. (The driver fetches only the stats: ``actors.stored``.)"""
        load = None if weights is None else self.receive_weights(weights)
        if expected_version != self.version:
            raise StaleWeightsError(
                f"actor {self.actor_id} holds weights v{self.version}, asked for v{expected_version}")
        t0, cpu0, self.ref_seconds, self.guide_moves = time.perf_counter(), time.process_time(), 0.0, []
        rows0 = self.policy.net_rows
        with torch.no_grad():
            kind = self.cfg.pairs.record_kind
            make = self._step_branch if kind == "step" else self._trajectories
            columns = make(list(prompts), list(seeds))
        n = len(prompts)
        chains = n * (2 if kind == "trajectory" else 1)
        slow = self.cfg.rollout.slowdown_s
        if slow:  # simulated slower hardware: extra seconds per chain and denoising step
            time.sleep(slow[self.actor_id % len(slow)] * chains * self.cfg.sampler.num_steps)
        if self.cfg.reference_on_actors:
            columns["ref_version"] = torch.full((len(columns["prompt"]),), self.ref_version)
        columns.update(prompt_id=torch.as_tensor(list(prompt_ids)).repeat(len(columns["prompt"]) // n),
                       policy_version=torch.full((len(columns["prompt"]),), self.version),
                       actor_id=torch.full((len(columns["prompt"]),), self.actor_id),
                       round=torch.full((len(columns["prompt"]),), round_index))
        seconds = time.perf_counter() - t0
        stats: dict[str, Any] = {"chains": float(chains), "seconds": seconds, "ref_seconds": self.ref_seconds,
                                 "net_rows": float(self.policy.net_rows - rows0),
                                 "pairs": float(len(columns["prompt"])), "steps": float(n * self.cfg.sampler.num_steps)}
        if self.policy.device.type == "cpu":  # the work itself, which other processes' load does not stretch
            stats["cpu_seconds"] = time.process_time() - cpu0
        if load is not None:
            stats["load"] = load
        if self.guided:  # [moved winners, 2]: TailorPO-G's delivery, kept out of the records (learner.report)
            stats["guide_moves"] = torch.cat(self.guide_moves).numpy() if self.guide_moves else np.zeros((0, 2))
        batch = to_record_batch(kind, columns)
        return batch, {**stats, "policy_version": self.version, "summary": record_summary(batch)}

    def _rank(self, children: torch.Tensor, k: int, embeds, prompts: list[str]):
        """Rewards of each child's x̂_0 ([2, B]), the x̂_0 and the children's ε̂ at the next timestep."""
        n, b = children.shape[:2]
        x0, eps = self.policy.x0_after_step(children.flatten(0, 1), k, embeds.repeat(n))
        rewards = self.reward(self.policy.decode(x0), prompts * n).view(n, b)
        return rewards, x0.view(children.shape), None if eps is None else eps.view(children.shape)

    def _guide(self, x_w: torch.Tensor, k: int, embeds, prompts: list[str]):
        g = self.cfg.guidance

        def reward_fn(x: torch.Tensor) -> torch.Tensor:
            return self.reward.local(self.policy.decode(self.policy.x0_after_step(x, k, embeds)[0]), prompts)

        eta = guidance_eta(k, len(self.policy.timesteps), g.eta_lo, g.eta_hi)
        with torch.enable_grad():
            return reward_gradient_step(x_w, reward_fn, eta, delta=g.delta, max_grad_norm=g.max_grad_norm)

    def _step_branch(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        pol = self.policy
        branch = set(self.cfg.pairs.branch_steps)
        gens = pol.generators(seeds)
        embeds = pol.encode_prompts(prompts)
        x = pol.initial_latents(gens)
        eps_next: torch.Tensor | None = None  # ε̂ of the current x, when ranking already computed it
        rows: dict[str, list] = {k: [] for k in ("x_t", "x_w", "x_l", "x0_w", "x0_l", "reward_w", "reward_l",
                                                  "logp_w", "logp_l", "guided", "step_index", "timestep")}
        if self.cfg.reference_on_actors:
            rows.update(ref_logp_w=[], ref_logp_l=[])
        for k, t in enumerate(pol.timesteps):
            if k not in branch:
                x, eps_next = pol.step(x, t, embeds, gens, eps=eps_next).x_prev, None
                continue
            out = pol.branch(x, t, embeds, 2, gens, eps=eps_next)
            rewards, x0, eps = self._rank(out.x_prev, k, embeds, prompts)
            w = (rewards[1] > rewards[0]).long()  # index of the winner per sample
            idx = torch.arange(len(prompts))
            x_w, x_l = out.x_prev[w, idx], out.x_prev[1 - w, idx]
            logp_w, logp_l = out.logprob[w, idx], out.logprob[1 - w, idx]
            r_w, r_l = rewards[w, idx], rewards[1 - w, idx]
            x0_w, x0_l = x0[w, idx], x0[1 - w, idx]
            eps_next = None if eps is None else eps[w, idx]
            guided = torch.zeros(len(prompts), dtype=torch.bool)
            if self.guided:
                res = self._guide(x_w, k, embeds, prompts)
                guided = res.accepted.cpu()
                if bool(guided.any()):
                    moved_logp = gaussian_logprob(res.x, out.mean, out.sigma, self.cfg.sampler.logprob_reduce)
                    self.guide_moves.append(guidance_delivery(x_w, res.x, out.sigma, logp_w, moved_logp)[guided])
                    x_w, logp_w = res.x, moved_logp
                    r_w = torch.where(guided, res.reward_after.cpu(), r_w)
                    # the moved winner's, reused by the next step
                    x0_w, eps_next = self.policy.x0_after_step(x_w, k, embeds)
            for name, value in (("x_t", x), ("x_w", x_w), ("x_l", x_l), ("x0_w", x0_w), ("x0_l", x0_l),
                                ("reward_w", r_w), ("reward_l", r_l), ("logp_w", logp_w), ("logp_l", logp_l),
                                ("guided", guided)):
                rows[name].append(value.detach().float().cpu() if name != "guided" else value)
            if self.cfg.reference_on_actors:  # the stored children, the guided winner included, under the same σ
                for name, value in zip(("ref_logp_w", "ref_logp_l"), self._ref_logps(x, t, embeds, x_w, x_l),
                                       strict=True):
                    rows[name].append(value)
            rows["step_index"].append(torch.full((len(prompts),), k))
            rows["timestep"].append(torch.full((len(prompts),), float(t)))
            x = x_w
        columns: dict[str, Any] = {k: torch.cat(v) for k, v in rows.items()}
        nb = len(rows["x_t"])
        columns["prompt"] = prompts * nb
        columns["seed"] = torch.as_tensor(seeds).repeat(nb)
        return columns

    def _trajectories(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        pol = self.policy
        x_T = pol.initial_latents(pol.generators(seeds))  # shared start (D3PO)
        seeds_l = [s + SECOND_CHAIN_SEED_OFFSET for s in seeds]
        roll = pol.sample(prompts * 2, seeds + seeds_l, x_T=torch.cat([x_T, x_T]), decode=True)
        b = len(prompts)
        rewards = self.reward(roll.images, prompts * 2).view(2, b)
        w = (rewards[1] > rewards[0]).long()
        idx = torch.arange(b)
        lat = roll.latents.view(roll.latents.shape[0], 2, b, *roll.latents.shape[2:]).permute(1, 2, 0, 3, 4, 5)
        lps = roll.logprobs.view(-1, 2, b).permute(1, 2, 0)
        seed_pair = torch.as_tensor([seeds, seeds_l])
        columns = {}
        if self.cfg.reference_on_actors:  # every step of both chains
            embeds = pol.encode_prompts(prompts * 2)
            ref = torch.stack([self._ref_logps(roll.latents[k], t, embeds, roll.latents[k + 1])[0]
                               for k, t in enumerate(pol.timesteps)]).view(-1, 2, b).permute(1, 2, 0)
            columns.update(ref_logps_w=ref[w, idx], ref_logps_l=ref[1 - w, idx])
        return {**columns, "prompt": prompts, "seed_w": seed_pair[w, idx], "seed_l": seed_pair[1 - w, idx],
                "latents_w": lat[w, idx].float(), "latents_l": lat[1 - w, idx].float(),
                "logps_w": lps[w, idx].float(), "logps_l": lps[1 - w, idx].float(),
                "timesteps": roll.timesteps.float().expand(b, -1), "reward_w": rewards[w, idx],
                "reward_l": rewards[1 - w, idx]}
