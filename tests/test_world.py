"""The embedded world: scenes, split, prompt-aware rewards (against float64 references) and the committed model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import OTHER_POSITION, tolerance, world_scored_batch, world_scores_three_ways

from rewards.base import RewardConfigError
from rewards.registry import build_reward
from rewards.world import DEFAULT_CAP, WorldFidelity, WorldPreference, WorldReward
from world.scenes import (
    COLOURS,
    JITTER,
    POSITIONS,
    RADIUS_RANGE,
    SHAPES,
    Scene,
    all_triples,
    parse_prompt,
    prompt_of,
    render,
    render_batch,
    sample_scenes,
    split_prompts,
    vocabulary,
)

MODEL_DIR = Path(__file__).resolve().parents[1] / "world" / "model"


# ---- scenes ---------------------------------------------------------------------------------------------------
def test_every_combination_round_trips_and_renders():
    for triple in all_triples():
        prompt = prompt_of(triple)
        assert parse_prompt(prompt) == triple
        assert set(prompt.split()) <= set(vocabulary())
        scene = sample_scenes([prompt], 1, seed=0)[0]
        assert (scene.colour, scene.shape, scene.position) == triple and prompt_of(scene) == prompt
        image = render(scene)
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        # the shape's colour is really drawn: some pixel equals it
        rgb = torch.tensor(COLOURS[triple[0]])[:, None, None]
        assert (image - rgb).abs().amax(0).min() < 1e-6


def test_parse_prompt_normalises_case_and_spaces_and_rejects_the_rest():
    assert parse_prompt("  A Red   circle on the LEFT ") == ("red", "circle", "left")
    for bad in ("a purple circle on the left", "a red hexagon in the center", "a red circle", "", "red circle left"):
        with pytest.raises(ValueError, match="outside the world grammar"):
            parse_prompt(bad)


@pytest.mark.parametrize("shape", SHAPES)
def test_render_has_the_equal_area_and_the_centre_it_was_given(shape):
    """Coverage recovered from the pixels (independently of the SDF code) integrates to π r² around (cx, cy)."""
    size = 128
    scene = Scene("blue", shape, "center", cx=0.46, cy=0.53, radius=0.15, background=0.2, gradient=0.0)
    image = render(scene, size).double()
    rgb = torch.tensor(COLOURS["blue"], dtype=torch.float64)
    coverage = (image[2] - 0.2) / (rgb[2] - 0.2)  # blue channel: the largest colour-background contrast
    area = coverage.sum() / size**2
    assert area.item() == pytest.approx(math.pi * 0.15**2, rel=0.01)
    grid = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    cx = (coverage * grid[None, :]).sum() / coverage.sum()
    cy = (coverage * grid[:, None]).sum() / coverage.sum()
    assert cx.item() == pytest.approx(0.46, abs=2e-3)
    assert cy.item() == pytest.approx(0.53, abs=2e-3)


def test_split_holds_out_combinations_while_keeping_every_word_and_pair():
    train, heldout = split_prompts(0)
    assert len(heldout) == round(0.2 * len(all_triples())) and len(train) + len(heldout) == len(all_triples())
    assert not set(train) & set(heldout)
    train_t = [parse_prompt(p) for p in train]
    for i, values in enumerate((COLOURS, SHAPES, POSITIONS)):
        assert {t[i] for t in train_t} == set(values)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert {(t[i], t[j]) for t in train_t} == {(t[i], t[j]) for t in all_triples()}
    assert split_prompts(0) == (train, heldout)
    assert split_prompts(1)[1] != heldout
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_prompts(0, heldout_fraction=0.7)


def test_sampling_is_deterministic_by_seed_and_stays_in_range():
    prompts, _ = split_prompts(0)
    a, b, c = (sample_scenes(prompts, 200, seed=s) for s in (3, 3, 4))
    assert a == b and a != c
    assert torch.equal(render_batch(a[:8]), render_batch(b[:8]))
    for i, s in enumerate(a):
        assert prompt_of(s) == prompts[i % len(prompts)]
        assert RADIUS_RANGE[0] <= s.radius <= RADIUS_RANGE[1]
        x, y = POSITIONS[s.position]
        assert abs(s.cx - x) <= JITTER and abs(s.cy - y) <= JITTER
    assert {s.radius for s in sample_scenes(prompts, 5, seed=0, radius=0.18)} == {0.18}


# ---- rewards --------------------------------------------------------------------------------------------------
def _reference(images: torch.Tensor, prompts: list[str], tau: float, a0: float, tol: float, s: float, cap: float,
               w: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64, pixel by pixel, straight from the formulas in rewards/world.py's docstring (32x32 inputs)."""
    fids, prefs = [], []
    for image, prompt in zip(images.double(), prompts, strict=True):
        colour, _, position = parse_prompt(prompt)
        rgb = torch.tensor(COLOURS[colour], dtype=torch.float64)
        tx, ty = POSITIONS[position]
        mass = sx = sy = 0.0
        for row in range(32):
            for col in range(32):
                d = torch.linalg.vector_norm(image[:, row, col] - rgb).item()
                m = math.exp(-0.5 * (d / tau) ** 4)
                mass, sx, sy = mass + m, sx + m * (col + 0.5) / 32, sy + m * (row + 0.5) / 32
        area = mass / 1024
        dist = math.hypot(sx / mass - tx, sy / mass - ty)
        fids.append((1 - math.exp(-area / a0)) * math.exp(-max(0.0, dist - tol) ** 2 / (2 * s * s)))
        prefs.append(max(0.0, 1 - abs(area / cap - 1)))
    fid, pref = torch.tensor(fids, dtype=torch.float64), torch.tensor(prefs, dtype=torch.float64)
    return fid, pref, fid + w * pref


