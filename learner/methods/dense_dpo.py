"""Dense-reward DPO (Yang et al.): per-step log-ratios clipped at κ, scaled by C, summed over M steps drawn from
Cat(γ^k) shared by the pair (trajectory pairs); a step pair is the one-step case (M = 1, its branching step)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from learner.losses import dense_dpo_loss
from learner.methods.context import trained_steps
from learner.methods.registry import register_method

if TYPE_CHECKING:
    from actors.records import PairBatch
    from learner.losses import PairLoss
    from learner.methods.context import MethodContext


@register_method("dense_dpo", "step")
def on_steps(ctx: MethodContext, batch: PairBatch) -> tuple[PairLoss, dict[str, float]]:
    lw, ll, extra = ctx.step_logratios(batch)
    _, weight = ctx.time_weighting.weigh(batch.tensors["step_index"])  # the discount of the branching step
    loss = ctx.loss
    return (dense_dpo_loss(lw[:, None], ll[:, None], scale_c=loss.scale_c, kappa=loss.kappa,
                           step_weights=weight[:, None].to(ctx.device)),
            {**extra, **trained_steps(batch.tensors["step_index"], 1)})


@register_method("dense_dpo", "trajectory")
def on_trajectories(ctx: MethodContext, batch: PairBatch) -> tuple[PairLoss, dict[str, float]]:
    b, m = len(batch), ctx.loss.num_step_samples
    steps = ctx.time_weighting.sample(m, ctx.generator)
    lw, ll, extra = ctx.trajectory_logratios(batch, steps.index.expand(b, m))
    weights = steps.weight.to(ctx.device) if ctx.time_weighting.cfg.discount_as == "weight" else None
    loss = ctx.loss
    return (dense_dpo_loss(lw, ll, scale_c=loss.scale_c, kappa=loss.kappa, step_weights=weights),
            {**extra, **trained_steps(steps.index, m)})
