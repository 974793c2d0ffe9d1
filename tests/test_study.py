"""``python -m learner.study``: the quick grid end to end through the real system, resumability, and the
statistics the verdicts rest on (checked against hand-computed float64 values)."""

from __future__ import annotations

import json
import math

import pytest

from learner import study
from learner.config import build_config
from learner.study import GRIDS, Contrast, cell_trees, evaluate_contrast, over_seeds, overall, verdict


def test_every_grid_builds_and_its_contrasts_name_its_cells():
    for name, grid in GRIDS.items():
        trees = cell_trees(grid)
        for tree in trees.values():
            build_config(tree)  # every override key exists and every value is allowed
        for c in grid.contrasts:
            assert set(c.weights) <= set(grid.cells), name


def test_tailorpo_cells_sample_the_same_number_of_images():
    """Chains sampled = updates × pairs per update / pairs per chain must match between pair kinds."""
    trees = cell_trees(GRIDS["tailorpo"], updates=100)
    step, traj = build_config(trees["step_branch"]), build_config(trees["trajectory"])
    chains = {k: c.train.steps * c.train.batch_size / study.pairs_per_chain(c) for k, c in
              (("step", step), ("traj", traj))}
    assert step.train.steps == 100 and traj.train.batch_size == step.train.batch_size
    assert chains["traj"] == pytest.approx(chains["step"], rel=0.05)
    assert step.eval.every >= 1 and traj.eval.every >= 1


def test_over_seeds_is_mean_and_standard_error():
    s = over_seeds([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    var = ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2
    assert s["se"] == pytest.approx(math.sqrt(var / 3))
    assert math.isnan(over_seeds([1.0])["se"])


def test_verdict_needs_two_standard_errors_in_the_claimed_direction():
    assert verdict(0.05, 0.02) == "holds"
    assert verdict(-0.05, 0.02) == "does not hold"
    assert verdict(0.03, 0.02) == "inconclusive"
    assert verdict(-0.03, 0.02) == "inconclusive"
    assert verdict(0.5, math.nan) == "inconclusive"  # one seed: no spread, no verdict
    assert overall(["holds", "holds"]) == "holds"
    assert overall(["holds", "inconclusive"]) == "inconclusive"
    assert overall(["holds", "does not hold"]) == "does not hold"


def test_contrast_adds_variances_of_independent_cells():
    cells = {"a": {"gain": {"mean": 0.10, "se": 0.01}}, "b": {"gain": {"mean": 0.02, "se": 0.02}},
             "c": {"gain": {"mean": 0.01, "se": 0.02}}}
    two = evaluate_contrast(Contrast("a beats b", {"a": 1, "b": -1}), cells)
    assert two["value"] == pytest.approx(0.08) and two["se"] == pytest.approx(math.sqrt(0.01**2 + 0.02**2))
    assert two["verdict"] == "holds"
    inter = evaluate_contrast(Contrast("interaction", {"a": 1, "b": -1, "c": -1}), cells)
    assert inter["value"] == pytest.approx(0.07) and inter["se"] == pytest.approx(0.03)
    assert inter["verdict"] == "holds"
    margin = evaluate_contrast(Contrast("over half", {"a": 1}, margin=0.2), cells)
    assert margin["value"] == pytest.approx(-0.1) and margin["verdict"] == "does not hold"


def test_quick_study_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "study"
    assert study.main(["--grid", "tailorpo", "--quick", "--out", str(out)]) == 0
    for name in ("RESULTS.md", "results.json", "curves.png", "samples_step_branch.png", "samples_trajectory.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {"step_branch", "trajectory"}
    for run in results["runs"]:
        assert run["chains"] > 0 and run["curve"] and run["n"] == 8
        assert 0 <= run["win_rate"]["mean"] <= 1 and run["fidelity"]["mean"] > 0.9
        assert run["gain"]["mean"] == pytest.approx(run["reward"]["mean"] - run["base_reward"]["mean"], abs=1e-6)
    assert results["verdict"] == "inconclusive"  # one seed: no s.e. over seeds
    assert "**Claim.**" in (out / "RESULTS.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell × seed was run again")

    monkeypatch.setattr(study, "run_cell", must_not_run)
    assert study.main(["--grid", "tailorpo", "--quick", "--out", str(out)]) == 0


def test_bad_flag_is_one_line(capsys, tmp_path):
    assert study.main(["--grid", "default", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
