"""Reference strategies: a frozen π_ref, or Rethinking-DPO's stable reference update with a divergence cap.

The learner holds the policy as LoRA adapter tensors (``dict[str, Tensor]``); a reference state of ``None`` is
the base model with adapters disabled, i.e. the initial model. Rethinking-DPO ("Reference Model Update with
Regularization", Kang et al. AAAI-26, Sec. 4 and Eq. 7–8): every τ learner steps the reference is hard-replaced
by the current policy (TR-DPO style; an EMA blend is offered as an option the paper does not use) as long as the
divergence D(candidate ‖ initial model) stays ≤ δ; the first candidate past δ freezes the reference forever,
keeping the last one within δ ("freeze near the δ-boundary": the paper leaves open which copy is kept). The
paper's weaker alternative (Table 3, "Re-Init") is ``past_cap: reinit``: a candidate past δ sends the reference
back to the initial model, and the checks go on.

The cap exists to stop the reference from drifting away from the initial model, so D must grow with drift in
ANY direction. The default is therefore ``kernel_kl`` (≥ 0, zero iff the models agree); the paper's Eq. 7
estimate ``divergence_estimate`` is one-sided (negative when the candidate fits the winners worse than the
initial model) and stays available as ``divergence: log_ratio``. Both take the denoiser's outputs in the noise
process's parametrisation (ε̂ for DDIM-ε, v̂ for a flow model) and, for Eq. 7, the process's training target
(policy/process.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from policy.schedule import Reduce, reduce_per_sample

LoraState = dict[str, Tensor]
Divergence = Callable[[LoraState], float]


def _widen(*tensors: Tensor) -> list[Tensor]:
    shape = tensors[0].shape
    if tensors[0].ndim < 2 or any(t.shape != shape for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"model outputs must share one batched shape [B, ...], got {shapes}")
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def divergence_estimate(target: Tensor, out_candidate: Tensor, out_init: Tensor, reduce: Reduce = "mean") -> Tensor:
    """D(candidate ‖ init) ≈ mean_batch reduce(‖ε − ε_init‖² − ‖ε − ε_cand‖²) on forward-noised winners, ε the
    noise process's ``target`` and ε_· the models' outputs ``out_·`` (for DDIM-ε the noise and the ε̂).

    Rethinking-DPO Eq. 7 is E[log p_cand − log p_init]; with the Diffusion-DPO derivation each step's term is
    ∝ ‖ε − ε_init‖² − ‖ε − ε_cand‖², positive when the candidate explains the (preferred) samples better than
    the initial model. Eq. 8 (KL(q‖p_ref) − KL(q‖p_init)) has the opposite sign. Either sign is ONE-SIDED: a
    candidate that fits the winners worse (reported for Diffusion-DPO) gives D < 0 however far it drifts, so
    a cap D ≤ δ never fires; use ``kernel_kl`` to cap drift. Scale: the per-element mean over non-batch dims
    (``"mean"``, the scale δ = 0.005 suggests) or the sum; no factor T, no 0.5.
    """
    target, cand, init = _widen(target, out_candidate, out_init)
    return reduce_per_sample((target - init).square() - (target - cand).square(), reduce).mean()


def kernel_kl(out_candidate: Tensor, out_init: Tensor, reduce: Reduce = "mean") -> Tensor:
    """mean_batch reduce(‖ε_cand − ε_init‖²) of the two models' outputs: the KL between the two Gaussian reverse
    kernels (same σ_t, means linear in the output as in DDIM and the flow SDE), up to their shared
    1/(2σ²)·(coefficient)² factor. Unlike ``divergence_estimate`` it is ≥ 0 and zero iff the models agree, so it
    caps any drift, not only drift towards the preferred data (the default, ``divergence: kernel_kl``)."""
    cand, init = _widen(out_candidate, out_init)
    return reduce_per_sample((cand - init).square(), reduce).mean()


# δ for kernel_kl, calibrated to the paper's δ = 0.005 on its Eq. 7 scale: in a Diffusion-DPO + stable-reference
# run on the embedded world (β 500, lr 2e-3, τ 4, trajectory pairs; docs/math.md, "Stable reference: the divergence
# cap") the Eq. 7 estimate crossed 0.005 between updates 20 and 24, where kernel_kl was 6.7e-4 and 9.3e-4.
DEFAULT_DELTA = 1e-3


class ReferenceConfig(BaseModel):
    """The ``reference`` section: the one place for the strategy's defaults and allowed values."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    strategy: Literal["frozen", "stable_update"] = "frozen"
    tau: int = Field(32, ge=1, strict=True, description=(
        "stable_update: replace the reference every tau learner steps (Rethinking-DPO Fig. 1b: 32)"))
    delta: float = Field(DEFAULT_DELTA, gt=0, description=(
        "... while D(candidate || initial) <= delta; past it the reference freezes (default: kernel_kl's "
        "calibration, docs/math.md)"))
    past_cap: Literal["reinit"] | None = Field(None, description=(
        "null: a candidate past delta freezes the reference near the boundary (the paper's); reinit: it resets "
        "the reference to the initial model and the checks go on (the paper's Re-Init variant, Table 3)"))
    ema: float | None = Field(None, gt=0, le=1, description="soft replacement weight instead of a hard copy")
    divergence: Literal["log_ratio", "kernel_kl"] = Field("kernel_kl", description=(
        "kernel_kl grows with any drift from the initial model; log_ratio (the paper's Eq. 7) is one-sided"))
    divergence_samples: int = Field(16, ge=1, strict=True, description=(
        "winners of the last batch used to estimate D, each at 4 timesteps"))
    compute_on: Literal["learner", "actors"] = Field("learner", description=(
        "where log pi_ref of sampled transitions is computed: actors store it in the records (float64) as they "
        "sample, so the learner's update skips its reference forward; a moving reference is then broadcast to them"))


