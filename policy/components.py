"""Loading a diffusers-layout text-to-image model from a local directory, and building small random ones.

Only local files and only safetensors: no hub access, no pickle. ``model_index.json`` names the denoising network's
class, which picks its adapter (policy/denoisers.py: SD-1.5's UNet, SD3's or FLUX's transformer) and with it the
files the directory must hold (``REQUIRED_FILES``, per kind) and the classes its parts load with. A missing or
incomplete directory fails with one line naming the directory and the first missing file; a weights file may be
one safetensors file or the shards its ``.index.json`` lists (as SD3.5's T5 and FLUX's transformer are saved).
``build_random_model`` writes the same layout with random weights: "tiny", "tiny_sd3" and "tiny_flux" (the real
classes at toy sizes) for tests, "sd15" (the SD-1.5 architecture) for GPU benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5TokenizerFast

from policy.denoisers import DENOISERS, Denoiser, FluxDenoiser, SD3Denoiser, UNetDenoiser
from policy.tokenizer import write_t5_tokenizer, write_word_tokenizer


class ModelPathError(FileNotFoundError):
    """The model directory is missing or incomplete; the message is one actionable line."""


TOKENIZER_FILES = {CLIPTokenizer: ("vocab.json", "merges.txt"), T5TokenizerFast: ("tokenizer.json",)}


def text_folders(index: int) -> tuple[str, str]:
    """(text encoder, tokenizer) folders of a pipeline's ``index``-th text encoder: text_encoder, text_encoder_2, …"""
    suffix = "" if index == 0 else f"_{index + 1}"
    return f"text_encoder{suffix}", f"tokenizer{suffix}"


def required_files(kind: type[Denoiser]) -> tuple[str, ...]:
    """What a directory of this kind must hold, in the order it is checked (weights as single-file names)."""
    files = [f"{kind.folder}/config.json", f"{kind.folder}/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    for i, (_, tokenizer) in enumerate(kind.text_classes):
        encoder_dir, tokenizer_dir = text_folders(i)
        files += [f"{encoder_dir}/config.json", f"{encoder_dir}/model.safetensors"]
        files += [f"{tokenizer_dir}/{name}" for name in TOKENIZER_FILES[tokenizer]]
    return (*files, "scheduler/scheduler_config.json")


REQUIRED_FILES = {name: required_files(kind) for name, kind in DENOISERS.items()}  # by the network class


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfig(BaseModel):
    """Which model the roles load, in which dtype, on which device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field("world/model", description="a local diffusers-layout directory (SD-1.5, SD3/SD3.5 or FLUX.1)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="rollout/learner compute dtype")
    device: str = Field("auto", description="auto: cuda when the actor has a GPU, else cpu")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None``: the GPU this process was given if any (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Components:
    """The parts of a latent text-to-image model the policy needs (the scheduler for its noise process)."""

    denoiser: Denoiser
    vae: AutoencoderKL
    scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _shift(self) -> float:
        return self.vae.config.shift_factor or 0.0  # SD3's and FLUX's VAEs centre their latents; SD-1.5's does not

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] → the model's latents: the VAE posterior mean, shifted and scaled."""
        return (self.vae.encode(images).latent_dist.mean - self._shift()) * self.vae.config.scaling_factor

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents → images in [−1, 1] (differentiable)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor + self._shift()).sample


def model_kind(root: Path) -> type[Denoiser]:
    """The denoiser adapter for the network class ``root/model_index.json`` names (one-line ModelPathError)."""
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelPathError(f"model directory {root} is missing model_index.json (need a diffusers layout saved "
                             "with save_pretrained)")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelPathError(f"model directory {root}: model_index.json is not JSON ({e})") from None
    entries = (index.get("unet"), index.get("transformer"))
    names = [entry[1] for entry in entries if isinstance(entry, list) and entry[1]]
    if len(names) != 1 or names[0] not in DENOISERS:
        raise ModelPathError(f"model directory {root}: model_index.json names denoiser {names or 'none'}; supported: "
                             f"{sorted(DENOISERS)} (in unet/ or transformer/)")
    return DENOISERS[names[0]]


def _missing(root: Path, rel: str) -> str | None:
    """``rel`` if neither it nor (for safetensors) an index with all its shards is there, else None."""
    if (root / rel).is_file():
        return None
    index = root / f"{rel}.index.json"
    if not rel.endswith(".safetensors") or not index.is_file():
        return rel
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    folder = Path(rel).parent
    return next((str(folder / s) for s in shards if not (root / folder / s).is_file()), None) if shards else rel


