"""Rewards without model weights: DDPO's JPEG rewards, the torch preprocessing, and the registry."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from reward_fixtures import quantised_images, to_pil
from torchvision import transforms as T

from rewards.base import RewardConfigError
from rewards.preprocess import CLIP_MEAN, CLIP_STD, resize_crop_normalize
from rewards.registry import available_rewards, build_reward

PROMPTS = ["a", "b", "c"]


def reference_jpeg_kb(image: torch.Tensor, quality: int = 95) -> float:
    """DDPO's definition, written from the paper's description: kB of a PIL JPEG of the uint8 image."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth images on the uint8 grid: PIL's 8-bit intermediate clipping never triggers, so PIL ≈ float math."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g) * 0.8 + 0.1
    return (F.interpolate(base, size=(h, w), mode="bilinear", align_corners=True) * 255).round() / 255


# ---------------------------------------------------------------- JPEG


def test_jpeg_rewards_match_reference_sizes_and_signs():
    images = quantised_images(3, 24, 32, seed=0)
    images[1] = 0.5  # a flat image compresses far better than noise
    expected = torch.tensor([reference_jpeg_kb(img) for img in images])
    inc = build_reward("jpeg_incompressibility")
    comp = build_reward("jpeg_compressibility")
    got_inc, got_comp = inc(images, PROMPTS), comp(images, PROMPTS)
    assert got_inc.dtype == torch.float32 and got_inc.shape == (3,)
    torch.testing.assert_close(got_inc, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_comp, -expected, rtol=0, atol=1e-6)
    assert got_comp[1] > got_comp[0] and got_comp[1] > got_comp[2]


def test_jpeg_quantises_like_ddpo_round_not_floor():
    images = quantised_images(2, 16, 16, seed=1).clamp(max=250 / 255)
    reward = build_reward("jpeg_incompressibility")
    same = reward(images + 0.4 / 255, PROMPTS[:2])  # rounds back to the same uint8 image
    torch.testing.assert_close(same, reward(images, PROMPTS[:2]), rtol=0, atol=0)
    moved = images + 0.6 / 255  # rounds up one grey level: a different image
    assert not torch.equal(reward(moved, PROMPTS[:2]), reward(images, PROMPTS[:2]))


def test_jpeg_batch_invariance_determinism_and_no_graph():
    images = quantised_images(3, 20, 20, seed=2).requires_grad_(True)
    reward = build_reward("jpeg_compressibility")
    batch = reward(images, PROMPTS)
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-5)
    torch.testing.assert_close(reward(images, PROMPTS), batch, rtol=0, atol=0)
    assert not reward.differentiable and batch.grad_fn is None


def test_jpeg_quality_option():
    images = quantised_images(2, 32, 32, seed=3)
    low = build_reward("jpeg_incompressibility", {"jpeg_incompressibility": {"quality": 50}})
    torch.testing.assert_close(
        low(images, PROMPTS[:2]), torch.tensor([reference_jpeg_kb(i, 50) for i in images]), rtol=0, atol=1e-6
    )
    with pytest.raises(RewardConfigError, match=r"reward\.options\.jpeg_compressibility\.quality"):
        build_reward("jpeg_compressibility", {"jpeg_compressibility": {"quality": 0}})


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("width", [40, 43, 32])
def test_preprocess_crop_and_normalise_match_float64_reference(width):
    """Short side already at size: no resize; centre crop at round((W-size)/2) (torchvision), then (x-m)/s."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, width, dtype=torch.float64)
    got = resize_crop_normalize(x, 32, CLIP_MEAN, CLIP_STD)
    left = round((width - 32) / 2.0)  # Python rounds half to even, as torchvision's CenterCrop does
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (x[..., :, left : left + 32] - mean) / std
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_preprocess_longest_pads_centre_with_black():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 21, 32, dtype=torch.float64)
    got = resize_crop_normalize(x, 32, (0.0, 0.0, 0.0), (0.5, 0.5, 0.5), resize_mode="longest")
    expected = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    expected[:, :, 5:26] = x  # 11 rows of padding: 5 above, 6 below (open_clip's CenterCropOrPad)
    torch.testing.assert_close(got, expected / 0.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("h", "w", "size", "mode"),
    [(48, 40, 32, "shortest"), (20, 28, 64, "shortest"), (100, 60, 32, "shortest"), (32, 48, 24, "longest")],
)
def test_preprocess_resize_matches_pil_references(h, w, size, mode):
    """Down- and up-sizing agree with torchvision-on-PIL (CLIP/BLIP) and open_clip's HPS-style transform."""
    import open_clip

    x = smooth_images(2, h, w, seed=h + w)
    got = resize_crop_normalize(x, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize_mode=mode)
    if mode == "shortest":
        bicubic = T.InterpolationMode.BICUBIC
        pil_path = T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.ToTensor()])
    else:
        pil_path = open_clip.image_transform(size, False, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="longest")
    expected = torch.stack([pil_path(to_pil(img)) for img in x])
    diff = (got - expected).abs()
    assert got.shape == expected.shape
    assert diff.max() <= 1.5 / 255 and diff.mean() <= 0.5 / 255  # PIL rounds to uint8 (twice)


