"""The held-out world judge (world/judge.py, reward ``world_judge``): its score formula, the committed weights'
calls on clean renders, the reward's ordering of bigger / wrong-colour shapes, its errors and a tiny training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.base import RewardConfigError
from rewards.registry import build_reward, differentiable
from rewards.world_judge import WorldJudge
from world.judge import HEADS, JUDGE_DIR, OFF_IMAGE, RADIUS_SCALE, Judge, train_judge
from world.scenes import (
    COLOURS,
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
)

PROMPTS = [prompt_of(t) for t in all_triples()]


@pytest.fixture(scope="module")
def reward() -> WorldJudge:
    return WorldJudge()


def test_the_score_is_the_product_of_the_prompts_probabilities_plus_half_the_size_term(reward, monkeypatch):
    """A stub network gives known logits; the score is recomputed in float64 from their softmax."""
    prompts = ["a red circle on the left", "a cyan triangle at the top", "a blue square in the center"]
    gen = torch.Generator().manual_seed(0)
    logits = {head: 3 * torch.randn(len(prompts), len(classes), generator=gen) for head, classes in HEADS.items()}
    sizes = torch.tensor([0.5, 1.5, 2.5])  # radius 0.05, 0.15, 0.25 (the last above the cap of RADIUS_RANGE[1])
    monkeypatch.setattr(reward.judge, "forward", lambda images: {**logits, "size": sizes})
    got = reward(torch.rand(len(prompts), 3, 32, 32), prompts)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    probs = {head: softmax(v.double().numpy()) for head, v in logits.items()}
    want = []
    for i, prompt in enumerate(prompts):
        words = parse_prompt(prompt)
        agreement = np.prod([probs[head][i, HEADS[head].index(w)] for head, w in zip(HEADS, words, strict=True)])
        want.append(agreement + 0.5 * np.clip(sizes[i].item() * RADIUS_SCALE / RADIUS_RANGE[1], 0, 1))
    assert got.dtype == torch.float32 and got.shape == (len(prompts),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    parts = reward.parts(torch.rand(len(prompts), 3, 32, 32), prompts)
    np.testing.assert_allclose((parts["agreement"] + 0.5 * parts["size"]).numpy(), want, rtol=1e-5, atol=1e-6)


def test_the_committed_judge_names_colour_shape_and_position_of_clean_renders():
    judge = Judge.from_pretrained(JUDGE_DIR)
    scenes = sample_scenes(PROMPTS, 2 * len(PROMPTS), seed=5)  # every triple twice, the data's nuisances
    pred = judge.predict(render_batch(scenes))
    right = [(c, s, p) == (sc.colour, sc.shape, sc.position)
             for c, s, p, sc in zip(pred.names("colour"), pred.names("shape"), pred.names("position"), scenes,
                                    strict=True)]
    assert np.mean(right) >= 0.95, np.mean(right)


def test_the_background_alone_is_no_colour_no_position_and_an_unclear_shape():
    judge = Judge.from_pretrained(JUDGE_DIR)
    empty = torch.stack([render(Scene("red", "circle", "center", OFF_IMAGE, OFF_IMAGE, 0.1, bg, 0.0))
                         for bg in (0.1, 0.2, 0.27)])
    pred = judge.predict(empty)
    assert set(pred.names("colour")) == {"none"} and set(pred.names("position")) == {"none"}
    assert set(pred.names("shape")) == {"unclear"}


def test_a_bigger_shape_scores_higher_and_a_wrong_colour_lower(reward):
    prompts = [prompt_of((c, s, "center")) for c in ("red", "green", "blue") for s in SHAPES]
    small = render_batch(sample_scenes(prompts, len(prompts), seed=3, radius=RADIUS_RANGE[0]))
    big = render_batch(sample_scenes(prompts, len(prompts), seed=3, radius=RADIUS_RANGE[1]))
    assert (reward(big, prompts) > reward(small, prompts)).all()
    colours = list(COLOURS)
    wrong = [prompt_of((colours[(colours.index(c) + 3) % 6], s, p)) for c, s, p in map(parse_prompt, prompts)]
    recoloured = render_batch(sample_scenes(wrong, len(wrong), seed=3, radius=RADIUS_RANGE[1]))
    assert (reward(recoloured, prompts) < reward(big, prompts) - 0.5).all()


def test_missing_weights_are_a_one_line_error_naming_the_build_command(tmp_path):
    with pytest.raises(RewardConfigError) as e:
        WorldJudge(path=str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value) and "python -m world.judge" in str(e.value)


def test_the_registry_builds_it_and_knows_it_has_no_gradient():
    reward = build_reward("world_judge")
    assert isinstance(reward, WorldJudge) and not differentiable("world_judge")
    images = render_batch(sample_scenes(PROMPTS[:4], 4, seed=0))
    scores = reward(images, PROMPTS[:4])
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_a_tiny_training_run_saves_a_loadable_judge(tmp_path):
    torch.set_num_threads(1)
    judge, report = train_judge(tmp_path, steps=20, seed=0, batch=16, log_every=0)
    loaded = Judge.from_pretrained(tmp_path)
    images = render_batch(sample_scenes(PROMPTS[:3], 3, seed=0))
    torch.testing.assert_close(loaded.predict(images).colour, judge.predict(images).colour)
    assert report["parameters"] <= 100_000 and report["weights_kb"] < 1024
    assert set(loaded.predict(images).names("position")) <= {*POSITIONS, "none"}