def check_model_dir(model_dir: str | Path) -> Path:
    """Return the directory as a Path, or raise ModelPathError naming what is missing."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelPathError(f"model directory not found: {root} (expected a diffusers-layout model saved locally)")
    for rel in REQUIRED_FILES[model_kind(root).net_class.__name__]:
        missing = _missing(root, rel)
        if missing:
            raise ModelPathError(
                f"model directory {root} is missing {missing} (need a diffusers layout saved with safetensors)"
            )
    return root


def scheduler_class(root: Path, kind: type[Denoiser]) -> type:
    """The kind's scheduler, or a flow-matching one where the directory ships it: a UNet trained for velocity
    (the embedded flow world, world/flow_model) is sampled by the flow SDE, not by DDIM."""
    path = root / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelPathError(f"model directory {root}: {path.relative_to(root)} is not JSON ({e})") from None
    flow = config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__
    return FlowMatchEulerDiscreteScheduler if flow else kind.scheduler_class


def load_components(model_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str = torch.float32) -> Components:
    """Load every component from ``model_dir`` (local files only, safetensors only), frozen, in eval mode."""
    root = check_model_dir(model_dir)
    kind = model_kind(root)
    device, dtype = resolve_device(device), DTYPES[dtype] if isinstance(dtype, str) else dtype
    kw = {"local_files_only": True, "use_safetensors": True}
    net = kind.net_class.from_pretrained(root, subfolder=kind.folder, torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    encoders = []
    for i, (encoder_class, tokenizer_class) in enumerate(kind.text_classes):
        encoder_dir, tokenizer_dir = text_folders(i)
        encoders.append((tokenizer_class.from_pretrained(root, subfolder=tokenizer_dir, local_files_only=True),
                         encoder_class.from_pretrained(root, subfolder=encoder_dir, dtype=dtype, **kw)))
    scheduler = scheduler_class(root, kind).from_pretrained(root, subfolder="scheduler", local_files_only=True)
    denoiser = kind(net, encoders)
    for module in (*denoiser.modules, vae):
        module.requires_grad_(False).eval().to(device)
    return Components(denoiser, vae, scheduler)


# Architectures for random models: the real classes. "tiny*" cost milliseconds on CPU; "sd15" is SD-1.5's
# UNet/VAE/text encoder. ``text``: one config per text encoder in pipeline order (``vocab_min`` pads the
# vocabulary to the real size, ``max_length`` is a T5 tokenizer's length); ``vae``'s shift and scale are the real
# models' values (SD3: 1.5305, 0.0609; FLUX: 0.3611, 0.1159); ``scheduler`` the scheduler's config.
_TINY_CLIP = dict(intermediate_size=64, num_attention_heads=2, max_position_embeddings=16)
_TINY_T5 = dict(d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, feed_forward_proj="gated-gelu", max_length=16)
_TINY_VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16),
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                   use_post_quant_conv=False)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stable-diffusion-3.5-medium's scheduler_config.json
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
ARCHITECTURES: dict[str, dict] = {
    "tiny": {
        "kind": UNetDenoiser,
        "net": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=8, norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    layers_per_block=1, norm_num_groups=8, sample_size=32),
        "text": [dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=16)],
        "scheduler": SD15_SCHEDULER,
    },
    "sd15": {
        "kind": UNetDenoiser,
        "net": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, sample_size=512),
        "text": [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, vocab_min=49408)],
        "scheduler": SD15_SCHEDULER,
    },
    "tiny_sd3": {  # SD3.5's layout: dual attention (attn2) in the first block, RMS q/k norm
        "kind": SD3Denoiser,
        "net": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                    pooled_projection_dim=48, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"),
        "vae": dict(_TINY_VAE16, scaling_factor=1.5305, shift_factor=0.0609),
        "text": [dict(_TINY_CLIP, hidden_size=16, projection_dim=16, num_hidden_layers=2),  # CLIP-L
                 dict(_TINY_CLIP, hidden_size=32, projection_dim=32, num_hidden_layers=2),  # CLIP-G
                 _TINY_T5],
        "scheduler": SD3_SCHEDULER,
    },
    "tiny_flux": {  # FLUX.1-dev's layout: guidance-distilled, one double- and one single-stream block
        "kind": FluxDenoiser,
        "net": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                    axes_dims_rope=(2, 2, 4)),
        "vae": dict(_TINY_VAE16, scaling_factor=0.3611, shift_factor=0.1159),
        "text": [dict(_TINY_CLIP, hidden_size=32, num_hidden_layers=1), _TINY_T5],
        "scheduler": FLUX_SCHEDULER,
    },
}
TINY_WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle",
              "on", "in", "left", "right", "top", "bottom", "center", "of"]


def _text_encoder(encoder_class: type, tokenizer_class: type, spec: dict, words: list[str], encoder_dir: Path,
                  tokenizer_dir: Path) -> None:
    """Write one random text encoder and its offline tokenizer."""
    spec = dict(spec)
    if tokenizer_class is T5TokenizerFast:
        tokenizer = write_t5_tokenizer(words, tokenizer_dir, max_length=spec.pop("max_length"))
        config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **spec)
    else:
        tokenizer = write_word_tokenizer(words, tokenizer_dir, max_length=spec["max_position_embeddings"])
        config = CLIPTextConfig(vocab_size=max(len(tokenizer), spec.pop("vocab_min", 0)), **spec,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    encoder_class(config).save_pretrained(encoder_dir, safe_serialization=True)


def build_random_model(out_dir: str | Path, arch: str = "tiny", seed: int = 0, words: list[str] | None = None) -> Path:
    """Write a random-weight model of architecture ``arch`` in diffusers layout to ``out_dir``; return the path."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    kind: type[Denoiser] = spec["kind"]
    out = Path(out_dir)
    torch.manual_seed(seed)
    index = {"_class_name": kind.pipeline, "_diffusers_version": "0.39.0"}
    for i, ((encoder_class, tokenizer_class), text) in enumerate(zip(kind.text_classes, spec["text"], strict=True)):
        encoder_dir, tokenizer_dir = text_folders(i)
        _text_encoder(encoder_class, tokenizer_class, text, words or TINY_WORDS, out / encoder_dir, out / tokenizer_dir)
        index.update({encoder_dir: ["transformers", encoder_class.__name__],
                      tokenizer_dir: ["transformers", tokenizer_class.__name__]})
    kind.net_class(**spec["net"]).save_pretrained(out / kind.folder, safe_serialization=True)
    AutoencoderKL(**spec["vae"]).save_pretrained(out / "vae", safe_serialization=True)
    kind.scheduler_class(**spec["scheduler"]).save_pretrained(out / "scheduler")
    index.update({kind.folder: ["diffusers", kind.net_class.__name__], "vae": ["diffusers", "AutoencoderKL"],
                  "scheduler": ["diffusers", kind.scheduler_class.__name__]})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
