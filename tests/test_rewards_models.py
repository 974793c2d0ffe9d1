"""Model rewards on tiny random models saved in the real file formats and loaded through the real paths.

Each reference is written here from the published formula, in float64, on the in-memory model that produced
the weights file: clip_score/HPS = 100·cos, PickScore = exp(logit_scale)·cos, aesthetic = LAION MLP(normalised
embedding), ImageReward = the library's own PIL-preprocessed ``ImageReward.score``.
"""

from __future__ import annotations

import copy
import importlib
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import tolerance
from reward_fixtures import (
    BLIP_VOCAB,
    PROMPTS,
    aesthetic_head_layout,
    batch_and_singles,
    build_tiny_imagereward,
    quantised_images,
    save_tiny_open_clip,
    save_tiny_pickscore,
    to_pil,
    write_tiny_imagereward_config,
)
from torch import nn

from rewards.base import RewardConfigError
from rewards.registry import build_reward

# ---------------------------------------------------------------- shared checks


def assert_reward_contract(
    reward,
    images: torch.Tensor,
    prompts: list[str],
    # float-order spread: max 1.2e-05 over 24 seeds (bench/tolerances.py); bound 5e-05 = 4x
    spread: str = "reward_models.batch_vs_singles",
) -> torch.Tensor:
    """Shape/dtype, batch invariance, determinism and gradients to the pixels; returns the batch scores.

    Batch invariance holds up to float order: a batch may take other kernels than single items (and attention's
    no-grad fast path differs from the autograd path), so bit equality is not expected there; the bound is the
    ``spread`` entry of bench/tolerances.json. Repeating the same call must be bit-identical. Few forwards:
    ImageReward's ViT-L is slow on CPU.
    """
    assert reward.differentiable
    batch, singles, first = batch_and_singles(reward, images, prompts)
    assert batch.shape == (len(prompts),) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(torch.cat(singles).detach(), batch, rtol=0, atol=tolerance(spread))
    torch.testing.assert_close(reward(images[-1:], prompts[-1:]), singles[-1], rtol=0, atol=0)
    singles[0].sum().backward()
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    return batch


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- open_clip: clip_score, hps, aesthetic


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def clip_reference(files, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 normalised image / text embeddings of already-sized [0,1] pixels."""
    model = copy.deepcopy(files.model).double()
    mean = torch.tensor(files.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(files.std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((pixels.double() - mean) / std)
        txt = model.encode_text(files.tokenizer(prompts))
    return unit(img), unit(txt)


def test_clip_score_is_100_cos_of_the_saved_model(clip_files):
    reward = build_reward("clip_score", {"clip_score": clip_files.options})
    images = quantised_images(4, 32, 32, seed=1)
    img, txt = clip_reference(clip_files, images, PROMPTS)
    expected = 100 * (img * txt).sum(-1)
    got = assert_reward_contract(reward, images, PROMPTS)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_hps_pads_the_long_side_like_hpsv2(clip_files):
    reward = build_reward("hps", {"hps": clip_files.options})
    images = quantised_images(4, 24, 32, seed=2)  # long side already 32: only the black padding remains
    padded = torch.zeros(4, 3, 32, 32)
    padded[:, :, 4:28] = images
    img, txt = clip_reference(clip_files, padded, PROMPTS)
    got = assert_reward_contract(reward, images, PROMPTS)
    torch.testing.assert_close(got.double(), 100 * (img * txt).sum(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_file", ["head.pth", "head.safetensors"])
def test_aesthetic_is_the_laion_mlp_of_the_normalised_embedding(clip_files, head_file):
    options = {**clip_files.options, "head": str(clip_files.dir / head_file)}
    reward = build_reward("aesthetic", {"aesthetic": options})
    images = quantised_images(3, 48, 40, seed=3)  # resized + cropped inside; compared after the same steps
    got = assert_reward_contract(reward, images, PROMPTS[:3])
    from rewards.preprocess import resize_crop_normalize

    sized = resize_crop_normalize(images, 32, (0, 0, 0), (1, 1, 1))
    img, _ = clip_reference(clip_files, sized, PROMPTS[:3])
    with torch.no_grad():
        expected = copy.deepcopy(clip_files.head).double()(img).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_weighted_sum_of_model_rewards(clip_files):
    head = str(clip_files.dir / "head.pth")
    options = {"clip_score": clip_files.options, "aesthetic": {**clip_files.options, "head": head}}
    images = quantised_images(2, 32, 32, seed=4)
    combo = build_reward({"clip_score": 0.5, "aesthetic": -2.0}, options)
    a = build_reward("clip_score", options)(images, PROMPTS[:2])
    b = build_reward("aesthetic", options)(images, PROMPTS[:2])
    assert combo.differentiable
    torch.testing.assert_close(combo(images, PROMPTS[:2]), 0.5 * a - 2.0 * b, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("clip_score", {"checkpoint": "/nonexistent/c.bin"},
         r"reward\.options\.clip_score\.checkpoint: file not found"),
        ("hps", {"checkpoint": "/nonexistent/h.pt"}, r"reward\.options\.hps\.checkpoint: .*HPS_v2_compressed\.pt"),
        ("hps", {"checkpoint": None}, r"reward\.options\.hps\.checkpoint is required"),
        ("aesthetic", {"head": "/nonexistent/head.pth"}, r"reward\.options\.aesthetic\.head: file not found"),
        ("clip_score", {"arch": "ViT-Q-99"}, r"reward\.options\.clip_score\.arch: unknown open_clip arch"),
    ],
)
def test_open_clip_config_errors_name_the_option(clip_files, name, override, message):
    options = {**clip_files.options, "head": str(clip_files.dir / "head.pth"), **override}
    if name != "aesthetic":
        options.pop("head")
    with pytest.raises(RewardConfigError, match=message):
        build_reward(name, {name: options})


def test_aesthetic_head_of_the_wrong_width_is_refused(clip_files, tmp_path):
    wrong = aesthetic_head_layout(768)
    torch.save({f"layers.{k}": v for k, v in wrong.state_dict().items()}, tmp_path / "l14_head.pth")
    options = {**clip_files.options, "head": str(tmp_path / "l14_head.pth")}
    with pytest.raises(RewardConfigError, match=r"reward\.options\.aesthetic\.head: .* does not fit the MLP"):
        build_reward("aesthetic", {"aesthetic": options})


# ---------------------------------------------------------------- PickScore


@pytest.fixture(scope="module")
def pick_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("pickscore")
    model, processor = save_tiny_pickscore(out, seed=0)
    return SimpleNamespace(dir=out, model=model, processor=processor)


def pickscore_reference(files, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """PickScore's calc_probs formula on the HF processor's (PIL) pixels.

    float32: transformers' CLIP text causal mask overflows in float64 (``torch.full`` with float64's min).
    """
    from transformers import AutoTokenizer

    model = files.model
    pixels = files.processor(images=[to_pil(i) for i in images], return_tensors="pt").pixel_values
    tokens = AutoTokenizer.from_pretrained(files.dir)(prompts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = unit(model.get_image_features(pixel_values=pixels))
        txt = unit(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
        return (model.logit_scale.exp() * (img * txt).sum(-1)).double()


def test_pickscore_is_scaled_cos_of_the_saved_model(pick_files):
    reward = build_reward("pickscore", {"pickscore": {"model_dir": str(pick_files.dir), "device": "cpu"}})
    images = quantised_images(4, 32, 32, seed=5)
    got = assert_reward_contract(reward, images, PROMPTS)  # prompts of different lengths: padding differs
    torch.testing.assert_close(got.double(), pickscore_reference(pick_files, images, PROMPTS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("h", "w"), [(48, 40), (20, 28)])
def test_pickscore_preprocesses_like_its_processor(pick_files, h, w):
    """Down- and up-sizing: the torch pixels match the HF processor's PIL pixels to PIL's uint8 rounding."""
    from test_rewards_analytic import smooth_images

    reward = build_reward("pickscore", {"pickscore": {"model_dir": str(pick_files.dir), "device": "cpu"}})
    images = smooth_images(2, h, w, seed=6)
    expected = pick_files.processor(images=[to_pil(i) for i in images], return_tensors="pt").pixel_values
    std = torch.tensor(pick_files.processor.image_std).view(1, 3, 1, 1)
    diff = ((reward.pixels(images) - expected) * std).abs()  # back in [0, 1] pixel units
    assert diff.max() <= 1.5 / 255 and diff.mean() <= 0.5 / 255


def test_pickscore_config_errors_name_the_option(pick_files, tmp_path):
    with pytest.raises(RewardConfigError, match=r"reward\.options\.pickscore\.model_dir is required"):
        build_reward("pickscore")
    with pytest.raises(RewardConfigError, match=r"reward\.options\.pickscore\.model_dir: file not found: .*config"):
        build_reward("pickscore", {"pickscore": {"model_dir": str(tmp_path)}})
    options = {"model_dir": str(pick_files.dir), "processor_dir": str(tmp_path / "nope")}
    with pytest.raises(RewardConfigError, match=r"reward\.options\.pickscore\.processor_dir: directory not found"):
        build_reward("pickscore", {"pickscore": options})


# ---------------------------------------------------------------- ImageReward


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """The real ImageReward class with a 1-layer text encoder, built once and saved for the real loading path."""
    out = tmp_path_factory.mktemp("imagereward")
    model, options = build_tiny_imagereward(out)
    torch.save(model.state_dict(), options["checkpoint"])
    return SimpleNamespace(model=model, options=options, dir=out)


@pytest.fixture(scope="module")
def imagereward_reward(imagereward_files):
    return build_reward("imagereward", {"imagereward": imagereward_files.options})


# The two tests below run the real ViT-L/16 (two builds of ~310 M parameters, a 1.2 GB checkpoint round trip,
# ~10 forward-equivalents at 224 px): 50-60 s on the shared 2-core machine, so they are `slow` (RUN_SLOW=1).
# The cheap ImageReward tests further down (compat patches, config errors, weight checks) always run.
@pytest.mark.slow
def test_imagereward_loads_and_matches_the_library_score(imagereward_files, imagereward_reward):
    """Loaded through the real path, the reward equals the library's own PIL-preprocessed ``score`` (at 224 px
    PIL's resize is the identity), and its gradient reaches the pixels."""
    images = quantised_images(2, 224, 224, seed=7)
    prompts = PROMPTS[:2]
    x = images.clone().requires_grad_(True)
    got = imagereward_reward(x, prompts)
    assert got.shape == (2,) and got.dtype == torch.float32
    with torch.no_grad():
        library = imagereward_files.model
        expected = torch.tensor([library.score(p, to_pil(i)) for p, i in zip(prompts, images, strict=True)])
    assert (expected[0] - expected[1]).abs() > 0.01  # distinct rewards: a swapped or constant output would show
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-4)
    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.slow
