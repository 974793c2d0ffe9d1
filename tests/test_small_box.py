"""Small-box mode: which runs get it, and that it changes only the placement (threads, where rewards are scored)."""

from __future__ import annotations

import pytest

from learner.small_box import small_box_layout, wants_small_box


def test_auto_is_on_for_a_local_one_actor_run_on_two_cores_only(make_config):
    cfg = make_config(reward={"num_actors": 1}, ray={"small_box": "auto"})
    assert wants_small_box(cfg, cores=2) and wants_small_box(cfg, cores=1)
    assert not wants_small_box(cfg, cores=3)
    for sections in ({"rollout": {"num_actors": 2}}, {"ray": {"address": "auto", "small_box": "auto"}},
                     {"train": {"num_gpus": 1.0}}, {"train": {"num_learners": 2}}):
        assert not wants_small_box(make_config(**{"ray": {"small_box": "auto"}, **sections}), cores=2), sections
    assert wants_small_box(make_config(ray={"small_box": "on"}), cores=16)
    assert not wants_small_box(make_config(ray={"small_box": "off"}), cores=2)


def test_the_layout_moves_threads_and_reward_scoring_and_nothing_else(make_config):
    cfg = make_config(reward={"num_actors": 1}, rollout={"torch_threads": 2}, train={"torch_threads": 2},
                      ray={"small_box": "on"})
    placed, changed = small_box_layout(cfg, cores=2)
    assert changed == {"rollout.torch_threads": 1, "train.torch_threads": 1, "reward.num_actors": 0}
    assert (placed.rollout.torch_threads, placed.train.torch_threads, placed.reward.num_actors) == (1, 1, 0)
    ignore = {"rollout": {"torch_threads"}, "train": {"torch_threads"}, "reward": {"num_actors"}}
    assert placed.model_dump(exclude=ignore) == cfg.model_dump(exclude=ignore)
    off = make_config(ray={"small_box": "off"})
    assert small_box_layout(off, cores=2) == (off, {})


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_value_is_one_line(make_config, value):
    from learner.config import ConfigError

    with pytest.raises(ConfigError, match=r"ray.small_box must be one of"):
        make_config(ray={"small_box": value})
