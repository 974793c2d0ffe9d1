"""The label-agreement measurement (learner.label_agreement): its statistic, and its ends on the real model."""

from __future__ import annotations

import math

import pytest
import torch

from learner.label_agreement import Measure, disagreement


def test_disagreement_counts_pairs_ranked_differently_by_the_step_and_by_the_end():
    step = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.7, 0.1]], dtype=torch.float64)
    final = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # pair 0: step says chain 0, end says chain 1 (disagree); 1: both 1; 2: step 1, end 0 (disagree); 3: both 0
    out = disagreement(step, final)
    assert out["rate"] == 0.5 and out["n"] == 4 and out["se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert out["gap"] == pytest.approx((1 + 1 + 0.2 + 0.1) / 4) and out["final_gap"] == 1.0


def test_on_the_embedded_model_the_last_step_agrees_with_the_end_by_construction():
    measure = Measure()
    prompts, seeds = ["a red circle on the left"] * 3, [0, 1, 2]
    for rows in (measure.chains(prompts, seeds), measure.children(prompts, seeds)):
        assert len(rows) == len(measure.policy.timesteps)
        assert rows[-1]["rate"] == 0.0  # after the last step x̂_0 is the final image
        assert all(0.0 <= r["rate"] <= 1.0 and r["gap"] >= 0 for r in rows)
