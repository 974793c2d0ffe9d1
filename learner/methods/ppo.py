"""The papers' policy-gradient comparator: DDPO-style PPO (Black et al. 2024) with GRPO's group-normalised
advantages (Shao et al. 2024; Flow-GRPO, Liu et al. 2025), on trajectory records: each prompt's two chains are its
group, every chain is trained at M transitions drawn by the time weighting, against the log-probs its sampler
stored (the behaviour policy). No reference and no KL term (DDPO has none)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from learner.losses import PairLoss, group_advantages, ppo_clip_loss
from learner.methods.context import trained_steps
from learner.methods.registry import register_method

if TYPE_CHECKING:
    from actors.records import PairBatch
    from learner.methods.context import MethodContext


@register_method("ppo", "trajectory")
def on_trajectories(ctx: MethodContext, batch: PairBatch) -> tuple[PairLoss, dict[str, float]]:
    b, m = len(batch), ctx.loss.num_step_samples
    steps = ctx.time_weighting.sample(b * m, ctx.generator)
    k = steps.index.view(b, m)
    lp_w, lp_l = ctx.trajectory_logprobs(batch, k)
    t = batch.tensors
    old_w, old_l = (t[name].gather(1, k).to(ctx.device) for name in ("logps_w", "logps_l"))
    adv = group_advantages(torch.stack([t["reward_w"], t["reward_l"]], 1)).to(ctx.device)  # [B, 2]
    loss = ppo_clip_loss(torch.cat([lp_w, lp_l]), torch.cat([old_w, old_l]), torch.cat([adv[:, 0], adv[:, 1]]),
                         ctx.loss.clip_range)
    moved_w, moved_l = (lp_w - old_w).detach(), (lp_l - old_l).detach()  # log π_θ − log π_old
    margin = (moved_w - moved_l).mean(1)  # > 0: the better chain gained probability relative to the worse
    return PairLoss(loss, margin), {"kl_old": float(torch.cat([moved_w, moved_l]).mean()), **trained_steps(k, m)}