@pytest.mark.parametrize(("interpolation", "mode"), [("bicubic", "shortest"), ("bilinear", "longest")])
def test_preprocess_is_differentiable(interpolation, mode):
    torch.manual_seed(2)
    x = (0.3 + 0.4 * torch.rand(1, 3, 9, 7, dtype=torch.float64)).requires_grad_(True)  # no clamp in reach
    fn = lambda t: resize_crop_normalize(t, 5, CLIP_MEAN, CLIP_STD, mode, interpolation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_preprocess_rejects_unknown_modes():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"resize_mode 'squash'.*shortest"):
        resize_crop_normalize(x, 4, CLIP_MEAN, CLIP_STD, resize_mode="squash")
    with pytest.raises(ValueError, match=r"interpolation 'nearest'.*bicubic"):
        resize_crop_normalize(x, 4, CLIP_MEAN, CLIP_STD, interpolation="nearest")


# ---------------------------------------------------------------- registry


def test_weighted_sum_is_the_weighted_sum_of_parts():
    images = quantised_images(3, 16, 24, seed=4)
    kb = torch.tensor([reference_jpeg_kb(img) for img in images])
    combo = build_reward({"jpeg_compressibility": 2.0, "jpeg_incompressibility": 0.25})
    torch.testing.assert_close(combo(images, PROMPTS), 2.0 * -kb + 0.25 * kb, rtol=0, atol=1e-5)


def test_unknown_reward_lists_known_ones():
    with pytest.raises(RewardConfigError, match=r"unknown reward 'aesthetics'.*aesthetic.*jpeg_compressibility"):
        build_reward("aesthetics")
    assert {"aesthetic", "clip_score", "hps", "pickscore", "imagereward"} <= set(available_rewards())


def test_unknown_reward_option_is_a_one_line_config_error():
    from rewards.base import RewardConfigError
    from rewards.registry import build_reward

    match = r"reward\.options\.jpeg_compressibility: unknown option\(s\) \['qualty'\]"
    with pytest.raises(RewardConfigError, match=match):
        build_reward({"jpeg_compressibility": 1.0}, {"jpeg_compressibility": {"qualty": 90}})


def test_reward_client_scores_the_main_part_once():
    """A guided rollout actor scores in-process and also holds the reward actors' handles: the main reward must be
    taken from one of them, never summed over both (that doubled every reward before)."""
    from actors.reward import RewardClient

    class Handle:  # a reward actor stand-in that must not be asked for the main part
        class score:  # mimics ray's ``actor.method.remote``
            @staticmethod
            def remote(*_):
                raise AssertionError("the main part was sent to a reward actor although it is scored locally")

    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle on the left"] * 3
    local = build_reward({"world": 1.0})
    torch.testing.assert_close(RewardClient(local, [Handle()])(images, prompts), local(images, prompts))
