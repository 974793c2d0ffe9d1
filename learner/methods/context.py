"""What a preference method sees of the learner: the noise process, the time weighting, the log-ratio and
denoising-MSE functions, and nothing else. Methods never take the ``Learner`` itself, so the learner package has
no import circle (learner.config looks methods up, and the trainer that calls them imports the config)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from actors.records import PairBatch
    from learner.time_weighting import TimeWeighting
    from policy.process import NoiseProcess

LogRatios = tuple["Tensor", "Tensor", dict[str, float]]  # winner's, loser's log π_θ − log π_ref, and metrics


@dataclass(frozen=True)
class MethodContext:
    loss: Any  # the config's ``loss`` section (learner.config imports this package, so it is not typed by it)
    time_weighting: TimeWeighting
    generator: torch.Generator  # the learner's seeded generator: every random draw of a method comes from it
    device: torch.device
    process: NoiseProcess
    ref_adapter: str | None  # the reference's adapter; None: the base model
    step_logratios: Callable[[PairBatch], LogRatios]  # [B] each, from the pairs' shared x_t
    trajectory_logratios: Callable[[PairBatch, Tensor], LogRatios]  # [B, M] each, at chain positions k [B, M]
    trajectory_logprobs: Callable[[PairBatch, Tensor], tuple[Tensor, Tensor]]  # log π_θ [B, M] each, at k
    clean_pairs: Callable[[PairBatch], tuple[Tensor, Tensor]]  # winners' and losers' clean latents
    denoising_mse: Callable[..., Tensor]  # (x_t, t, emb, target, adapter) -> per-sample MSE of the model output
    encode_prompts: Callable[[list[str]], Any]


def trained_steps(index: Tensor, terms_per_pair: int) -> dict[str, float]:
    """What an update trained, for the studies' manipulation checks: the mean position of its steps in the time
    weighting's grid (0: the first, noisiest sampler step) and the step terms per pair."""
    return {"trained_step": float(index.float().mean()), "step_terms": float(terms_per_pair)}
