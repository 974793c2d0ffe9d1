"""Config loading, CLI overrides, one-line errors; the driver's prompt stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from learner.config import Config, ConfigError, build_config, load_yaml
from learner.main import parse_args, parse_value
from learner.preflight import preflight
from learner.prompts import load_prompts
from learner.scheduling import PromptStream
from policy import DiffusionPolicy, ModelPathError

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
    ({"reference": {"strategy": "stable_update", "past_cap": "reinit", "compute_on": "actors"}},
     r"^reference\.past_cap=reinit sends the reference back to the initial model"),
    ({"sampler": {"eta": 0.0}}, r"sampler\.eta must be > 0"),
    ({"sampler": {"noise_level": 0.0}}, r"sampler\.noise_level must be > 0"),
    ({"sampler": {"resolution": 4}}, r"sampler\.resolution must be >= 8"),
    ({"train": {"steps": 2.5}}, r"train\.steps must be an integer"),
    ({"train": {"mode": "fast"}}, r"train\.mode must be one of"),
    ({"output": {"trajectory_log": "maybe"}}, r"output\.trajectory_log must be true or false, got 'maybe'"),
    ({"rollout": {"adapt_batch": 1}}, r"rollout\.adapt_batch must be true or false, got 1"),
    ({"pairs": {"branch_steps": [30]}}, r"beyond sampler\.num_steps"),
    ({"guidance": {"kind": "reward_gradient"}, "pairs": {"kind": "trajectory"}}, r"needs pairs\.kind=step_branch"),
    ({"loss": {"chain_steps": [0, 2]}}, r"^loss\.chain_steps is for loss\.kind=dpo_logprob on pairs\.kind=trajectory"),
    ({"loss": {"chain_steps": [0, 20]}, "pairs": {"kind": "trajectory"}, "guidance": {"kind": "none"}},
     r"^loss\.chain_steps \[20\] are beyond sampler\.num_steps=20$"),
    ({"guidance": {"kind": "reward_gradient"}, "reward": {"spec": {"world": 1.0, "jpeg_compressibility": 0.1}}},
     r"^guidance\.kind=reward_gradient needs a differentiable reward; \['jpeg_compressibility'\] in reward\.spec "
     r"have no gradient: drop them from reward\.spec or set guidance\.kind: none$"),
    ({"guidance": {"kind": "reward_gradient"}, "reward": {"spec": {"wrold": 1.0}}}, r"^reward\.spec: unknown reward"),
])
def test_bad_values_fail_with_one_line(tree, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_config(tree)
    assert "\n" not in str(info.value)


def test_yes_no_on_off_are_text_in_files_and_flags(tmp_path):
    """YAML 1.2: ``off`` is text, so a choice key takes it; a true/false key reads yes/no/on/off as booleans."""
    path = tmp_path / "c.yaml"
    path.write_text("ray: {small_box: off}\nrollout: {adapt_batch: no}\noutput: {tensorboard: Off, overwrite: yes}\n"
                    "data: {eval_prompts: on}\n")
    assert load_yaml(path) == {"ray": {"small_box": "off"}, "rollout": {"adapt_batch": "no"},
                               "output": {"tensorboard": "Off", "overwrite": "yes"}, "data": {"eval_prompts": "on"}}
    cfg, _ = parse_args(["--config", str(path)])
    assert (cfg.ray.small_box, cfg.rollout.adapt_batch, cfg.output.tensorboard, cfg.output.overwrite) == (
        "off", False, False, True)
    assert cfg.data.eval_prompts == "on"
    cfg, _ = parse_args(["--ray.small_box", "on", "--rollout.adapt_batch", "false", "--output.trajectory_log", "YES",
                         "--data.train_prompts", "no"])
    assert (cfg.ray.small_box, cfg.rollout.adapt_batch, cfg.output.trajectory_log) == ("on", False, True)
    assert cfg.data.train_prompts == "no"
    assert parse_args(["--ray.small_box", "off"])[0].ray.small_box == "off"
    assert [parse_value(v, "--x") for v in ("yes", "no", "on", "off", "true", "False")] == [
        "yes", "no", "on", "off", True, False]


@pytest.mark.parametrize("text,key,line", [
    ("loss: {beta: 0.5}\ntrain: {steps: 7}\nloss: {kind: dense_dpo}\n", "loss", 3),
    ("loss:\n  kind: dense_dpo\n  beta: 0.5\n  kind: dpo_logprob\n", "kind", 4),
    ("reward:\n  spec: {world: 1.0, world: 0.5}\n", "world", 2),
])
def test_a_duplicated_key_is_refused_in_one_line(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(path)])
    assert str(info.value) == f"{path}: duplicate key '{key}' (line {line}); keep one of them"


def test_a_duplicated_key_in_a_flag_is_refused_and_text_that_is_not_yaml_stays_text():
    with pytest.raises(ConfigError, match=r"^--reward\.spec: duplicate key 'world' \(line 1\); keep one of them$"):
        parse_args(["--reward.spec", "{world: 1.0, world: 0.5}"])
    assert parse_value("[::1]:6379", "--ray.address") == "[::1]:6379"


def test_malformed_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"^config file .*bad\.yaml is not valid YAML: expected ',' or '\]', but got "
                                          r"'<stream end>' \(line 2\)$"):
        load_yaml(path)


def test_differentiability_is_known_without_building_the_reward():
    from rewards.registry import differentiable

    # a class factory (world, world_shape) or a factory function's return annotation (jpeg_*, aesthetic)
    assert differentiable("world") and differentiable("aesthetic")
    assert not differentiable("world_shape") and not differentiable("jpeg_compressibility")


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


FLOW_PRESETS = {"sd35m_tailorpo": "sd3", "sd35m_dense_dpo": "sd3", "sd35m_rethinking": "sd3", "flux_tailorpo": "flux"}


@pytest.mark.parametrize(("name", "kind"), FLOW_PRESETS.items())
def test_flow_presets_fit_their_model_class_and_name_a_missing_model_in_one_line(name, kind, request):
    """The SD3.5/FLUX presets point at local directories: absent, the pre-flight check names the directory in one
    line. Their sampler and LoRA settings fit the real classes (tiny sizes): every LoRA target exists there."""
    cfg, _ = parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    if Path(cfg.model.path).exists():
        pytest.skip(f"{cfg.model.path} exists on this machine")
    with pytest.raises(ModelPathError) as info:
        preflight(cfg, resume=False, local_ray=False)
    assert str(info.value) == (f"model directory not found: {cfg.model.path} (expected a diffusers-layout model "
                               "saved locally)")
    sampler = cfg.sampler.model_copy(update={"resolution": 32, "num_steps": 2})
    pol = DiffusionPolicy.from_pretrained(request.getfixturevalue(f"tiny_{kind}_dir"), sampler=sampler)
    pol.add_lora(settings=cfg.lora)
    adapted = {k.split(".lora_")[0].rsplit(".attn.", 1)[1] for k, p in pol.unet.named_parameters() if p.requires_grad}
    assert {f"attn.{m}" for m in adapted} == set(cfg.lora.target_modules)


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


def test_unreachable_cluster_address_fails_fast_with_one_line():
    out = subprocess.run([sys.executable, "-m", "learner.main", "--ray.address", "127.0.0.1:9"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: cannot reach the Ray cluster at '127.0.0.1:9'")
    assert "ray up cluster/gpu.yaml" in out.stderr
