"""The denoising networks behind one call convention: ``denoiser(x_t, model_time, text) -> prediction``.

The sampler, the learner and every method see latents [B, C, h, w], the noise process's model time and a ``Text``
(the prompt conditioning, from ``encode``); what a network class needs beyond that lives in one small adapter per
class, each reproducing what its diffusers pipeline feeds the network:

* ``UNetDenoiser`` (UNet2DConditionModel, SD-1.5): CLIP's last hidden states; predicts ε.
* ``SD3Denoiser`` (SD3Transformer2DModel, SD3/SD3.5; StableDiffusion3Pipeline.encode_prompt): two
  CLIPTextModelWithProjection give their penultimate hidden states, concatenated along features and zero-padded to
  T5's width, with T5's states appended along the sequence; their pooled projections, concatenated, are the pooled
  vector. Predicts the velocity.
* ``FluxDenoiser`` (FluxTransformer2DModel, FLUX.1; FluxPipeline): CLIP's pooled output and T5's states; the
  latents are packed into 2×2 patches with (0, row, column) ids, the text ids are zeros, and the timestep goes in
  divided by 1000 (the network multiplies it back). A guidance-distilled model (``guidance_embeds``, FLUX.1-dev)
  takes the guidance scale as an input of one conditional forward instead of classifier-free guidance
  (``embeds_guidance``; docs/math.md, "Flow matching"). Predicts the velocity.

The network the call runs is ``net`` by default; the policy passes another (a frozen full copy) by keyword.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from policy.process import MODEL_TIME_SCALE

SD3_MAX_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
FLUX_MAX_T5_TOKENS = 512  # FluxPipeline's
FLUX_DEFAULT_LATENT = 128  # FluxPipeline.default_sample_size: 1024 px


@dataclass
class Text:
    """Prompt conditioning of a batch: the token states the network attends to [B, L, D] and, for SD3 and FLUX,
    a pooled vector [B, P]."""

    states: Tensor
    pooled: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Text:
        return Text(fn(self.states), None if self.pooled is None else fn(self.pooled))

    def repeat(self, k: int) -> Text:
        """The batch repeated k times (row i of copy j is row i)."""
        return self.map(lambda t: t.repeat(k, *([1] * (t.ndim - 1))))

    def expand(self, n: int) -> Text:
        """A one-row conditioning (the empty prompt) broadcast to n rows without copying."""
        return self.map(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(texts: Sequence[Text]) -> Text:
        pooled = [t.pooled for t in texts]
        return Text(torch.cat([t.states for t in texts]), None if pooled[0] is None else torch.cat(pooled))


Encoder = tuple[CLIPTokenizer | T5TokenizerFast, nn.Module]


class Denoiser(ABC):
    """A denoising network with its text encoders. Class attributes say how a model directory holds it: the
    network's ``folder`` and class, the text encoders' and tokenizers' classes in pipeline order (text_encoder,
    text_encoder_2, …) and the scheduler class that defines its noise process (policy/process.py)."""

    folder: ClassVar[str]
    net_class: ClassVar[type[nn.Module]]
    text_classes: ClassVar[tuple[tuple[type, type], ...]]  # (encoder, tokenizer) per text_encoder{,_2,_3}
    scheduler_class: ClassVar[type]
    pipeline: ClassVar[str]  # the diffusers pipeline class model_index.json names

    def __init__(self, net: nn.Module, encoders: Sequence[Encoder]) -> None:
        self.net = net
        self.encoders = list(encoders)

    @property
    def modules(self) -> list[nn.Module]:
        """Every network held (the denoiser and the text encoders)."""
        return [self.net, *(encoder for _, encoder in self.encoders)]

    @property
    def embeds_guidance(self) -> bool:
        """True where the guidance scale is a network input (guidance-distilled FLUX), not classifier-free."""
        return False

    @property
    def latent_channels(self) -> int:
        return self.net.config.in_channels

    @property
    def sample_size(self) -> int:
        """The latent side the model generates at by default (its pipeline's default resolution / VAE factor)."""
        return self.net.config.sample_size

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side: SD3's patch, FLUX's 2×2 packing, 1 for a UNet."""
        return 1

    def latent_shape(self, side: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of square latents ``side`` pixels wide (None: ``sample_size``)."""
        side = self.sample_size if side is None else side
        if side < 1 or side % self.patch_size:
            raise ValueError(f"{type(self.net).__name__} needs a latent side divisible by {self.patch_size}, got {side}"
                             " (set sampler.resolution to a multiple of the VAE factor times that)")
        return self.latent_channels, side, side

    def image_seq_len(self, h: int, w: int) -> int:
        """Image tokens of h × w latents: what a pipeline's resolution-dependent shift is computed from."""
        return (h // self.patch_size) * (w // self.patch_size)

    def sampler_sigmas(self, num_steps: int) -> np.ndarray | None:
        """The unshifted σ grid the model's pipeline passes to ``set_timesteps`` (None: the scheduler's own)."""
        return None

    def tokens(self, index: int, prompts: Sequence[str], max_length: int | None = None) -> Tensor:
        """Token ids of ``prompts`` for text encoder ``index``, padded to its tokenizer's length (or ``max_length``,
        capped there)."""
        tokenizer, encoder = self.encoders[index]
        length = tokenizer.model_max_length if max_length is None else min(max_length, tokenizer.model_max_length)
        ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(encoder.device)

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> Text:
        """The conditioning of ``prompts`` (call under ``torch.no_grad``: the text encoders stay frozen)."""

    @abstractmethod
    def __call__(self, x: Tensor, model_time: Tensor, text: Text, *, net: nn.Module | None = None,
                 guidance: float | None = None) -> Tensor:
        """The prediction at latents ``x`` [B, C, h, w] and ``model_time`` [B]; ``guidance``: the scale a
        guidance-embedding model takes (only there)."""


class UNetDenoiser(Denoiser):
    folder, net_class, pipeline = "unet", UNet2DConditionModel, "StableDiffusionPipeline"
    text_classes = ((CLIPTextModel, CLIPTokenizer),)
    # ε-prediction sampled by DDIM, whatever scheduler the directory ships (SD-1.5's is PNDM)
    scheduler_class = DDIMScheduler

    def encode(self, prompts: Sequence[str]) -> Text:
        return Text(self.encoders[0][1](self.tokens(0, prompts))[0])

    def __call__(self, x, model_time, text, *, net=None, guidance=None):
        return (net or self.net)(x, model_time, encoder_hidden_states=text.states).sample


class SD3Denoiser(Denoiser):
    folder, net_class, pipeline = "transformer", SD3Transformer2DModel, "StableDiffusion3Pipeline"
    text_classes = ((CLIPTextModelWithProjection, CLIPTokenizer), (CLIPTextModelWithProjection, CLIPTokenizer),
                    (T5EncoderModel, T5TokenizerFast))
    scheduler_class = FlowMatchEulerDiscreteScheduler

    @property
    def patch_size(self) -> int:
        return self.net.config.patch_size

    def encode(self, prompts: Sequence[str]) -> Text:
        clip = [self.encoders[i][1](self.tokens(i, prompts), output_hidden_states=True) for i in (0, 1)]
        t5 = self.encoders[2][1](self.tokens(2, prompts, SD3_MAX_T5_TOKENS))[0]
        states = torch.cat([out.hidden_states[-2] for out in clip], dim=-1)  # penultimate layer (clip_skip None)
        states = F.pad(states, (0, t5.shape[-1] - states.shape[-1]))
        return Text(torch.cat([states, t5], dim=-2), torch.cat([out.text_embeds for out in clip], dim=-1))

    def __call__(self, x, model_time, text, *, net=None, guidance=None):
        return (net or self.net)(hidden_states=x, timestep=model_time, encoder_hidden_states=text.states,
                                 pooled_projections=text.pooled).sample


class FluxDenoiser(Denoiser):
    folder, net_class, pipeline = "transformer", FluxTransformer2DModel, "FluxPipeline"
    text_classes = ((CLIPTextModel, CLIPTokenizer), (T5EncoderModel, T5TokenizerFast))
    scheduler_class = FlowMatchEulerDiscreteScheduler

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.net.config.guidance_embeds)

    @property
    def latent_channels(self) -> int:
        return self.net.config.in_channels // 4  # the network sees 2×2 patches of C channels

    @property
    def sample_size(self) -> int:
        return FLUX_DEFAULT_LATENT

    @property
    def patch_size(self) -> int:
        return 2

    def sampler_sigmas(self, num_steps: int) -> np.ndarray:
        return np.linspace(1.0, 1 / num_steps, num_steps)  # FluxPipeline's grid, shifted by the scheduler

    def encode(self, prompts: Sequence[str]) -> Text:
        pooled = self.encoders[0][1](self.tokens(0, prompts)).pooler_output
        return Text(self.encoders[1][1](self.tokens(1, prompts, FLUX_MAX_T5_TOKENS))[0], pooled)

    def __call__(self, x, model_time, text, *, net=None, guidance=None):
        if (guidance is None) == self.embeds_guidance:
            raise ValueError("a guidance-distilled FLUX takes the guidance scale as input, any other FLUX none")
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(text.states.shape[1], 3, device=x.device, dtype=x.dtype)
        scale = None if guidance is None else torch.full((b,), float(guidance), device=x.device)
        out = (net or self.net)(hidden_states=packed, timestep=model_time / MODEL_TIME_SCALE, guidance=scale,
                                pooled_projections=text.pooled, encoder_hidden_states=text.states, txt_ids=txt_ids,
                                img_ids=img_ids.reshape(-1, 3)).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


DENOISERS: dict[str, type[Denoiser]] = {cls.net_class.__name__: cls
                                        for cls in (UNetDenoiser, SD3Denoiser, FluxDenoiser)}
