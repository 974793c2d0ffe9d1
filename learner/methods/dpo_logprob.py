"""DPO on the sampler's log-probabilities (D3PO, SPO, TailorPO): −log σ(β λ(t) (Δ_w − Δ_l)), Δ = log π_θ − log π_ref.

Step pairs train at the steps where they branched, weighed by ``TimeWeighting.weigh``; trajectory pairs draw
one step per pair (D3PO's matching steps) by ``TimeWeighting.sample``.
"""

from __future__ import annotations

from learner.losses import dpo_logprob_loss
from learner.methods.registry import register_method


@register_method("dpo_logprob", "step")
def on_steps(learner, batch):
    lw, ll, extra = learner.step_logratios(batch)
    beta_scale, weight = learner.time_weighting.weigh(batch.tensors["step_index"])
    loss = learner.cfg.loss
    return dpo_logprob_loss(lw, ll, loss.beta, ratio_clip=loss.ratio_clip, beta_scale=beta_scale.to(learner.device),
                            weights=weight.to(learner.device)), extra


@register_method("dpo_logprob", "trajectory")
def on_trajectories(learner, batch):
    b = len(batch)
    steps = learner.time_weighting.sample(b, learner.generator)
    lw, ll, extra = learner.trajectory_logratios(batch, steps.index.view(b, 1))
    loss = learner.cfg.loss
    return dpo_logprob_loss(lw[:, 0], ll[:, 0], loss.beta, ratio_clip=loss.ratio_clip,
                            beta_scale=steps.beta_scale.to(learner.device),
                            weights=steps.weight.to(learner.device)), extra
