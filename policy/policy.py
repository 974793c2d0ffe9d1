"""The diffusion policy shared by rollout actors and the learner.

It owns one frozen base model (optionally with LoRA adapters) and exposes the sampler as a stochastic policy:
``step`` draws x_{t−1} ~ π(·|x_t, c) and returns its log-probability, ``branch`` draws k children of one x_t
(TailorPO), ``sample`` runs whole chains, ``logprob`` recomputes stored transitions under any adapter.
Classifier-free guidance is part of the policy: f̂ = f_u + w (f_c − f_u) at sampling and at recomputation
alike, so a record's stored log-prob is reproducible under the weights that made it (docs/math.md §1); a
guidance-distilled model (FLUX.1-dev) takes w as a network input instead, in one conditional forward.
Noise comes from one generator per sample, seeded by the record's seed: a sample's chain does not depend on
what else shares its batch. What the model output means (ε for SD1.5, a velocity for SD3/FLUX), how it gives the
Gaussian step, and the timestep grids belong to the noise process ``process`` (policy/process.py), chosen by the
model directory's scheduler; the network and its text encoders sit behind one call (policy/denoisers.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy.components import Components, load_components
from policy.denoisers import Text
from policy.lora import (
    POLICY,
    LoadReport,
    LoraSettings,
    WeightState,
    activate,
    adapter_names,
    adapter_parameters,
    add_adapter,
    copy_into,
    export_state,
)
from policy.process import Kernel, NoiseProcess, process_for
from policy.schedule import Reduce, gaussian_logprob, logprob_ratio

_DEFAULT = object()  # "the policy adapter if there is one, else the base"


class SamplerConfig(BaseModel):
    """Sampler settings; the paper presets use 20 (TailorPO, D3PO) or 50 (dense reward) steps with eta=1.

    The noise of a step is set per process: ``eta`` for DDIM, ``noise_level`` (Flow-GRPO's a) for a flow model's
    SDE; each process reads the one it names (``NoiseProcess.noise_setting``) and ignores the other."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    num_steps: int = Field(20, ge=1, strict=True, description="sampler steps per chain")
    guidance_scale: float = Field(5.0, ge=0, description=(
        "guidance w (part of the policy): classifier-free, or a guidance-distilled model's input (FLUX.1-dev)"))
    eta: float = Field(1.0, description="DDIM eta; > 0 for a stochastic policy with a log-prob")
    noise_level: float = Field(0.7, gt=0, description=(
        "flow models (SD3, FLUX): the SDE's noise level a (Flow-GRPO's default 0.7); DDIM uses eta"))
    resolution: int | None = Field(None, ge=8, strict=True, description=(
        "image side in pixels (a multiple of the VAE's factor; null: the model's default size)"))
    logprob_reduce: Reduce = Field("mean", description="per-sample log-prob: mean or sum over latent elements")

    @field_validator("eta")
    @classmethod
    def _stochastic(cls, eta: float) -> float:
        if eta <= 0:  # eta = 0 is deterministic DDIM: no Gaussian, no log-prob
            raise ValueError(f"sampler.eta must be > 0 for a stochastic policy with a log-prob, got {eta}")
        return eta


@dataclass
class PromptEmbeds:
    """Conditional and unconditional (empty-prompt) conditioning of a batch."""

    cond: Text
    uncond: Text

    def repeat(self, k: int) -> PromptEmbeds:
        return PromptEmbeds(self.cond.repeat(k), self.uncond.repeat(k))


@dataclass
class StepOut:
    """One transition x_t → x_{t−1}: the sample, its log-prob, the Gaussian it came from and x̂_0(x_t)."""

    x_prev: torch.Tensor
    logprob: torch.Tensor
    mean: torch.Tensor
    sigma: torch.Tensor
    x0: torch.Tensor


@dataclass
class Rollout:
    """Whole chains: latents[k] is the state before step k (latents[0] = x_T, latents[-1] = x_0)."""

    prompts: list[str]
    seeds: list[int]
    timesteps: torch.Tensor  # [N] in generation order
    latents: torch.Tensor  # [N+1, B, C, h, w]
    logprobs: torch.Tensor  # [N, B]
    images: torch.Tensor | None = None  # [B, 3, H, W] in [0, 1]
    extras: dict = field(default_factory=dict)


class DiffusionPolicy:
    def __init__(self, components: Components, sampler: SamplerConfig | None = None):
        self.c = components
        self.sampler = sampler or SamplerConfig()
        denoiser, resolution = components.denoiser, self.sampler.resolution
        self.device = denoiser.net.device
        self.dtype = denoiser.net.dtype
        if resolution is not None and resolution % components.vae_scale_factor:
            raise ValueError(f"sampler.resolution must be a multiple of the VAE's factor "
                             f"{components.vae_scale_factor}, got {resolution}")
        self.latent_shape = denoiser.latent_shape(None if resolution is None
                                                  else resolution // components.vae_scale_factor)
        num_steps = self.sampler.num_steps
        self.process: NoiseProcess = process_for(components.scheduler, num_steps,
                                                 denoiser.image_seq_len(*self.latent_shape[1:]),
                                                 denoiser.sampler_sigmas(num_steps))
        self.noise = getattr(self.sampler, self.process.noise_setting)  # the kernel's noise scale (η or a)
        self.timesteps = self.process.timesteps  # the sampler's, in generation order
        self._uncond: Text | None = None
        self._copies: dict[str | None, torch.nn.Module] = {}  # full training: whole UNets by name (see train_full)
        self.net_rows = 0  # latents through the network so far (CFG's two halves count twice): a compute count

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, sampler: SamplerConfig | None = None
                        ) -> DiffusionPolicy:
        return cls(load_components(model_dir, device, dtype), sampler)

    # DDIMEpsilon's schedule under the names tests/test_reference_on_actors.py's float64 density reads
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.process.alphas_cumprod

    @property
    def final_alpha_cumprod(self) -> float:
        return self.process.final_alpha_cumprod

    @property
    def stride(self) -> int:
        return self.process.stride

    # ---- adapters -------------------------------------------------------------------------------------------
    def add_lora(self, name: str = POLICY, settings: LoraSettings | None = None, trainable: bool = True) -> None:
        flags = {id(p): p.requires_grad for p in self.unet.parameters()}  # peft renames wrapped base weights
        add_adapter(self.unet, name, settings or LoraSettings())  # and makes the new adapter the trainable one
        for p in self.unet.parameters():
            p.requires_grad_(flags.get(id(p), trainable))

    def train_full(self) -> None:
        """Full fine-tuning: the UNet itself becomes the trainable policy, and a frozen copy of it taken now is the
        initial model, which the name ``None`` means from then on (with LoRA, ``None`` is the base with adapters
        disabled). The text encoder and VAE stay frozen, as in Diffusion-DPO."""
        self._copies[None] = self._frozen_copy(self.unet)
        self._copies[POLICY] = self.unet
        self.unet.requires_grad_(True)

    def add_copy(self, name: str) -> None:
        """Full training: a frozen whole-UNet copy ``name`` of the initial model (a moving reference, a candidate)."""
        self._copies[name] = self._frozen_copy(self._copies[None])

    @staticmethod
    def _frozen_copy(unet: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(unet).requires_grad_(False).eval()

    def copies(self) -> list[torch.nn.Module]:
        """The frozen whole-UNet copies (full training only)."""
        return [m for m in self._copies.values() if m is not self.unet]

    @property
    def full(self) -> bool:
        return POLICY in self._copies

    @property
    def unet(self) -> torch.nn.Module:
        """The denoising network that is trained and published (it carries the LoRA adapters, or is itself the
        policy): a UNet, or SD3's or FLUX's transformer (the name is SD-1.5's)."""
        return self.c.denoiser.net

    @property
    def slot(self) -> str | None:
        """Where the policy's weights sit in ``unet``: the POLICY adapter, or (full training) the UNet itself."""
        return None if self.full or POLICY not in adapter_names(self.unet) else POLICY

    def _resolve(self, name: object) -> tuple[torch.nn.Module, str | None]:
        """(module, adapter within it) that ``name`` denotes."""
        name = self._adapter(name)
        return (self._copies[name], None) if name in self._copies else (self.unet, name)

    def place(self, name: str | None) -> tuple[torch.nn.Module, str | None]:
        """(module, adapter within it) where the weights called ``name`` live: for POLICY the published ``slot``
        of ``unet``; for another name (the reference) its adapter or, with full training, its whole-UNet copy."""
        return (self.unet, self.slot) if name == POLICY else self._resolve(name)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def adapter_parameters(self, name: str | None) -> dict[str, torch.nn.Parameter]:
        """Adapter ``name``'s parameters by adapter-free name (``None``: the base weights; with full training,
        a name is a whole UNet)."""
        return adapter_parameters(*self._resolve(name))

    def copy_into(self, name: str | None, tensors: dict[str, torch.Tensor], version: int = 0) -> LoadReport:
        return copy_into(*self._resolve(name), tensors, version)

    def export(self, name: str | None, version: int, dtype: torch.dtype | None = None) -> WeightState:
        """Adapter ``name`` as versioned safetensors bytes, cast to ``dtype``."""
        return export_state(*self._resolve(name), version, dtype)

    def load(self, state: WeightState, into: str | None = None) -> LoadReport:
        return copy_into(*self._resolve(state.adapter if into is None else into), state.tensors(), state.version)

    def train_mode(self, on: bool = True) -> None:
        """Training mode (dropout etc.) for an update; sampling and evaluation run in eval mode."""
        self.unet.train(on)

    def _adapter(self, adapter: object) -> str | None:
        if adapter is _DEFAULT:
            return POLICY if self.full or POLICY in adapter_names(self.unet) else None
        return adapter  # type: ignore[return-value]

    # ---- text -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        if self._uncond is None:
            self._uncond = self.c.denoiser.encode([""])
        return PromptEmbeds(self.c.denoiser.encode(prompts), self._uncond.expand(len(prompts)))

    # ---- the model ------------------------------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds, adapter: object = _DEFAULT,
            guidance_scale: float | None = None) -> torch.Tensor:
        """Guided model output f̂ = f_u + w (f_c − f_u) (one network call on the doubled batch), in the noise
        process's parametrisation (the noise ε for DDIMEpsilon, the velocity for FlowMatchingSDE); a
        guidance-distilled model gets w as an input of one conditional call instead.

        ``guidance_scale=1`` gives the plain conditional output (what Diffusion-DPO's denoising surrogate trains).
        """
        t = self.process.model_time(torch.as_tensor(timestep, device=self.device)).reshape(-1).expand(x_t.shape[0])
        w = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        x_in = x_t.to(self.dtype)
        net, name = self._resolve(adapter)
        activate(net, name)
        denoiser = self.c.denoiser
        if denoiser.embeds_guidance:
            self.net_rows += len(x_in)
            return denoiser(x_in, t, embeds.cond, net=net, guidance=w).float()
        if w == 1.0:
            self.net_rows += len(x_in)
            return denoiser(x_in, t, embeds.cond, net=net).float()
        self.net_rows += 2 * len(x_in)
        out = denoiser(torch.cat([x_in, x_in]), torch.cat([t, t]), Text.cat([embeds.uncond, embeds.cond]),
                       net=net).float()
        out_u, out_c = out.chunk(2)
        return out_u + w * (out_c - out_u)

    def mean(self, x_t: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds, adapter: object = _DEFAULT,
             eps: torch.Tensor | None = None) -> Kernel:
        """(μ, σ, x̂_0) of π(x_{t−1} | x_t, c), the noise process's reverse kernel at the sampler's noise;
        differentiable w.r.t. the adapter when grad is enabled.

        ``eps``: a guided model output already computed for this x_t (e.g. while ranking it), to skip the UNet call.
        """
        eps = self.eps(x_t, timestep, embeds, adapter) if eps is None else eps
        return self.process.kernel(x_t, timestep, eps, self.noise)

    def predict_x0(self, x: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
                   adapter: object = _DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) of a latent at ``timestep`` (scores intermediate samples: TailorPO Eq. 12)."""
        eps = self.eps(x, timestep, embeds, adapter)
        return self.process.predict_x0(x.float(), timestep, eps), eps

    def x0_after_step(self, x: torch.Tensor, k: int, embeds: PromptEmbeds) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x̂_0 of a latent after sampler step k (a child x_{t−1}) and its ε̂ at the next timestep; after the last
        step the latent is clean already (no ε̂)."""
        if k + 1 < len(self.timesteps):
            return self.predict_x0(x, self.timesteps[k + 1], embeds)
        return x.float(), None

    # ---- sampling -------------------------------------------------------------------------------------------
    def noise_like(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(self.device)

    @staticmethod
    def generators(seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def initial_latents(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        return self.noise_like(torch.empty(len(generators), *self.latent_shape), generators)

    def step(self, x_t: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
             generators: Sequence[torch.Generator], adapter: object = _DEFAULT, eps: torch.Tensor | None = None
             ) -> StepOut:
        mu, sigma, x0 = self.mean(x_t, timestep, embeds, adapter, eps)
        x_prev = mu + sigma * self.noise_like(mu, generators)
        return StepOut(x_prev, gaussian_logprob(x_prev, mu, sigma, self.sampler.logprob_reduce), mu, sigma, x0)

    def branch(self, x_t: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds, k: int,
               generators: Sequence[torch.Generator], adapter: object = _DEFAULT, eps: torch.Tensor | None = None
               ) -> StepOut:
        """k children of each x_t with independent noise from one UNet evaluation: x_prev, logprob are [k, B, ...]."""
        mu, sigma, x0 = self.mean(x_t, timestep, embeds, adapter, eps)
        x_prev = torch.stack([mu + sigma * self.noise_like(mu, generators) for _ in range(k)])
        logp = torch.stack([gaussian_logprob(x, mu, sigma, self.sampler.logprob_reduce) for x in x_prev])
        return StepOut(x_prev, logp, mu, sigma, x0)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], adapter: object = _DEFAULT,
               decode: bool = True, x_T: torch.Tensor | None = None) -> Rollout:
        """Run the full chain for each prompt; seeds fix x_T (unless given) and every step's noise."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        gens = self.generators(seeds)
        embeds = self.encode_prompts(prompts)
        x = self.initial_latents(gens) if x_T is None else x_T.to(self.device)
        latents, logps = [x], []
        for t in self.timesteps:
            out = self.step(x, t, embeds, gens, adapter)
            x = out.x_prev
            latents.append(x)
            logps.append(out.logprob)
        images = self.decode(x) if decode else None
        return Rollout(list(prompts), list(seeds), self.timesteps.clone(), torch.stack(latents), torch.stack(logps),
                       images)

    def sample_images(self, prompts: Sequence[str], seeds: Sequence[int], batch: int = 64) -> torch.Tensor:
        """Final images of many (prompt, seed) pairs on the CPU, sampled ``batch`` at a time (memory): what
        evaluations, headroom tables and the judge's validation compare."""
        return torch.cat([self.sample(prompts[i : i + batch], seeds[i : i + batch]).images.cpu()
                          for i in range(0, len(prompts), batch)])

    # ---- recomputation --------------------------------------------------------------------------------------
    def logratio(self, x_prev: torch.Tensor, mean_a: torch.Tensor, mean_b: torch.Tensor, sigma: torch.Tensor
                 ) -> torch.Tensor:
        """log π_a − log π_b of ``x_prev`` given both means (float32 difference of squared distances)."""
        return logprob_ratio(x_prev, mean_a, mean_b, sigma, self.sampler.logprob_reduce)

    def logprob64(self, x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log π(x_prev) [B] in float64: a stored log-prob is later subtracted from another one, and that
        difference of two large sums keeps the log-ratio only in float64 (docs/math.md §2)."""
        return gaussian_logprob(x_prev.double(), mean.double(), sigma.double(), self.sampler.logprob_reduce)

    # ---- images ---------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [0, 1] (the rewards' input convention); differentiable when grad is enabled."""
        x = self.c.to_images(latents.to(self.dtype)).float()
        return ((x + 1) / 2).clamp(0, 1)