class RefEvent(NamedTuple):
    """What a reference update did at learner ``step``: ``action`` is ``"replaced"``, ``"frozen"`` or ``"reinit"``."""

    step: int
    divergence: float
    action: str


def _clone(state: Mapping[str, Tensor]) -> LoraState:
    return {k: v.detach().clone() for k, v in state.items()}


class FrozenReference:
    """π_ref = the initial model (adapters disabled) for the whole run."""

    moves = False
    state: LoraState | None = None
    version = 0

    def maybe_update(self, step: int, candidate: Mapping[str, Tensor], divergence: Divergence) -> None:
        """Never moves."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        return None


class StableUpdateReference:
    """Rethinking-DPO reference: replaced by the policy every ``tau`` steps while D ≤ ``delta``, then frozen (or,
    with ``reinit``, reset to the initial model at every check past ``delta``).

    ``ema`` (optional, not in the paper): the candidate is ema·policy + (1−ema)·current_ref instead of the
    policy itself (current_ref ``None`` = zeros, the initial LoRA delta). ``state`` holds private clones, so
    in-place changes to the policy tensors never reach the reference between replacements. The parameters come
    validated from ``ReferenceConfig`` (``build_reference``).
    """

    moves = True

    def __init__(self, tau: int, delta: float, ema: float | None = None, reinit: bool = False) -> None:
        self.tau, self.delta, self.ema, self.reinit = tau, delta, ema, reinit
        self.state: LoraState | None = None
        self.version = 0
        self.frozen = False
        self.history: list[RefEvent] = []

    def _candidate(self, policy: Mapping[str, Tensor]) -> LoraState:
        if self.ema is None:
            return _clone(policy)
        if self.state is not None and set(self.state) != set(policy):
            diff = sorted(set(policy) ^ set(self.state))
            raise ValueError(f"policy keys differ from the reference's: {diff}")
        ema = self.ema
        with torch.no_grad():
            if self.state is None:  # the initial model is a zero LoRA delta
                return {k: ema * v.detach() for k, v in policy.items()}
            return {k: ema * v.detach() + (1 - ema) * self.state[k] for k, v in policy.items()}

    def maybe_update(self, step: int, candidate: Mapping[str, Tensor], divergence: Divergence) -> RefEvent | None:
        """At learner ``step`` (counted from 1), every ``tau`` steps: test the candidate built from the policy
        state ``candidate`` with ``divergence`` and replace or freeze. Returns the event, or None."""
        if step < 1:
            raise ValueError(f"step is counted from 1, got {step}")
        if self.frozen or step % self.tau != 0:
            return None
        proposal = self._candidate(candidate)
        d = float(divergence(proposal))
        if not math.isfinite(d):
            raise ValueError(f"divergence returned {d} at step {step}; check the divergence batch and models")
        if d <= self.delta:
            self.state, self.version = proposal, self.version + 1
            event = RefEvent(step, d, "replaced")
        elif self.reinit:
            if self.state is not None:  # a new reference: the initial model again
                self.state, self.version = None, self.version + 1
            event = RefEvent(step, d, "reinit")
        else:
            self.frozen = True
            event = RefEvent(step, d, "frozen")
        self.history.append(event)
        return event

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint: state (cloned), version, frozen flag and the event history."""
        return {
            "state": None if self.state is None else _clone(self.state),
            "version": self.version,
            "frozen": self.frozen,
            "history": [tuple(e) for e in self.history],
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.state = None if sd["state"] is None else _clone(sd["state"])
        self.version = int(sd["version"])
        self.frozen = bool(sd["frozen"])
        self.history = [RefEvent(int(s), float(d), str(a)) for s, d, a in sd["history"]]


def build_reference(cfg: ReferenceConfig) -> FrozenReference | StableUpdateReference:
    """The strategy the (validated) ``reference`` section names."""
    if cfg.strategy == "stable_update":
        return StableUpdateReference(cfg.tau, cfg.delta, cfg.ema, reinit=cfg.past_cap == "reinit")
    return FrozenReference()
