"""DPO on the sampler's log-probabilities (D3PO, SPO, TailorPO): −log σ(β λ(t) (Δ_w − Δ_l)), Δ = log π_θ − log π_ref.

Step pairs train at the steps where they branched, weighed by ``TimeWeighting.weigh``; trajectory pairs draw
one step per pair by ``TimeWeighting.sample``, or train every position of ``loss.chain_steps`` (D3PO: all steps),
each a term with the chain's label: the same step terms as step pairs branched at those positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

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
    b, loss = len(batch), ctx.loss
    if loss.chain_steps is None:
        steps = ctx.time_weighting.sample(b, ctx.generator)
        index, beta_scale, weight = steps.index.view(b, 1), steps.beta_scale, steps.weight
    else:
        index = torch.tensor(loss.chain_steps).expand(b, -1)
        beta_scale, weight = (w.reshape(-1) for w in ctx.time_weighting.weigh(index))
    lw, ll, extra = ctx.trajectory_logratios(batch, index)
    return dpo_logprob_loss(lw.reshape(-1), ll.reshape(-1), loss.beta, ratio_clip=loss.ratio_clip,
                            beta_scale=beta_scale.to(ctx.device), weights=weight.to(ctx.device)), \
        {**extra, **trained_steps(index, index.shape[1])}
