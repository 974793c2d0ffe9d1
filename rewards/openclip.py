"""open_clip-based rewards: ``clip_score``, ``hps`` (HPSv2) and ``aesthetic`` (LAION improved aesthetic predictor).

All three build ``open_clip.create_model(arch, pretrained=<local file>)``: open_clip treats an existing file path
as a checkpoint and loads it strictly with ``weights_only=True``; the path is checked first, so a missing file is
a ``RewardConfigError`` and open_clip never falls back to a download. The tokenizer is ``open_clip.get_tokenizer
(arch)``: for CLIP-style configs it is the BPE ``SimpleTokenizer`` whose vocabulary ships inside the package, so
it works offline. Images go through ``resize_crop_normalize`` with the model's own ``preprocess_cfg`` (size,
mean, std, interpolation), which keeps every score differentiable w.r.t. the input pixels.

Scales (the published conventions):
- ``clip_score`` = 100 · cos(image, prompt), no clamp at 0 (torchmetrics' CLIPScore clamps; a clamp would zero the
  gradient of poorly matching pairs). logit_scale is not used, so the value does not depend on training temperature.
- ``hps`` = 100 · cos(image, prompt): HPSv2 (tgxs002/HPSv2 ``evaluation.py``) scores ``image_features @
  text_features.T`` of normalised features and reports the mean × 100 (e.g. 27.5 for SD1.5). HPSv2 preprocesses
  with ``resize_longest_max=True`` (long side to 224, black padding), reproduced here; on square images it is a
  plain resize.
- ``aesthetic`` = MLP(normalised image embedding), the LAION "improved aesthetic predictor"
  (christophschuhmann/improved-aesthetic-predictor, also DDPO's ``aesthetic_scorer.py``): Linear(d,1024) -
  Dropout(0.2) - Linear(1024,128) - Dropout(0.2) - Linear(128,64) - Dropout(0.1) - Linear(64,16) - Linear(16,1),
  no activations (the ReLUs are commented out in the reference), on CLIP ViT-L/14 embeddings (d = 768); its
  weights file ``sac+logos+ava1-l14-linearMSE.pth`` holds the keys ``layers.{0,2,4,6,7}.{weight,bias}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from torch import nn

from policy.components import resolve_device
from rewards.base import Reward, RewardConfigError
from rewards.preprocess import load_state_dict_file, require_path, resize_crop_normalize
from rewards.registry import register_reward

# OpenAI's CLIP weights were trained with QuickGELU; open_clip names that architecture "-quickgelu".
OPENAI_L14 = "ViT-L-14-quickgelu"


def load_open_clip(arch: str, checkpoint: str | None, key: str, what: str, device: torch.device) -> nn.Module:
    """A frozen, eval-mode open_clip model of architecture ``arch`` with weights from a local file only."""
    path = require_path(checkpoint, key, what)
    if arch not in open_clip.list_models():
        raise RewardConfigError(
            f"{key.rsplit('.', 1)[0]}.arch: unknown open_clip architecture {arch!r} "
            f"(e.g. ViT-L-14-quickgelu, ViT-H-14; see open_clip.list_models())"
        )
    model = open_clip.create_model(arch, pretrained=str(path), device=device)
    return model.eval().requires_grad_(False)


class OpenClipReward(Reward):
    """Shared part: frozen open_clip model, its tokenizer, and torch preprocessing from its ``preprocess_cfg``."""

    differentiable = True

    def __init__(self, name: str, model: nn.Module, arch: str, resize_mode: str | None = None):
        self.name, self.model = name, model
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = model.visual.preprocess_cfg
        size = cfg["size"]
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise RewardConfigError(f"reward.options.{name}.arch: {arch} wants {height}x{width} input; only square")
        self.size, self.mean, self.std = height, cfg["mean"], cfg["std"]
        self.interpolation = cfg["interpolation"]
        self.resize_mode = resize_mode or cfg["resize_mode"]

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, d] (graph kept to ``images``)."""
        dtype = self.model.logit_scale.dtype
        x = resize_crop_normalize(
            images.to(self.device, dtype), self.size, self.mean, self.std, self.resize_mode, self.interpolation
        )
        return self.model.encode_image(x, normalize=True)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised prompt embeddings [B, d]."""
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)


class ClipCosine(OpenClipReward):
    """100 · cos(image embedding, prompt embedding): ``clip_score`` and HPSv2 (see module docstring)."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        return (100.0 * cos).float().to(images.device)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP; attribute and index names match its weights file."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


class Aesthetic(OpenClipReward):
    """LAION aesthetic score (≈1..10) of the image alone; prompts are ignored."""

    def __init__(self, model: nn.Module, arch: str, head: AestheticHead):
        super().__init__("aesthetic", model, arch)
        self.head = head

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.head(self.image_features(images)).float().to(images.device)


@register_reward("clip_score")
def clip_score(checkpoint: str | None = None, arch: str = OPENAI_L14, device: str | None = None) -> ClipCosine:
    """CLIP score; default OpenAI CLIP ViT-L/14 (open_clip-format weights, e.g. ``open_clip_pytorch_model.bin``)."""
    dev = resolve_device(device)
    what = f"the open_clip weights of {arch} (e.g. open_clip_pytorch_model.bin)"
    model = load_open_clip(arch, checkpoint, "reward.options.clip_score.checkpoint", what, dev)
    return ClipCosine("clip_score", model, arch)


@register_reward("hps")
def hps(checkpoint: str | None = None, arch: str = "ViT-H-14", device: str | None = None) -> ClipCosine:
    """HPSv2: ViT-H-14 fine-tuned on HPD v2 (``HPS_v2_compressed.pt``, or ``HPS_v2.1_compressed.pt`` for v2.1)."""
    dev = resolve_device(device)
    model = load_open_clip(arch, checkpoint, "reward.options.hps.checkpoint", "the HPS_v2_compressed.pt", dev)
    return ClipCosine("hps", model, arch, resize_mode="longest")


@register_reward("aesthetic")
def aesthetic(
    checkpoint: str | None = None, head: str | None = None, arch: str = OPENAI_L14, device: str | None = None
) -> Aesthetic:
    """LAION aesthetic predictor: OpenAI CLIP ViT-L/14 + ``sac+logos+ava1-l14-linearMSE.pth`` head."""
    dev = resolve_device(device)
    what = f"the open_clip weights of {arch} (e.g. open_clip_pytorch_model.bin)"
    model = load_open_clip(arch, checkpoint, "reward.options.aesthetic.checkpoint", what, dev)
    head_path = require_path(head, "reward.options.aesthetic.head", "the sac+logos+ava1-l14-linearMSE.pth")
    mlp = AestheticHead(model.visual.output_dim)
    try:
        mlp.load_state_dict(load_state_dict_file(head_path, "reward.options.aesthetic.head"))
    except RuntimeError as err:  # wrong keys or a head trained on another embedding width
        detail = " ".join(str(err).split())[:300]
        raise RewardConfigError(f"reward.options.aesthetic.head: {head_path} does not fit the MLP: {detail}") from err
    return Aesthetic(model, arch, mlp.to(dev).eval().requires_grad_(False))