def test_imagereward_contract_on_resized_inputs(imagereward_reward):
    images = quantised_images(2, 64, 64, seed=8)
    # float-order spread: max 7.2e-07 over 24 seeds (bench/tolerances.py); bound 5e-06 = 7x
    assert_reward_contract(imagereward_reward, images, PROMPTS[2:], spread="imagereward.batch_vs_singles")


@pytest.mark.parametrize("key", ["checkpoint", "med_config", "tokenizer_dir"])
def test_imagereward_missing_files_name_the_option(key, tmp_path):
    med_config, _ = write_tiny_imagereward_config(tmp_path)
    open(tmp_path / "ImageReward.pt", "wb").close()
    options = {
        "checkpoint": str(tmp_path / "ImageReward.pt"),
        "med_config": str(med_config),
        "tokenizer_dir": str(tmp_path),
        key: str(tmp_path / "missing" / "x"),
    }
    with pytest.raises(RewardConfigError, match=rf"reward\.options\.imagereward\.{key}: .*not found"):
        build_reward("imagereward", {"imagereward": options})


def test_imagereward_refuses_weights_that_leave_parameters_random(tmp_path, caplog):
    from rewards.imagereward import load_weights

    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    state = model.state_dict()
    state.pop("1.num_batches_tracked")  # a missing buffer is tolerated, as ImageReward.load(strict=False) does
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "ok.pt")
    with caplog.at_level(logging.WARNING):
        load_weights(model, tmp_path / "ok.pt", "reward.options.imagereward.checkpoint")
    assert "unexpected" in caplog.text
    state.pop("0.weight")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(RewardConfigError, match=r"reward\.options\.imagereward\.checkpoint: .* lacks 1 .*0\.weight"):
        load_weights(model, tmp_path / "partial.pt", "reward.options.imagereward.checkpoint")


