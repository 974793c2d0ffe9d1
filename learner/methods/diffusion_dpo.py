"""Diffusion-DPO (Wallace et al.): the clean latents of a pair (a dataset's VAE-encoded images, final latents,
or a step pair's children's x̂_0) are noised with the same t and ε, and the loss compares the denoising MSE (the
model output against the noise process's target: ε for DDIM-ε, the velocity ε − x_0 for a flow model, as in
Flow-GRPO's DPO) of policy and reference on winner and loser;
t is drawn by the time weighting (Rethinking-DPO: Cat(γ^k) and λ(t))."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from learner.losses import diffusion_dpo_loss
from learner.methods.context import trained_steps
from learner.methods.registry import register_method

if TYPE_CHECKING:
    from actors.records import PairBatch
    from learner.losses import PairLoss
    from learner.methods.context import MethodContext
from policy import POLICY


@register_method("diffusion_dpo", "clean")
@register_method("diffusion_dpo", "step")
@register_method("diffusion_dpo", "trajectory")
def on_clean_pairs(ctx: MethodContext, batch: PairBatch) -> tuple[PairLoss, dict[str, float]]:
    dev, process = ctx.device, ctx.process
    x0 = torch.cat([x.to(dev).float() for x in ctx.clean_pairs(batch)])  # winners, then losers
    b = len(batch)
    steps = ctx.time_weighting.sample(b, ctx.generator)
    noise = torch.randn(x0[:b].shape, generator=ctx.generator).to(dev).repeat(2, 1, 1, 1)  # shared by the pair
    ts = steps.timestep.repeat(2)
    x_t, target, ts = process.add_noise(x0, ts, noise), process.target(x0, noise, ts), ts.to(dev)
    emb = ctx.encode_prompts(batch.prompts * 2)
    with torch.no_grad():
        mse_ref = ctx.denoising_mse(x_t, ts, emb, target, ctx.ref_adapter)
    mse = ctx.denoising_mse(x_t, ts, emb, target, POLICY)
    loss = diffusion_dpo_loss(mse[:b], mse_ref[:b], mse[b:], mse_ref[b:], ctx.loss.beta,
                              beta_scale=steps.beta_scale.to(dev), weights=steps.weight.to(dev))
    return loss, {"kl_ref": float((mse_ref - mse).detach().mean()), **trained_steps(steps.index, 1)}
