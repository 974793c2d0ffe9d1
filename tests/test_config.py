"""Config loading, CLI overrides, one-line errors; the driver's prompt stream and throughput balancer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from learner.config import Config, ConfigError, build_config
from learner.main import parse_args
from learner.prompts import load_prompts
from learner.scheduling import PromptStream, ThroughputBalancer

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_config_builds():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "configs/ must hold the default and the paper presets"
    for path in configs:
        cfg, _ = parse_args(["--config", str(path)])
        assert isinstance(cfg, Config)


def test_cli_overrides_yaml_and_parses_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: {beta: 0.5}\ntrain: {steps: 7}\n")
    cfg, _ = parse_args(["--config", str(path), "--loss.beta", "2.5", "--reward.spec", "{aesthetic: 1, world: 0.5}",
                         "--num-actors", "3", "--loss.ratio_clip", "null", "--pairs.branch_steps", "[1, 3]"])
    assert cfg.loss.beta == 2.5 and cfg.train.steps == 7 and cfg.rollout.num_actors == 3
    assert cfg.reward.spec == {"aesthetic": 1.0, "world": 0.5}
    assert cfg.loss.ratio_clip is None and cfg.pairs.branch_steps == (1, 3)


@pytest.mark.parametrize("tree,match", [
    ({"loss": {"betta": 1}}, r"unknown config key 'loss\.betta'; did you mean 'loss\.beta'\?"),
    ({"trian": {}}, r"unknown config key 'trian'; did you mean 'train'\?"),
    ({"loss": {"beta": -1.0}}, r"loss\.beta must be > 0"),
    ({"time_weight": {"gamma": 1.5}}, r"gamma must be in \(0, 1\]"),
    ({"time_weight": {"gamma": 0.0}}, r"gamma must be in \(0, 1\]"),
    ({"reference": {"strategy": "stable_update", "tau": 0}}, r"reference\.tau must be >= 1"),
    ({"sampler": {"eta": 0.0}}, r"sampler\.eta must be > 0"),
    ({"train": {"steps": 2.5}}, r"train\.steps must be an integer"),
    ({"train": {"mode": "fast"}}, r"train\.mode must be one of"),
    ({"output": {"trajectory_log": "yes"}}, r"output\.trajectory_log must be true or false"),
    ({"pairs": {"branch_steps": [30]}}, r"beyond sampler\.num_steps"),
    ({"guidance": {"kind": "reward_gradient"}, "pairs": {"kind": "trajectory"}}, r"needs pairs\.kind=step_branch"),
])
def test_bad_values_fail_with_one_line(tree, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_config(tree)
    assert "\n" not in str(info.value)


def test_an_unsupported_loss_and_pair_kind_fail_at_start_up(monkeypatch):
    from learner.methods import registry

    monkeypatch.delitem(registry._METHODS, ("dense_dpo", "trajectory"))
    with pytest.raises(ConfigError, match=r"^loss\.kind=dense_dpo does not train on trajectory pairs; it accepts "
                                          r"\['step'\] pairs$"):
        build_config({"loss": {"kind": "dense_dpo"}, "pairs": {"kind": "trajectory"}})


def test_help_shows_the_values_the_chosen_yaml_gives(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sampler.logprob_reduce V per-sample log-prob: mean or sum over latent elements; one of ['mean', " \
           "'sum']; value: \"sum\"" in text  # configs/default.yaml's value, not the schema default 'mean'
    assert "--time_weight.gamma V discount γ of Cat(γ^k); in (0, 1]; value: 0.9" in text


def test_cli_values_are_strict(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.steps must be an integer, got True$"):
        parse_args(["--train.steps", "true"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'loss\.betta'; did you mean 'loss\.beta'\?"):
        parse_args(["--loss.betta", "1"])


def test_cli_errors_are_one_line_and_help_lists_every_key(tmp_path):
    env_py = [sys.executable, "-m", "learner.main"]
    bad = subprocess.run([*env_py, "--loss.betta", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "unrecognized arguments: --loss.betta" in bad.stderr
    missing = tmp_path / "nope.yaml"
    out = subprocess.run([*env_py, "--config", str(missing)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == f"error: config file not found: {missing}"
    helptext = subprocess.run([*env_py, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    for key in ("--loss.beta", "--reference.tau", "--time_weight.gamma", "--train.max_staleness", "--ray.address"):
        assert key in helptext


def test_missing_model_dir_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "learner.main", "--model.path", str(tmp_path / "m")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: model directory not found: {tmp_path / 'm'} (expected a diffusers-layout " \
                                 "model saved locally)"


def test_prompt_files(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("# animals\na cat\n\n  a dog  \n")
    assert load_prompts(str(good)) == ["a cat", "a dog"]
    empty = tmp_path / "e.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(str(empty))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_prompts(str(binary))
    with pytest.raises(ConfigError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="unknown prompt set"):
        load_prompts("world:test")
    train, heldout = load_prompts("world:train"), load_prompts("world:heldout")
    assert train and heldout and not set(train) & set(heldout)


def test_prompt_stream_is_deterministic_and_resumable():
    a = PromptStream(["p0", "p1", "p2"], seed=4)
    first = a.take(5)
    b = PromptStream(["p0", "p1", "p2"], seed=4)
    b.take(2)
    c = PromptStream(["p0", "p1", "p2"], seed=4, cursor=b.cursor)
    assert c.take(3) == tuple(x[2:] for x in first)
    assert sorted(first[0][:3]) == [0, 1, 2]  # one epoch visits every prompt once
    assert len(set(first[2])) == 5  # every chain gets its own seed


def test_balancer_gives_slow_actors_less_work():
    bal = ThroughputBalancer(num_actors=2, initial=8, target_seconds=2.0, max_size=64)
    assert bal.split(16) == [8, 8] and bal.size(1) == 8
    bal.observe(0, chains=8, seconds=1.0)  # 8 chains/s
    bal.observe(1, chains=8, seconds=4.0)  # 2 chains/s
    assert bal.split(20) == [16, 4] and sum(bal.split(7)) == 7
    assert (bal.size(0), bal.size(1)) == (16, 4)
    fixed = ThroughputBalancer(2, 8, 2.0, 64, adapt=False)
    fixed.observe(0, 8, 1.0)
    assert fixed.split(16) == [8, 8] and fixed.size(0) == 8


def test_unreachable_cluster_address_fails_fast_with_one_line():
    out = subprocess.run([sys.executable, "-m", "learner.main", "--ray.address", "127.0.0.1:9"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: cannot reach the Ray cluster at '127.0.0.1:9'")
    assert "ray up cluster/gpu.yaml" in out.stderr
