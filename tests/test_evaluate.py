"""``python -m learner.evaluate``: paired comparison of the base model and checkpoints on the embedded world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from learner.checkpoint import save_checkpoint
from learner.config import build_config
from learner.evaluate import compare, load_policy, main, mean_se, win_indicator
from policy import POLICY, DiffusionPolicy
from policy.lora import adapter_parameters
from rewards.registry import build_reward

MODEL_DIR = Path(__file__).resolve().parents[1] / "world" / "model"
TREE = {"model": {"path": str(MODEL_DIR)}, "sampler": {"num_steps": 4, "guidance_scale": 5.0, "eta": 1.0},
        "lora": {"rank": 2, "alpha": 2.0}, "pairs": {"branch_steps": [0, 2]}, "reward": {"spec": {"world": 1.0}}}
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the center"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A config file and a run directory whose checkpoint holds a perturbed (non-zero) policy adapter."""
    root = tmp_path_factory.mktemp("evaluate")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(TREE))
    cfg = build_config(TREE)
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.model_dump_json())
    policy = DiffusionPolicy.from_pretrained(MODEL_DIR, sampler=cfg.sampler)
    policy.add_lora(POLICY, cfg.lora)
    gen = torch.Generator().manual_seed(0)
    params = adapter_parameters(policy.unet, POLICY)
    adapter = {k: 0.5 * torch.randn(p.shape, generator=gen) for k, p in params.items()}
    save_checkpoint(run / "checkpoints", 3, {"policy": adapter}, {"step": 3})
    return {"config": config, "run": run, "root": root}


def test_statistics_match_their_definitions():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([2.0, 2.0, 1.0, 5.0])
    assert win_indicator(a, b).tolist() == [1.0, 0.5, 0.0, 1.0]
    stats = mean_se(b - a)
    assert stats["mean"] == pytest.approx(0.0)
    assert stats["se"] == pytest.approx(torch.tensor([1.0, 0.0, -2.0, 1.0]).std().item() / 2)


def test_base_against_itself_is_a_tie_everywhere():
    cfg = build_config(TREE)
    base, _ = load_policy("base", cfg)
    rewards = {"world": build_reward("world"), "world_shape": build_reward("world_shape")}
    prompts = PROMPTS * 2
    result = compare(base, base, prompts, list(range(len(prompts))), rewards, "world", batch=4).summary()
    for stats in result["rewards"].values():
        assert stats["B-A"] == {"mean": 0.0, "se": 0.0}
        assert stats["A"] == stats["B"]
    assert result["win_rate"] == {"mean": 0.5, "se": 0.0}


def test_cli_base_against_a_checkpoint_writes_json_and_grid(setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["base", str(setup["run"]), "--n", "6", "--prompts", "world:heldout", "--rewards", "world_fidelity",
               "--config", str(setup["config"]), "--out", str(out), "--grid-prompts", "3"])
    assert rc == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert (out / "comparison.png").stat().st_size > 0
    assert summary["n"] == 6 and summary["main_reward"] == "world"
    assert set(summary["rewards"]) == {"world", "world_fidelity", "world_shape"}
    for stats in summary["rewards"].values():
        assert set(stats) == {"A", "B", "B-A"} and all(set(s) == {"mean", "se"} for s in stats.values())
    assert summary["rewards"]["world"]["B-A"]["mean"] != 0.0  # the perturbed adapter really was loaded
    assert 0.0 <= summary["win_rate"]["mean"] <= 1.0
    assert summary["B"]["step"] == 3 and summary["B"]["source"].endswith("step-00000003")
    assert "win rate of B over A" in capsys.readouterr().out
    # the same checkpoint named three ways loads the same weights
    cfg = build_config(TREE)
    step_dir = setup["run"] / "checkpoints" / "step-00000003"
    for source in (step_dir, setup["run"] / "checkpoints"):
        assert load_policy(str(source), cfg)[1]["source"] == str(step_dir)


@pytest.mark.parametrize(("args", "message"), [
    (["base", "{root}/nowhere"], "not a directory"),
    (["base", "{root}"], "no complete checkpoint"),
    (["base", "base", "--rewards", "no_such_reward"], "unknown reward 'no_such_reward'"),
    (["base", "base", "--prompts", "world:nothing"], "unknown prompt set"),
    (["base", "base", "--model", "{root}/nowhere"], "model directory not found"),
])
def test_bad_inputs_end_in_one_line_and_rc_2(setup, capsys, args, message):
    argv = [a.format(root=setup["root"]) for a in args] + ["--config", str(setup["config"]), "--n", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
