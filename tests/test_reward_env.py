"""A reward with ``reward.options.<name>.runtime_env`` runs in its own reward actor, in an environment the main
one does not have (here: a ``py_modules`` package made in tmp_path and an ``env_vars`` setting, so nothing is
downloaded), and rollout actors, through their RewardClient, add its score to the rest."""

from __future__ import annotations

import importlib
import textwrap

import pytest
import ray
import torch

from actors.reward import RewardClient, start_reward_actors
from learner.config import ConfigError
from learner.main import WORKER_ENV
from rewards.base import RewardConfigError
from rewards.registry import RewardConfig, build_reward

pytestmark = pytest.mark.filterwarnings("ignore")

PACKAGE = "dpr_tinyenv"  # exists only inside the reward actor's runtime_env
REWARD = f"{PACKAGE}.score:Brightness"


@pytest.fixture()
def package(tmp_path):
    root = tmp_path / PACKAGE
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "score.py").write_text(textwrap.dedent('''
        import os

        from rewards.base import Reward


        class Brightness(Reward):
            """Mean brightness times $TINYENV_SCALE: proves both the package and the env var reached the actor."""

            name = "tinyenv_brightness"

            def score(self, images, prompts):
                return images.float().mean(dim=(1, 2, 3)) * float(os.environ["TINYENV_SCALE"])
    '''))
    return root


def test_a_reward_runs_in_its_own_environment_and_its_score_is_added(package):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(PACKAGE)  # the main environment does not have it
    with pytest.raises(RewardConfigError, match="runtime_env"):
        build_reward({REWARD: 1.0})
    env = {"py_modules": [str(package)], "env_vars": {"TINYENV_SCALE": "3"}}
    reward = RewardConfig(spec={"jpeg_compressibility": 1.0, REWARD: 0.5}, options={REWARD: {"runtime_env": env}},
                          num_actors=1)
    assert reward.main_env_spec() == {"jpeg_compressibility": 1.0}
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b", "c"]
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    try:
        shared, own = start_reward_actors(reward, "test-env", env_vars=WORKER_ENV)
        assert len(shared) == 1 and len(own) == 1
        client = RewardClient(handles=shared, own=own)
        got = client(images, prompts)
        main_part = build_reward({"jpeg_compressibility": 1.0})(images, prompts)
        expected = main_part + 0.5 * 3 * images.mean(dim=(1, 2, 3))
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
        alone = RewardClient(build_reward(reward.main_env_spec()), own=own)  # a local main part, as without actors
        torch.testing.assert_close(alone(images, prompts), got, rtol=1e-5, atol=1e-5)
    finally:
        ray.shutdown()


@pytest.mark.parametrize(("options", "match"), [
    ({"clip_score": {"runtime_env": {"pip": ["x"]}}}, "not in reward.spec"),
    ({"world": {"runtime_env": ["pip"]}}, "must be a mapping"),
    ({"world": {"runtime_env": {"pipp": ["x"]}}}, r"unknown key\(s\) \['pipp'\]"),
])
def test_bad_runtime_envs_end_in_one_line(make_config, options, match):
    with pytest.raises(ConfigError, match=match):
        make_config(reward={"spec": {"world": 1.0}, "options": options})


def test_guidance_needs_every_reward_in_the_rollout_actor(make_config):
    with pytest.raises(ConfigError, match="reward_gradient needs the reward's gradient"):
        make_config(guidance={"kind": "reward_gradient"},
                    reward={"spec": {"world": 1.0}, "options": {"world": {"runtime_env": {"env_vars": {"A": "1"}}}}})
