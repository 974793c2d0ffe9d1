"""Tiny random stand-ins for the real reward models, written to disk in each model's real file format.

Nothing is downloaded: open_clip gets a registered tiny architecture (its BPE vocabulary ships with the
package), PickScore a tiny ``CLIPModel`` + the project's offline word tokenizer, ImageReward a 1-layer BERT
``med_config.json`` + a small ``vocab.txt`` (its ViT-L/16 vision tower is fixed by the library).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

TINY_OPEN_CLIP = "tiny-test-clip"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
WORDS = ["a", "red", "blue", "green", "cat", "dog", "on", "the", "grass", "photo", "of", "big", "small"]
PROMPTS = ["a red cat", "a photo of a big blue dog on the grass", "green", "the small cat on a dog"]


def quantised_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random [n,3,h,w] float32 images on the uint8 grid (k/255), so PIL references see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    array = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def register_tiny_open_clip(config_dir: Path) -> str:
    """Register the tiny architecture with open_clip (its supported ``add_model_config``); returns its name."""
    import open_clip

    if TINY_OPEN_CLIP not in open_clip.list_models():
        path = Path(config_dir) / f"{TINY_OPEN_CLIP}.json"
        path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
        open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def aesthetic_head_layout(dim: int) -> nn.Sequential:
    """The LAION improved-aesthetic-predictor layout, written here from its public description."""
    return nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def save_tiny_open_clip(out: Path) -> SimpleNamespace:
    """A tiny open_clip model + an aesthetic head (.pth and .safetensors) saved in ``out``, with what the
    references and the rewards' options need."""
    import open_clip
    from safetensors.torch import save_file

    arch = register_tiny_open_clip(out)
    torch.manual_seed(0)
    model = open_clip.create_model(arch).eval()
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    head = aesthetic_head_layout(model.visual.output_dim).eval()
    head_state = {f"layers.{k}": v for k, v in head.state_dict().items()}
    torch.save(head_state, out / "head.pth")
    save_file(head_state, str(out / "head.safetensors"))
    return SimpleNamespace(
        arch=arch,
        model=model,
        head=head,
        dir=out,
        tokenizer=open_clip.get_tokenizer(arch),
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        options={"checkpoint": str(out / "open_clip_pytorch_model.bin"), "arch": arch, "device": "cpu"},
    )


def batch_and_singles(reward, images: torch.Tensor, prompts: list[str]
                      ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A reward's scores of the batch and of each image alone (the first through autograd: a leaf that requires
    grad, returned too); the two differ only in float order."""
    batch = reward(images, prompts)
    first = images[:1].clone().requires_grad_(True)
    singles = [reward(first, prompts[:1])]
    singles += [reward(images[i : i + 1], prompts[i : i + 1]) for i in range(1, len(prompts))]
    return batch, singles, first


def save_tiny_pickscore(out: Path, seed: int = 0):
    """A tiny CLIPModel + tokenizer + image processor saved like PickScore_v1 / the laion processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from policy.tokenizer import write_word_tokenizer

    tokenizer = write_word_tokenizer(WORDS, out, max_length=16)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # exp(3) ≈ 20: a scale that is not 1, so a dropped factor shows
    model.save_pretrained(out)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(out)
    return model, processor


BLIP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def build_tiny_imagereward(out: Path) -> tuple[nn.Module, dict[str, str]]:
    """The real ImageReward class with a 1-layer text encoder (ViT-L/16 is fixed: ~310 M params) and its MLP spread
    out, plus the reward options that load it once its state is saved as ``out/ImageReward.pt``."""
    from rewards.imagereward_compat import import_imagereward, local_bert_tokenizer

    med_config, vocab = write_tiny_imagereward_config(out)
    module = import_imagereward()
    torch.manual_seed(0)
    with local_bert_tokenizer(vocab):
        model = module.ImageReward(med_config=str(med_config), device="cpu").eval()
    with torch.no_grad():  # the library's MLP init (std 1/769) makes all rewards ≈ -0.16: spread them out
        for layer in model.mlp.layers:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0, layer.in_features**-0.5)
                layer.bias.normal_(0, 0.1)
    options = {"checkpoint": str(out / "ImageReward.pt"), "med_config": str(med_config), "tokenizer_dir": str(out),
               "device": "cpu"}
    return model, options


def write_tiny_imagereward_config(out: Path) -> tuple[Path, Path]:
    """A 1-layer BERT med_config.json (hidden size 768: ImageReward's MLP expects it) + a matching vocab.txt."""
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(BLIP_VOCAB) + "\n")
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_size": 768,
        "num_hidden_layers": 1,
        "num_attention_heads": 12,
        "intermediate_size": 64,
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(BLIP_VOCAB) + 2,  # + [DEC] and [ENC], added by BLIP's init_tokenizer
        "encoder_width": 1024,
        "add_cross_attention": True,
    }
    med_config = out / "med_config.json"
    med_config.write_text(json.dumps(config))
    return med_config, vocab
