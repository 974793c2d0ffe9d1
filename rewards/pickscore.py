"""PickScore (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences, via transformers.

Score = ``logit_scale.exp() · cos(image, prompt)``, the convention of PickScore's published ``calc_probs``
(≈ 20-22 for SD1.5 images; docs/math.md §10). The model (``model_dir``: ``config.json`` + weights, e.g.
yuvalkirstain/PickScore_v1) and the processor (``processor_dir``: tokenizer files + ``preprocessor_config.json``,
e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K; defaults to ``model_dir``) load with ``local_files_only=True``. Only
the processor's settings are used for images (shortest-edge resize, centre crop, mean/std): the pixels go
through ``resize_crop_normalize`` in torch so the score stays differentiable. Prompts are tokenised as in
``calc_probs``: padded to the longest, truncated at the text model's 77 positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from policy.components import resolve_device
from rewards.base import Reward, RewardConfigError
from rewards.preprocess import require_path, resize_crop_normalize
from rewards.registry import register_reward

# PIL resample codes used by CLIPImageProcessor -> torch interpolation
_RESAMPLE = {3: "bicubic", 2: "bilinear"}


class PickScore(Reward):
    name = "pickscore"
    differentiable = True

    def __init__(self, model: CLIPModel, tokenizer, image_processor: CLIPImageProcessor):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        size, crop = image_processor.size.get("shortest_edge"), image_processor.crop_size
        if size is None or crop != {"height": size, "width": size}:
            raise RewardConfigError(
                f"reward.options.pickscore.processor_dir: expected a shortest_edge resize and an equal square "
                f"crop (CLIP's), got size={image_processor.size} crop_size={crop}"
            )
        if image_processor.resample not in _RESAMPLE:
            raise RewardConfigError(
                f"reward.options.pickscore.processor_dir: resample={image_processor.resample} is not supported; "
                f"use 3 (bicubic) or 2 (bilinear)"
            )
        self.size, self.interpolation = size, _RESAMPLE[image_processor.resample]
        self.mean, self.std = image_processor.image_mean, image_processor.image_std
        self.max_length = model.config.text_config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's resize / crop / normalise, in torch (differentiable)."""
        x = images.to(self.device, self.model.logit_scale.dtype)
        return resize_crop_normalize(x, self.size, self.mean, self.std, interpolation=self.interpolation)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.pixels(images)
        text = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        img = self.model.get_image_features(pixel_values=pixels)
        txt = self.model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (self.model.logit_scale.exp() * cos).float().to(images.device)


@register_reward("pickscore")
def pickscore(model_dir: str | None = None, processor_dir: str | None = None, device: str | None = None) -> PickScore:
    mdir = require_path(model_dir, "reward.options.pickscore.model_dir", "the PickScore_v1 model files", "directory")
    require_path(mdir / "config.json", "reward.options.pickscore.model_dir", "PickScore_v1's config.json + weights")
    pkey = "reward.options.pickscore.processor_dir"
    what = "the CLIP-ViT-H-14 processor"
    pdir = mdir if processor_dir is None else require_path(processor_dir, pkey, what, "directory")
    require_path(pdir / "preprocessor_config.json", pkey, "the CLIP-ViT-H-14 processor files")
    model = CLIPModel.from_pretrained(mdir, local_files_only=True).to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(pdir, local_files_only=True)
    return PickScore(model, tokenizer, CLIPImageProcessor.from_pretrained(pdir, local_files_only=True))
