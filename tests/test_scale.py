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
from bench.scale import LORA_WIDTHS, SimLearner, SimRollout, checksum, record_template
from learner.scheduling import PromptStream
from policy.lora import checksum as torch_checksum


def test_flop_constants_are_what_the_counter_counts():
    counted = costs.count_flops()
    assert counted["unet_cfg"] == pytest.approx(costs.UNET_CFG_FLOPS, rel=1e-3)
    assert counted["vae_decode"] == pytest.approx(costs.VAE_DECODE_FLOPS, rel=1e-3)
    assert counted["reward"] == pytest.approx(costs.REWARD_FLOPS, rel=1e-3)


def test_cost_model_follows_peak_and_work():
    a100, l4 = costs.Costs.of("A100"), costs.Costs.of("L4")
    assert l4.chain_s / a100.chain_s == pytest.approx(312 / 121)  # same work, datasheet peaks
    # a step-branch chain: 25 CFG UNet calls, 10 decodes, 10 reward calls at 312 TFLOP/s x 35 %
    flops = 25 * costs.UNET_CFG_FLOPS + 10 * (costs.VAE_DECODE_FLOPS + costs.REWARD_FLOPS)
    assert a100.chain_s == pytest.approx(flops / (312e12 * 0.35))
    assert costs.Costs.of("A100", "full").pair_s / a100.pair_s == pytest.approx(4 / 3)  # weight gradients: +1 fwd
    assert costs.pool(64).count("A100") == 19 and costs.pool(1) == ["A100"]  # 7 of 23 rollout GPUs are A100s
    assert all(costs.pool(64)[:n] == costs.pool(n) for n in range(1, 65)) and costs.pool(4).count("A100") == 1
    assert sum(8 * w for w in LORA_WIDTHS) == pytest.approx(costs.LORA_PARAMS, rel=2e-3)


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
    assert (report.version, report.checksum, report.keys_matched) == (2, state.checksum, 2 * len(LORA_WIDTHS))
    batch, stats = actor.generate(["x", "y"], [10, 11], [5, 6], expected_version=2, round_index=7)
    pairs = from_table(batch)  # the real schema, 4x64x64 float32 latents
    assert pairs.kind == "step" and len(pairs) == 10 and pairs.tensors["x_w"].shape == (10, 4, 64, 64)
    assert set(batch.column("policy_version").to_pylist()) == {2} and batch.column("prompt_id").to_pylist()[:4] == [
        10, 11, 10, 11]
    assert stats["chains"] == 2 and stats["seconds"] > 0
    assert learner.update(batch)["pairs"] == 10 and learner.send_weights(3).checksum != state.checksum
    with pytest.raises(RuntimeError, match="holds weights v2, asked for v3"):
        actor.generate(["x"], [1], [1], expected_version=3)


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