@pytest.mark.parametrize("seed", [0, 1])
def test_rewards_match_a_float64_reference(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    tau, a0, tol, s, cap, w = (float(v) for v in torch.rand(6, generator=gen) * 0.1 + torch.tensor(
        [0.17, 0.004, 0.04, 0.06, 0.08, 0.3]))
    images, prompts = world_scored_batch(seed)
    fid, pref, total = _reference(images, prompts, tau, a0, tol, s, cap, w)
    got_fid = WorldFidelity(bandwidth=tau, presence_area=a0, tolerance=tol, sigma=s)(images, prompts)
    got_pref = WorldPreference(bandwidth=tau, cap=cap)(images, prompts)
    got = WorldReward(preference_weight=w, bandwidth=tau, presence_area=a0, tolerance=tol, sigma=s, cap=cap)(
        images, prompts)
    assert fid.std() > 0.05 and pref.std() > 0.05  # the batch exercises the formulas, not a constant
    torch.testing.assert_close(got_fid.double(), fid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_pref.double(), pref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), total, rtol=1e-5, atol=1e-6)


def test_ideal_renders_beat_wrong_colour_and_wrong_position():
    prompts = [prompt_of(t) for t in all_triples()]
    scenes = sample_scenes(prompts, len(prompts), seed=0, radius=RADIUS_RANGE[1])
    images = render_batch(scenes)
    wrong_pos = [prompt_of((s.colour, s.shape, OTHER_POSITION[s.position])) for s in scenes]
    palette = list(COLOURS)
    wrong_col = [prompt_of((palette[(palette.index(s.colour) + 1) % len(palette)], s.shape, s.position))
                 for s in scenes]
    for reward in (WorldFidelity(), WorldPreference(), WorldReward()):
        ideal = reward(images, prompts)
        assert ideal.shape == (len(prompts),) and ideal.dtype == torch.float32
        assert (reward(images, wrong_col) < ideal - 0.5).all(), reward.name
    fid = WorldFidelity()
    assert (fid(images, prompts) > 0.99).all() and (fid(images, wrong_pos) < 0.35).all()
    assert (WorldPreference()(images, prompts) > 0.85).all()
    # smaller shapes (the data's average size) score lower on the preference: the headroom alignment can learn
    small = render_batch(sample_scenes(prompts, len(prompts), seed=0, radius=RADIUS_RANGE[0]))
    assert (WorldPreference()(small, prompts) < 0.35).all()
    assert WorldReward()(small, prompts).max() < 1.25 < WorldReward()(images, prompts).min()


def test_ranges_gradients_batch_and_resolution_invariance():
    images, prompts = world_scored_batch(3, n=8)
    images = images.float().requires_grad_(True)
    for reward, top in ((WorldFidelity(), 1.0), (WorldPreference(), 1.0), (WorldReward(), 1.5)):
        assert reward.differentiable
        scores, single, back = world_scores_three_ways(reward, images, prompts)
        assert ((scores >= 0) & (scores <= top)).all()
        (grad,) = torch.autograd.grad(scores.sum(), images)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, reward.name
        # float-order spread: max 0 over 24 seeds (bench/tolerances.py); bound 2e-06 = 8 float32 ulps
        torch.testing.assert_close(single, scores.detach(), rtol=0, atol=tolerance("world.batch_vs_single"))
        torch.testing.assert_close(back, scores.detach(), rtol=0, atol=tolerance("world.batch_vs_single"))
    # a 64x64 render of the same scenes scores about the same as the 32x32 one
    scenes = sample_scenes([prompt_of(t) for t in all_triples()[:12]], 12, seed=5)
    ps = [prompt_of(s) for s in scenes]
    big = torch.stack([render(s, 64) for s in scenes])
    torch.testing.assert_close(WorldReward()(big, ps), WorldReward()(render_batch(scenes), ps), atol=0.08, rtol=0)


