"""Dense-reward DPO (Yang et al.): per-step log-ratios clipped at κ, scaled by C, summed over M steps drawn from
Cat(γ^k) shared by the pair (trajectory pairs); a step pair is the one-step case (M = 1, its branching step)."""

from __future__ import annotations

from learner.losses import dense_dpo_loss
from learner.methods.registry import register_method


@register_method("dense_dpo", "step")
def on_steps(learner, batch):
    lw, ll, extra = learner.step_logratios(batch)
    _, weight = learner.time_weighting.weigh(batch.tensors["step_index"])  # the discount of the branching step
    loss = learner.cfg.loss
    return dense_dpo_loss(lw[:, None], ll[:, None], scale_c=loss.scale_c, kappa=loss.kappa,
                          step_weights=weight[:, None].to(learner.device)), extra


@register_method("dense_dpo", "trajectory")
def on_trajectories(learner, batch):
    b, m = len(batch), learner.cfg.loss.num_step_samples
    steps = learner.time_weighting.sample(m, learner.generator)
    lw, ll, extra = learner.trajectory_logratios(batch, steps.index.expand(b, m))
    weights = steps.weight.to(learner.device) if learner.cfg.time_weight.discount_as == "weight" else None
    loss = learner.cfg.loss
    return dense_dpo_loss(lw, ll, scale_c=loss.scale_c, kappa=loss.kappa, step_weights=weights), extra
