"""The stable reference's calibration pilot: reading D(u) from a run's metrics and choosing δ for a τ."""

from __future__ import annotations

import pytest

from learner.reference_pilot import calibrate, divergence_series


def test_the_series_is_read_per_divergence_from_the_checks_only():
    rows = [{"step": 1, "metrics": {"train/loss": 0.6}},
            {"step": 2, "metrics": {"train/ref_divergence_kernel_kl": 0.01, "train/ref_divergence_log_ratio": -0.2}},
            {"step": 4, "metrics": {"train/ref_divergence_kernel_kl": 0.03, "train/ref_divergence_log_ratio": 0.1}}]
    assert divergence_series(rows) == {"kernel_kl": [[2, 0.01], [4, 0.03]], "log_ratio": [[2, -0.2], [4, 0.1]]}


def test_delta_lets_the_first_checks_replace_and_names_the_freeze():
    series = [[u, 0.001 * u] for u in range(1, 31)]  # D grows linearly with the policy's drift
    c = calibrate(series, tau=2, moves=4, margin=1.5)
    assert c["delta"] == pytest.approx(1.5 * 0.008)  # the 4th check (update 8) is the largest that must replace
    assert c["freezes_at"] == 14  # the first check past δ = 0.012
    replaced = [u for u in range(2, 31, 2) if 0.001 * u <= c["delta"]]
    assert len([u for u in replaced if u < c["freezes_at"]]) >= 4  # the study's manipulation check would pass
    assert calibrate([[u, 0.001] for u in range(1, 31)], tau=4)["freezes_at"] is None  # D flat: never freezes
    with pytest.raises(ValueError, match="too few for 4 checks every 10"):
        calibrate(series, tau=10)
    with pytest.raises(ValueError, match="no reference check"):
        calibrate([], tau=2)


def test_the_pilot_runs_the_studys_stable_cell_without_a_cap(tmp_path):
    from learner.reference_pilot import pilot_config

    cfg = pilot_config(30, 1, 3, tmp_path / "pilot")
    assert (cfg.loss.kind, cfg.loss.beta, cfg.pairs.kind) == ("diffusion_dpo", 5000.0, "trajectory")  # the cell's
    assert (cfg.reference.strategy, cfg.reference.tau, cfg.reference.delta) == ("stable_update", 1, 1e9)
    assert (cfg.train.steps, cfg.train.seed) == (30, 3)
