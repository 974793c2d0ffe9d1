"""``python -m learner.study``: the quick grid end to end through the real system, resumability, contrasts paired
by seed (the statistics themselves: tests/test_verdict.py), what each run delivered, and ``--report-only``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from learner import study
from learner.config import build_config
from learner.metrics import RunLogger
from learner.study import (
    GRIDS,
    Contrast,
    cell_trees,
    delivered,
    delivered_by_run,
    evaluate_contrast,
    over_seeds,
)


def test_every_grid_builds_and_its_contrasts_name_its_cells():
    for name, grid in GRIDS.items():
        trees = cell_trees(grid)
        for tree in trees.values():
            build_config(tree)  # every override key exists and every value is allowed
        for c in grid.contrasts:
            assert set(c.weights) <= set(grid.cells), name
            assert c.checks, f"{name}: {c.text} declares no manipulation check"
            for check in c.checks:
                assert set(check.cells) <= set(c.weights), (name, check.text)
        assert grid.seeds >= 6, name


def test_tailorpo_cells_train_the_same_step_terms_and_one_matches_the_step_cells_network_passes(tmp_path):
    """Equal updates of 60 step terms each; the _calls cell's updates scale the all-steps cell's by the ratio of
    latents through the networks that the finished runs of both measured."""
    trees = cell_trees(GRIDS["tailorpo"], updates=100)
    assert "chain_all_steps_calls" not in trees  # nothing to match before the runs it matches exist
    cfgs = {c: build_config(t) for c, t in trees.items()}
    for c, positions in (("step_branch", 1), ("chain_branch_steps", 10), ("chain_all_steps", 20)):
        assert cfgs[c].train.steps == 100 and cfgs[c].train.batch_size * positions == 60, c
        assert positions == 1 or len(cfgs[c].loss.chain_steps) == positions
    assert cfgs["chain_branch_steps"].loss.chain_steps == cfgs["step_branch"].pairs.branch_steps
    for cell, rows in (("step_branch", 3000), ("chain_all_steps", 2000)):
        for k in range(2):
            path = study.record_path(tmp_path, cell, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record(cell, k, 0.0, net_rows_actors=rows - 500 + 100 * k,
                                              net_rows_learner=500 - 100 * k)))
    matched = build_config(cell_trees(GRIDS["tailorpo"], updates=100, out=tmp_path)["chain_all_steps_calls"])
    assert matched.train.steps == 150 and matched.loss.chain_steps == cfgs["chain_all_steps"].loss.chain_steps


def test_over_seeds_is_mean_and_standard_error():
    s = over_seeds([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    var = ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2
    assert s["se"] == pytest.approx(math.sqrt(var / 3))
    assert math.isnan(over_seeds([1.0])["se"])


def record(cell: str, seed: int, gain: float, chains: int = 500, **fields) -> dict:
    """A finished run's record as ``run_cell`` writes it (what the report reads); ``fields``: its delivered ones."""

    def stat(m: float) -> dict:
        return {"mean": m, "se": 0.01}

    return {"cell": cell, "seed": seed, "steps": 10, "batch_size": 32, "chains": chains, "seconds": 60.0, "n": 256,
            "reward": stat(1.25 + gain), "base_reward": stat(1.25), "gain": stat(gain), "win_rate": stat(0.9),
            "headroom_closed": gain / 0.2, "fidelity": stat(0.99), "shape": stat(0.8), "base_fidelity": stat(0.99),
            "base_shape": stat(0.8), "curve": [], "grid_prompts": ["a red square"] * 8, "judge_gain": stat(gain / 2),
            **({"delivered": fields} if fields else {})}


SEED_LUCK = [0.0, 0.3, -0.2, 0.5, -0.4, 0.1]  # shared by every cell of a seed
NOISE = [0.004, -0.003, 0.002, -0.001, 0.003, -0.002]


def test_pairing_by_seed_finds_what_independent_cells_miss():
    """B = A + 0.03 on every seed, under seed effects ten times larger: the unpaired s.e. (variances added, as
    before) sees nothing, the per-seed differences do."""
    a = [record("a", k, 0.05 + luck) for k, luck in enumerate(SEED_LUCK)]
    b = [record("b", k, 0.08 + luck + e) for k, (luck, e) in enumerate(zip(SEED_LUCK, NOISE, strict=True))]
    unpaired = math.sqrt(sum(over_seeds([r["gain"]["mean"] for r in rs])["se"] ** 2 for rs in (a, b)))
    assert 2 * unpaired > 0.03  # the old rule (2 s.e. of independent cells) said inconclusive
    c = evaluate_contrast(Contrast("b beats a", {"b": 1, "a": -1}), {"a": a, "b": b})
    d = [0.03 + e for e in NOISE]
    assert c["seeds"] == list(range(6)) and c["differences"] == pytest.approx(d, abs=1e-12)
    assert c["mean"] == pytest.approx(math.fsum(d) / 6) and c["ci"][0] > 0 and c["verdict"] == "holds"
    margin = evaluate_contrast(Contrast("b beats a by 0.05", {"b": 1, "a": -1}, margin=0.05), {"a": a, "b": b})
    assert margin["mean"] == pytest.approx(c["mean"] - 0.05) and margin["verdict"] == "contradicted"


