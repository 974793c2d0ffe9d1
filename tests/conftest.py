"""Shared fixtures: a tiny random model in diffusers layout, built once per session (no downloads)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from policy import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_model"), arch="tiny", seed=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and os.environ.get("RUN_SLOW") != "1":
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture()
def make_config(tiny_model_dir, tmp_path):
    """A small experiment config on the tiny random model (helpers.small_config); keyword overrides are
    ``section={key: value}``."""
    from helpers import small_config

    return functools.partial(small_config, tiny_model_dir, tmp_path / "run")