def test_imagereward_compat_is_idempotent_and_local(tmp_path):
    import transformers
    import transformers.modeling_utils as mu

    from rewards.imagereward_compat import import_imagereward, local_blip_tokenizer

    verbosity = transformers.logging.get_verbosity()
    first = import_imagereward()
    patched = (mu.apply_chunking_to_forward, mu.prune_linear_layer, mu.find_pruneable_heads_and_indices)
    assert import_imagereward() is first
    assert (mu.apply_chunking_to_forward, mu.prune_linear_layer, mu.find_pruneable_heads_and_indices) == patched
    assert transformers.logging.get_verbosity() == verbosity
    with pytest.raises(NotImplementedError, match="pruning"):
        mu.find_pruneable_heads_and_indices([0], 1, 1, set())
    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    with pytest.raises(RuntimeError, match="local_bert_tokenizer"):
        blip.init_tokenizer()
    _, vocab = write_tiny_imagereward_config(tmp_path)
    tokenizer = local_blip_tokenizer(vocab)
    n = len(BLIP_VOCAB)
    assert (tokenizer.bos_token_id, tokenizer.enc_token_id, len(tokenizer)) == (n, n + 1, n + 2)
    ids = tokenizer("A Red cat").input_ids
    assert ids == [BLIP_VOCAB.index(t) for t in ["[CLS]", "a", "red", "cat", "[SEP]"]]
