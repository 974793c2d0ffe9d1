"""DPO on the sampler's log-probabilities (D3PO, SPO, TailorPO): −log σ(β λ(t) (Δ_w − Δ_l)), Δ = log π_θ − log π_ref.

Step pairs train at the steps where they branched, weighed by ``TimeWeighting.weigh``; trajectory pairs draw
one step per pair (D3PO's matching steps) by ``TimeWeighting.sample``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from learner.losses import dpo_logprob_loss
from learner.methods.context import trained_steps
from learner.methods.registry import register_method

if TYPE_CHECKING:
    from actors.records import PairBatch
    from learner.losses import PairLoss
    from learner.methods.context import MethodContext


@register_method("dpo_logprob", "step")
def on_steps(ctx: MethodContext, batch: PairBatch) -> tuple[PairLoss, dict[str, float]]:
    lw, ll, extra = ctx.step_logratios(batch)
    beta_scale, weight = ctx.time_weighting.weigh(batch.tensors["step_index"])
    loss = ctx.loss
    return dpo_logprob_loss(lw, ll, loss.beta, ratio_clip=loss.ratio_clip, beta_scale=beta_scale.to(ctx.device),
                            weights=weight.to(ctx.device)), {**extra, **trained_steps(batch.tensors["step_index"], 1)}


@register_method("dpo_logprob", "trajectory")
def on_trajectories(ctx: MethodContext, batch: PairBatch) -> tuple[PairLoss, dict[str, float]]:
    b = len(batch)
    steps = ctx.time_weighting.sample(b, ctx.generator)
    lw, ll, extra = ctx.trajectory_logratios(batch, steps.index.view(b, 1))
    loss = ctx.loss
    return dpo_logprob_loss(lw[:, 0], ll[:, 0], loss.beta, ratio_clip=loss.ratio_clip,
                            beta_scale=steps.beta_scale.to(ctx.device),
                            weights=steps.weight.to(ctx.device)), {**extra, **trained_steps(steps.index, 1)}
