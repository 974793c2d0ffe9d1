"""Shared fixtures: a tiny random model in diffusers layout, built once per session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# two threads on the 2-core CI box; OMP_NUM_THREADS, where set, wins: mutmut forks each mutant's test run from one
# process, and a forked child that inherits a started thread pool can hang (tests run as OMP_NUM_THREADS=1 there)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from policy import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_model"), arch="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD3Transformer2DModel, two CLIPTextModelWithProjection and a T5 encoder, a 16-channel VAE: toy sizes."""
    from policy import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_sd3"), arch="tiny_sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guidance-distilled FluxTransformer2DModel with CLIP and T5, a 16-channel VAE: toy sizes."""
    from policy import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_flux"), arch="tiny_flux", seed=0)


# Flow-GRPO's LoRA targets (scripts/train_sd3.py): the joint attention's image and text projections
FLOW_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
KINDS = ("ddim", "sd3", "flux")  # the tiny models: SD-1.5's UNet with DDIM, SD3 and FLUX with the flow SDE


@pytest.fixture()
def model_sections(request):
    """``kind`` → the config sections that put a test on that tiny model (32 px images for all three)."""

    def sections(kind: str) -> dict[str, dict]:
        if kind == "ddim":
            return {}
        path = request.getfixturevalue(f"tiny_{kind}_dir")
        return {"model": {"path": str(path)}, "sampler": {"resolution": 32},
                "lora": {"target_modules": FLOW_LORA_TARGETS}}

    return sections


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and os.environ.get("RUN_SLOW") != "1":
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture()
def make_config(tiny_model_dir, tmp_path, model_sections):
    """A small experiment config (helpers.small_config) on the tiny random model ``kind`` (see KINDS); keyword
    overrides are ``section={key: value}``."""
    from helpers import small_config

    def make(kind: str = "ddim", **sections):
        tree = model_sections(kind)
        for name, values in sections.items():
            tree[name] = {**tree.get(name, {}), **values}
        return small_config(tiny_model_dir, tmp_path / "run", **tree)

    return make
