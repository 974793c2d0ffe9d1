"""Loading a diffusers-layout text-to-image model from a local directory, and building small random ones.

Only local files and only safetensors: no hub access, no pickle. A missing or incomplete directory fails with
one line naming the directory and the first missing file. ``build_random_model`` writes the same layout with
random weights: "tiny" for tests, "sd15" (the SD-1.5 architecture) for GPU benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from policy.tokenizer import write_word_tokenizer


class ModelPathError(FileNotFoundError):
    """The model directory is missing or incomplete; the message is one actionable line."""


REQUIRED_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfig(BaseModel):
    """Which model the roles load, in which dtype, on which device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field("world/model", description="a local diffusers-layout directory")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="rollout/learner compute dtype")
    device: str = Field("auto", description="auto: cuda when the actor has a GPU, else cpu")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None``: the GPU this process was given if any (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Components:
    """The parts of a latent text-to-image model the policy needs (the scheduler only for its ᾱ table)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler


def check_model_dir(model_dir: str | Path) -> Path:
    """Return the directory as a Path, or raise ModelPathError naming what is missing."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelPathError(f"model directory not found: {root} (expected a diffusers-layout model saved locally)")
    for rel in REQUIRED_FILES:
        if not (root / rel).is_file():
            raise ModelPathError(
                f"model directory {root} is missing {rel} (need a diffusers layout saved with safetensors)"
            )
    return root


def load_components(model_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str = torch.float32) -> Components:
    """Load every component from ``model_dir`` (local files only, safetensors only), frozen, in eval mode."""
    root = check_model_dir(model_dir)
    device, dtype = resolve_device(device), DTYPES[dtype] if isinstance(dtype, str) else dtype
    kw = {"local_files_only": True, "use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(device)
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


# Architectures for random models. "tiny" costs milliseconds on CPU; "sd15" is SD-1.5's UNet/VAE/text encoder.
ARCHITECTURES: dict[str, dict] = {
    "tiny": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    layers_per_block=1, norm_num_groups=8, sample_size=32),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=16),
    },
    "sd15": {
        "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, sample_size=512),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77),
    },
}
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")
TINY_WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle",
              "on", "in", "left", "right", "top", "bottom", "center", "of"]


def build_random_model(out_dir: str | Path, arch: str = "tiny", seed: int = 0, words: list[str] | None = None) -> Path:
    """Write a random-weight model of architecture ``arch`` in diffusers layout to ``out_dir``; return the path."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    out = Path(out_dir)
    torch.manual_seed(seed)
    text = spec["text"]
    tokenizer = write_word_tokenizer(words or TINY_WORDS, out / "tokenizer", max_length=text["max_position_embeddings"])
    text_config = CLIPTextConfig(vocab_size=max(len(tokenizer), 49408 if arch == "sd15" else 0), **text,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    CLIPTextModel(text_config).save_pretrained(out / "text_encoder", safe_serialization=True)
    UNet2DConditionModel(**spec["unet"]).save_pretrained(out / "unet", safe_serialization=True)
    AutoencoderKL(**spec["vae"]).save_pretrained(out / "vae", safe_serialization=True)
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.39.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
