"""The scale simulation (python -m bench.scale): its cost model, its simulated roles and a quick run of the real
driver on Ray; and the prompt stream's once-per-epoch shuffle, the driver cost the simulation found."""

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from actors.records import from_table
from bench import costs
from bench.scale import SimLearner, SimRollout, checksum, lora_widths, record_template, sim_config
from learner.config import load_yaml
from learner.scheduling import PromptStream
from policy.lora import checksum as torch_checksum


@pytest.mark.parametrize("name", list(costs.MODELS))
def test_flop_constants_are_what_the_counter_counts(name):
    counted, model = costs.count_flops(name), costs.MODELS[name]  # the real classes on the meta device (~2 s each)
    assert counted["net"] == pytest.approx(model.net_flops, rel=1e-3)
    assert counted["vae_decode"] == pytest.approx(model.vae_flops, rel=1e-3)
    assert counted["reward"] == pytest.approx(costs.REWARD_FLOPS, rel=1e-3)
    assert (counted["lora_params"], counted["net_params"]) == (model.lora_params, model.net_params)
    # the simulated LoRA state: exact for the transformers, SD-1.5's cross-attention K/V read 768-wide text
    simulated = sum(2 * model.lora_rank * w for w in lora_widths(name))
    assert simulated == pytest.approx(model.lora_params, rel=2e-3)
    tree = load_yaml(costs.ROOT / model.preset)  # steps and branches are the preset's
    assert (model.num_steps, model.branches) == (tree["sampler"]["num_steps"], len(tree["pairs"]["branch_steps"]))


def test_bigger_models_cost_more_per_chain_and_pair():
    sd15, sd35m, flux = (costs.MODELS[m] for m in ("sd15", "sd35m", "flux"))
    assert flux.chain_flops > sd35m.chain_flops > sd15.chain_flops  # at 512 px, with their presets' steps
    assert flux.pair_flops() > sd35m.pair_flops() > sd15.pair_flops()
    assert flux.net_flops > 2 * sd35m.net_flops  # FLUX's single call outweighs SD3.5-M's CFG pair
    a100 = {m: costs.Costs.of("A100", model=m) for m in costs.MODELS}
    assert a100["sd15"].pairs_per_s > a100["sd35m"].pairs_per_s > a100["flux"].pairs_per_s
    table = costs.sizing_table().splitlines()  # a head, a rule, a row per model and GPU kind
    assert len(table) == 2 + 3 * 3 and table[-1].startswith("| FLUX.1-dev (`flux`) |")
    assert costs.sizing_table() in (costs.ROOT / "docs/operations.md").read_text()  # the docs show what it prints


def test_cost_model_follows_peak_and_work():
    a100, l4 = costs.Costs.of("A100"), costs.Costs.of("L4")
    assert l4.chain_s / a100.chain_s == pytest.approx(312 / 121)  # same work, datasheet peaks
    # a step-branch chain: 25 CFG UNet calls, 10 decodes, 10 reward calls at 312 TFLOP/s x 35 %
    flops = 25 * costs.MODELS["sd15"].net_flops + 10 * (costs.MODELS["sd15"].vae_flops + costs.REWARD_FLOPS)
    assert a100.chain_s == pytest.approx(flops / (312e12 * 0.35))
    assert costs.Costs.of("A100", "full").pair_s / a100.pair_s == pytest.approx(4 / 3)  # weight gradients: +1 fwd
    # SD3.5-M: 10 steps + 5 branches of CFG transformer calls, the same decodes and rewards
    sd35m = 15 * costs.MODELS["sd35m"].net_flops + 10 * (costs.MODELS["sd35m"].vae_flops + costs.REWARD_FLOPS)
    assert costs.Costs.of("A100", model="sd35m").chain_s == pytest.approx(sd35m / (312e12 * 0.35))
    assert costs.pool(64).count("A100") == 19 and costs.pool(1) == ["A100"]  # 7 of 23 rollout GPUs are A100s
    assert all(costs.pool(64)[:n] == costs.pool(n) for n in range(1, 65)) and costs.pool(4).count("A100") == 1


def test_numpy_checksum_is_the_transports_checksum():
    rng = np.random.default_rng(0)
    tensors = {"b": rng.standard_normal((3, 5), np.float32), "a": rng.standard_normal(7, np.float32)}
    assert checksum(tensors) == torch_checksum({k: torch.from_numpy(v) for k, v in tensors.items()})


def test_simulated_roles_speak_the_real_formats():
    learner, actor = SimLearner("A100", "lora", seed=0), SimRollout(record_template(4, 5), 3, "L4", 5, seed=1)
    learner.reset(1e-3)
    actor.reset(1e-3)
    state = learner.send_weights(2)
    report = actor.receive_weights(state)
    assert (report.version, report.checksum, report.keys_matched) == (2, state.checksum, 2 * len(lora_widths("sd15")))
    batch, stats = actor.generate(["x", "y"], [10, 11], [5, 6], expected_version=2, round_index=7)
    pairs = from_table(batch)  # the real schema, 4x64x64 float32 latents
    assert pairs.kind == "step" and len(pairs) == 10 and pairs.tensors["x_w"].shape == (10, 4, 64, 64)
    assert set(batch.column("policy_version").to_pylist()) == {2} and batch.column("prompt_id").to_pylist()[:4] == [
        10, 11, 10, 11]
    assert stats["chains"] == 2 and stats["seconds"] > 0
    assert learner.update(batch)["pairs"] == 10 and learner.send_weights(3).checksum != state.checksum
    with pytest.raises(RuntimeError, match="holds weights v2, asked for v3"):
        actor.generate(["x"], [1], [1], expected_version=3)


def test_model_option_swaps_costs_preset_latents_and_lora_state(tmp_path):
    actor = SimRollout(record_template(2, 5, model="sd35m"), 0, "A100", 5, seed=1, model="sd35m")
    actor.reset(1e-3)
    batch, stats = actor.generate(["x"], [1], [1], expected_version=0)
    assert from_table(batch).tensors["x_w"].shape == (5, 16, 64, 64) and stats["steps"] == 10
    assert actor.chain_s == costs.Costs.of("A100", model="sd35m").chain_s
    learner = SimLearner("L4", "lora", seed=0, model="sd35m")
    assert learner.costs == costs.Costs.of("L4", "lora", "sd35m") and learner.tensors["lora.190.A"].shape == (32, 1536)
    assert sum(t.size for t in learner.tensors.values()) == costs.MODELS["sd35m"].lora_params
    cfg = sim_config(2, 4, 8, 4, None, tmp_path, model="flux")  # the model's own preset drives the driver
    assert cfg.sampler.num_steps == 10 and cfg.pairs.branch_steps == (0, 2, 4, 6, 8)


def test_prompt_stream_shuffles_each_epoch_once_in_the_same_order():
    prompts = [f"p{i}" for i in range(7)]
    stream = PromptStream(prompts, seed=3)
    ids = [i for _ in range(6) for i in stream.take(4)[0]]  # 24 prompts: across three epochs
    expected = []
    for epoch in range(4):
        order = list(range(7))
        random.Random(3 * 1_000_003 + epoch).shuffle(order)
        expected += order
    assert ids == expected[:24]


@pytest.mark.slow  # a benchmark run (~45 s); test_weight_piggyback.py drives the same simulated roles briefly
def test_quick_scale_run_drives_the_real_driver():
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--quick"], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 1 (1+0)") or line.startswith("| 2 (1+1)")]
    assert len(rows) >= 2
    efficiency = float(rows[0].split("|")[4].strip().rstrip("%"))
    assert efficiency > 50
