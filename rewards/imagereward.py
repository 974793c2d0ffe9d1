"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 + BERT cross-encoder + MLP, trained on human rankings.

The real class ``ImageReward.ImageReward.ImageReward`` is built directly from a local ``med_config.json`` (not
``ImageReward.load()``, which downloads the config and unpickles the checkpoint with code execution allowed);
its state dict then loads from a local ``ImageReward.pt`` (``weights_only=True``) or ``.safetensors``. The BERT
tokenizer comes from ``tokenizer_dir`` (bert-base-uncased's ``vocab.txt``) through ``rewards.imagereward_compat``.

Scoring is the library's own differentiable ``score_gard(ids, mask, pixels)``, which returns the normalised
reward ``(r − 0.167)/1.033`` as ``ImageReward.score`` does; only the PIL preprocessing of ``score`` is replaced by
the torch equivalent (224 px shortest-edge bicubic resize, centre crop, OpenAI CLIP mean/std), so gradients
reach the pixels. Prompts are tokenised as in ``ImageReward.score``: padded to 35 tokens, truncated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from policy.components import resolve_device
from rewards.base import Reward, RewardConfigError
from rewards.imagereward_compat import import_imagereward, local_bert_tokenizer
from rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    load_state_dict_file,
    require_path,
    resize_crop_normalize,
)
from rewards.registry import register_reward

log = logging.getLogger(__name__)

IMAGE_SIZE = 224  # ImageReward builds BLIP_Pretrain(image_size=224, vit='large')
PROMPT_TOKENS = 35  # ImageReward.score: padding='max_length', max_length=35


class ImageRewardScore(Reward):
    name = "imagereward"
    differentiable = True

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ImageRewardScore:
        super().to(device)
        self.model.device = torch.device(device)  # score_gard puts its attention mask on model.device
        return self

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = resize_crop_normalize(images.to(self.device, dtype), IMAGE_SIZE, CLIP_MEAN, CLIP_STD)
        text = self.model.blip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        rewards = self.model.score_gard(text.input_ids, text.attention_mask, pixels)
        return rewards.squeeze(-1).float().to(images.device)


def load_weights(model: nn.Module, path: Path, key: str) -> None:
    """Load a state dict, refusing one that leaves any parameter at its random init (the silent-no-op bug).

    ``strict=False`` as ImageReward.load() does, so that buffers (e.g. BERT's position_ids) may be absent.
    """
    result = model.load_state_dict(load_state_dict_file(path, key), strict=False)
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params]
    if missing:
        raise RewardConfigError(
            f"{key}: {path} lacks {len(missing)} of ImageReward's weights (e.g. {missing[:3]}); is it ImageReward.pt?"
        )
    if result.unexpected_keys:
        log.warning(
            "%s: ignoring %d unexpected keys (e.g. %s)", key, len(result.unexpected_keys), result.unexpected_keys[:3]
        )


@register_reward("imagereward")
def imagereward(
    checkpoint: str | None = None,
    med_config: str | None = None,
    tokenizer_dir: str | None = None,
    device: str | None = None,
) -> ImageRewardScore:
    opt = "reward.options.imagereward"
    ckpt = require_path(checkpoint, f"{opt}.checkpoint", "ImageReward.pt (THUDM/ImageReward)")
    config = require_path(med_config, f"{opt}.med_config", "med_config.json (THUDM/ImageReward)")
    vocab_what = "bert-base-uncased's vocab.txt (or a tokenizer directory holding it)"
    source = require_path(tokenizer_dir, f"{opt}.tokenizer_dir", vocab_what, kind="path")
    if source.is_dir():
        require_path(source / "vocab.txt", f"{opt}.tokenizer_dir", vocab_what)
    module = import_imagereward()
    dev = resolve_device(device)
    with local_bert_tokenizer(source):
        model = module.ImageReward(med_config=str(config), device=dev)
    load_weights(model, ckpt, f"{opt}.checkpoint")
    return ImageRewardScore(model).to(dev)