def test_delivered_reads_the_reference_checks_and_updates_of_a_run(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(0, {"heldout_reward_mean": 1.2}, "eval")
    for step in range(1, 9):
        if step == 3:  # a skipped update is logged at the same step and trains nothing
            logger.log(2, {"pairs": 32.0, "loss": math.nan, "skipped_nonfinite": 1.0}, "train")
        ref = {4: {"ref_divergence": 5e-4, "ref_replaced": 1.0, "ref_frozen": 0.0, "ref_version": 1.0},
               8: {"ref_divergence": 2e-3, "ref_replaced": 0.0, "ref_frozen": 1.0, "ref_version": 1.0}}
        logger.log(step, {"pairs": 32.0, "loss": 0.6, "step_terms": 3.0, "trained_step": step % 2 * 4.0,
                          **ref.get(step, {})}, "train")
        logger.log(step, {"staleness_mean": 0.5}, "rollout")
    logger.close()
    cfg = build_config(cell_trees(GRIDS["rethinking"], updates=8)["stable_uniform"])
    fields = delivered_by_run(tmp_path, {"nonfinite_skipped": 1, "net_rows": {"actors": 900, "learner": 300}}, cfg)
    json.dumps(fields, allow_nan=False)
    d = delivered({"steps": 8, "chains": 100, "seconds": 5.0, "delivered": fields})
    assert (d["updates_planned"], d["optimizer_updates"], d["nonfinite_skipped"], d["pairs_trained"]) == (8, 8, 1, 256)
    assert d["ref_checks"] == [[4, 5e-4, "replaced"], [8, 2e-3, "frozen"]]
    assert (d["ref_replacements"], d["ref_frozen_at"], d["ref_reinit_at"]) == (1, 8, None)
    assert d["guidance_accept_rate"] is None
    assert (d["trained_step_terms"], d["trained_step_mean"]) == (768, 2.0)  # 3 terms a pair; steps 4 and 0 alike
    assert (d["net_rows_actors"], d["net_rows_learner"]) == (900, 300)
    legacy = delivered({"steps": 30, "chains": 1900, "seconds": 90.0})  # a record from before ``delivered``
    assert legacy["optimizer_updates"] == 30 and legacy["wall_seconds"] == 90.0
    assert legacy["ref_replacements"] is None and legacy["updates_planned"] is None


COMMAND = "python -m learner.study --grid tailorpo --updates 7 --out /elsewhere/docs/study/tailorpo"


def write_study(out, seeds: int, terms: int = 600) -> None:
    """A finished tailorpo study on disk: step pairs 0.09 above chain pairs on every seed, under seed luck; the
    chain cells trained ``terms`` step terms against the step cell's 600."""
    for k in range(seeds):
        for cell in GRIDS["tailorpo"].cells:
            gain = 0.1 + NOISE[k] if cell == "step_branch" else 0.01
            done = {"updates_planned": 10, "nonfinite_skipped": 0, "net_rows_actors": 900, "net_rows_learner": 300,
                    "trained_step_terms": 600 if cell == "step_branch" else terms}
            path = study.record_path(out, cell, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record(cell, k, gain + SEED_LUCK[k], **done)))
    (out / "results.json").write_text(json.dumps({"command": COMMAND}))
    (out / "RESULTS.md").write_text("# old report\n\n## Note added by hand: kept\nWhy it looks so.\n")