def test_registry_options_and_bad_input():
    assert isinstance(build_reward("world"), WorldReward)
    assert isinstance(build_reward("world_fidelity"), WorldFidelity)
    pref = build_reward("world_preference", {"world_preference": {"cap": 0.05}})
    assert isinstance(pref, WorldPreference) and pref.cap == 0.05 and DEFAULT_CAP != 0.05
    with pytest.raises(RewardConfigError, match="preference_weight"):
        WorldReward(preference_weight=-1)
    with pytest.raises(RewardConfigError, match="bandwidth"):
        WorldFidelity(bandwidth=float("nan"))
    with pytest.raises(ValueError, match="outside the world grammar"):
        WorldReward()(torch.rand(1, 3, 32, 32), ["a cat"])


# ---- the committed model --------------------------------------------------------------------------------------
def test_committed_model_loads_with_diffusers_and_is_small():
    if not (MODEL_DIR / "model_index.json").is_file():
        pytest.skip(f"{MODEL_DIR} not trained yet: run `python -m world.train --out world/model --seed 0`")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    size_mb = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 20
    kw = {"local_files_only": True, "use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(MODEL_DIR, subfolder="vae", **kw)
    text = CLIPTextModel.from_pretrained(MODEL_DIR, subfolder="text_encoder", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR, subfolder="tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(MODEL_DIR, subfolder="scheduler")
    assert unet.config.sample_size == 8 and unet.config.cross_attention_dim == text.config.hidden_size
    assert vae.config.scaling_factor != 1.0 and tokenizer.model_max_length == 16
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    ids = tokenizer(vocabulary(), add_special_tokens=False).input_ids
    assert all(i != tokenizer.unk_token_id for word in ids for i in word)
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)


def test_the_flow_world_trains_from_the_world_model_for_velocity_and_samples_with_the_flow_sde(tmp_path):
    """``world.train --process flow --init``: the same networks, saved with a flow-matching scheduler, load as a flow
    model (FlowMatchingSDE) and sample; two steps of training moved the UNet off its ε weights."""
    if not (MODEL_DIR / "model_index.json").is_file():
        pytest.skip(f"{MODEL_DIR} not trained yet")
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from policy import DiffusionPolicy, SamplerConfig
    from policy.process import FlowMatchingSDE
    from world.train import main as train

    out = tmp_path / "flow"
    train(["--process", "flow", "--init", str(MODEL_DIR), "--out", str(out), "--steps", "2", "--batch", "4",
           "--images-per-prompt", "1", "--no-report"])
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler").config.shift == 1.0
    before, after = (UNet2DConditionModel.from_pretrained(d, subfolder="unet") for d in (MODEL_DIR, out))
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))
    policy = DiffusionPolicy.from_pretrained(out, sampler=SamplerConfig(num_steps=3, noise_level=0.7))
    assert isinstance(policy.process, FlowMatchingSDE)
    # shift 1: σ evenly spaced from 1 to the scheduler's σ_min = 1/1000, as diffusers' pipelines space them
    assert policy.process.timesteps.tolist() == pytest.approx([1.0, 0.5005, 0.001], abs=1e-6)
    images = policy.sample(["a red circle"], [0]).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("width", [1, 2, 4])
def test_world_crisp_is_about_one_over_the_edge_width(width):
    """A vertical edge from grey to the prompt's red, ramped over ``width`` pixels: g = 1/width on ``width``
    pixel steps of each row, so Σ g² / Σ g = 1/width (float64 from the formula)."""
    grey, red = torch.full((3,), 0.2, dtype=torch.float64), torch.tensor(COLOURS["red"], dtype=torch.float64)
    x = torch.arange(32, dtype=torch.float64)
    cover = ((x - 15) / width).clamp(0, 1)  # 0 up to column 15, 1 from column 15 + width
    image = (grey[:, None, None] + (red - grey)[:, None, None] * cover[None, None, :]).expand(3, 32, 32)
    crisp = build_reward("world_crisp")(image[None].float(), ["a red square on the right"])
    assert float(crisp) == pytest.approx(1 / width, rel=1e-3)


def test_world_crisp_prefers_sharp_edges_and_has_a_gradient():
    scenes = sample_scenes([prompt_of(t) for t in all_triples()[:8]], 8, seed=3)
    prompts = [prompt_of(s) for s in scenes]
    sharp = render_batch(scenes)
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    reward = build_reward("world_crisp")
    assert reward.differentiable and (reward(sharp, prompts) > reward(blurred, prompts) + 0.1).all()
    images = blurred.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reward(images, prompts).sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