@pytest.mark.parametrize(("seeds", "terms", "verdict", "shown"), [
    (6, 600, "holds", "**holds**"),
    (3, 600, "not tested", "**not tested** (n=3 < 6 seeds)"),
    (6, 300, "not tested", "**not tested** (manipulation check failed)"),
])
def test_report_only_rewrites_the_verdicts_from_the_records(tmp_path, seeds, terms, verdict, shown):
    write_study(tmp_path, seeds, terms)
    assert study.main(["--grid", "tailorpo", "--report-only", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["verdict"] == verdict and results["contrasts"][0]["n"] == seeds
    judge = results["contrasts"][0]["judge"]  # the same paired contrast under the held-out judge, beside it
    assert judge["mean"] == pytest.approx(results["contrasts"][0]["mean"] / 2) and judge["n"] == seeds
    assert results["command"] == COMMAND  # what ran them
    step_cell = results["cells"]["step_branch"]["delivered"]  # each delivered count, over seeds; none unrecorded
    assert step_cell["trained_step_terms"] == {"mean": 600.0, "se": 0.0, "n": seeds}
    assert step_cell["net_rows"]["mean"] == 1200 and "guidance_shift" not in step_cell
    report = (tmp_path / "RESULTS.md").read_text()
    assert "Reproduce: `python -m learner.study --grid tailorpo --updates 7`" in report  # no machine's path
    assert shown in report and report.endswith("## Note added by hand: kept\nWhy it looks so.\n")
    assert "# old report" not in report and not list(tmp_path.glob("*.png"))  # figures left alone


def test_committed_verdicts_are_todays_statistics():
    """docs/study/*/results.json hold the verdicts the records give now (rewrite: --report-only)."""
    for path in sorted((study.ROOT / "docs" / "study").glob("*/results.json")):
        results = json.loads(path.read_text())
        grid = GRIDS[results["grid"]]
        by_cell = {c: [r for r in results["runs"] if r["cell"] == c] for c in grid.cells}
        judged = [c for c in grid.contrasts if all(by_cell[n] for n in c.weights)]  # as write_report does
        for c, saved in zip(judged, results["contrasts"], strict=True):
            now = evaluate_contrast(c, by_cell)
            assert (saved["verdict"], saved["reason"], saved["n"]) == (now["verdict"], now["reason"], now["n"]), path
            assert saved["ci"] == pytest.approx(now["ci"]), path


@pytest.mark.slow  # a study run (~30 s on 2 cores); the grid, verdict and report tests above are quick
def test_quick_study_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "study"
    assert study.main(["--grid", "tailorpo", "--quick", "--out", str(out)]) == 0
    for name in ("RESULTS.md", "results.json", "curves.png", "samples_step_branch.png",
                 "samples_chain_branch_steps.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {"step_branch", "chain_branch_steps"}
    for run in results["runs"]:
        assert run["chains"] > 0 and run["curve"] and run["n"] == 8
        assert 0 <= run["win_rate"]["mean"] <= 1 and run["fidelity"]["mean"] > 0.9
        assert run["gain"]["mean"] == pytest.approx(run["reward"]["mean"] - run["base_reward"]["mean"], abs=1e-6)
    assert results["verdict"] == "incomplete"  # two of the grid's cells: one of its contrasts
    assert [c["verdict"] for c in results["contrasts"]] == ["not tested"]  # one seed
    for run in results["runs"]:
        d = run["delivered"]
        assert d["ref_checks"] == [] and d["nonfinite_skipped"] == 0  # a frozen reference is never checked
        assert d["pairs_trained"] == d["updates_planned"] * run["batch_size"] and d["updates_planned"] == run["steps"]
    assert "**Claim.**" in (out / "RESULTS.md").read_text()
    for run in results["runs"]:  # the held-out judge scored the same comparison
        assert run["judge_gain"]["mean"] == pytest.approx(run["judge"]["mean"] - run["base_judge"]["mean"], abs=1e-6)
    # a record from before the judge and the area thirds gets them from its run's checkpoint: the same samples,
    # the same scores
    path = study.record_path(out, "step_branch", 0)
    before = json.loads(path.read_text())
    added = ("judge", "judge_gain", "base_judge", "by_area")
    path.write_text(json.dumps({k: v for k, v in before.items() if k not in added}))
    assert study.main(["--grid", "tailorpo", "--rejudge", "--out", str(out)]) == 0
    after = json.loads(path.read_text())
    for key in added[:3]:
        assert after[key] == pytest.approx(before[key], abs=1e-6), key
    areas = after["by_area"], before["by_area"]
    assert areas[0]["n"] == areas[1]["n"] and areas[0]["area_edges"] == pytest.approx(areas[1]["area_edges"])
    for name, gains in areas[1]["B-A"].items():
        assert areas[0]["B-A"][name] == pytest.approx(gains, abs=1e-6), name
    assert "## Gains by drawn area" in (out / "RESULTS.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell × seed was run again")

    monkeypatch.setattr(study, "run_cell", must_not_run)
    assert study.main(["--grid", "tailorpo", "--quick", "--out", str(out)]) == 0


def test_gains_by_drawn_area_split_the_base_samples_into_thirds_of_their_area():
    """Rendered scenes of known size stand for the base samples: each third holds the smallest, middle and largest
    scenes, and its gain is the float64 mean of B − A over exactly those samples."""
    from learner.evaluate import Comparison
    from world.scenes import Scene, prompt_of, render

    radii = [0.06, 0.16, 0.09, 0.12, 0.07, 0.15, 0.10, 0.13, 0.08]
    scenes = [Scene("red", "circle", "left", 0.27, 0.5, r, 0.5, 0.0) for r in radii]
    prompts = [prompt_of(s) for s in scenes]
    images = torch.stack([render(s) for s in scenes])
    a = torch.arange(9, dtype=torch.float32)
    b = a + torch.tensor(radii) * 10
    result = Comparison(prompts, list(range(9)), {"A": images, "B": images}, {"A": {"r": a}, "B": {"r": b}}, "r")
    areas = study.gain_by_area(result)
    assert areas["n"] == [3, 3, 3]
    order = sorted(range(9), key=lambda i: radii[i])
    for k in range(3):
        chosen = order[3 * k:3 * k + 3]
        assert areas["B-A"]["r"][k] == pytest.approx(math.fsum(radii[i] * 10 for i in chosen) / 3, rel=1e-6)
    assert areas["area_edges"][0] < areas["area_edges"][1]


def test_bad_flag_is_one_line(capsys, tmp_path):
    assert study.main(["--grid", "default", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert study.main(["--grid", "default", "--report-only", "--out", str(tmp_path)]) == 2  # nothing ran there
    assert capsys.readouterr().err.count("\n") == 1


def test_a_finished_record_counts_only_while_its_config_is_the_cells(tmp_path):
    from learner.study import config_digest, finished, merge, record_path, run_config

    trees = cell_trees(GRIDS["flow_default"])
    cfg = run_config(trees["flow_default"], tmp_path, "flow_default", 0)
    path = record_path(tmp_path, "flow_default", 0)
    assert not finished(tmp_path, "flow_default", 0, cfg)  # nothing run yet
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"cell": "flow_default", "seed": 0}))
    assert not finished(tmp_path, "flow_default", 0, cfg)  # a record from before digests: rerun
    path.write_text(json.dumps({"cell": "flow_default", "seed": 0, "config_digest": config_digest(cfg)}))
    assert finished(tmp_path, "flow_default", 0, cfg)
    moved = run_config(merge(trees["flow_default"], {"loss": {"beta": 0.2}}), tmp_path, "flow_default", 0)
    assert not finished(tmp_path, "flow_default", 0, moved)  # the grid changed since: rerun
    elsewhere = run_config(trees["flow_default"], tmp_path / "other", "flow_default", 0)
    assert config_digest(elsewhere) == config_digest(cfg)  # the output folder is not part of it
    # nor an option left off (null), as one added since is: the records of the runs before it stay current
    assert study.without_nulls({"loss": {"beta": 0.1, "chain_steps": None}, "x": None}) == {"loss": {"beta": 0.1}}


def test_the_beta_lambda_arm_matches_timestep_aware_trainings_mean_scale():
    """stable_beta_lambda's β is β · E[λ] under the timestep-aware arm's own draw, on the world model's grid."""
    from diffusers import DDIMScheduler

    from learner.study import DIFFUSION_DPO_BETA, MEAN_LAMBDA
    from learner.time_weighting import TimeWeightConfig, TimeWeighting
    from policy.process import DDIMEpsilon

    trees = cell_trees(GRIDS["rethinking"])
    aware = build_config(trees["stable_timestep"])
    process = DDIMEpsilon.from_scheduler(DDIMScheduler.from_pretrained("world/model", subfolder="scheduler"),
                                         aware.sampler.num_steps)
    assert TimeWeighting(aware.time_weight, process).mean_beta_scale() == pytest.approx(MEAN_LAMBDA, abs=1e-4)
    assert build_config(trees["stable_beta_lambda"]).loss.beta == pytest.approx(DIFFUSION_DPO_BETA * MEAN_LAMBDA)
    uniform = TimeWeighting(TimeWeightConfig(mode="uniform"), process)
    assert uniform.mean_beta_scale() == 1.0
    every_t = TimeWeighting(TimeWeightConfig(mode="timestep_aware", discount_as="weight"), process)
    assert every_t.mean_beta_scale() == pytest.approx(float(every_t.sample(200_000).beta_scale.mean()), rel=1e-2)
