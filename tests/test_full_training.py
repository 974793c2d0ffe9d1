"""Full fine-tuning (``train.trainable: full``): the whole UNet is trained, the reference is a frozen whole-UNet
copy (or a replaced one), checkpoints resume exactly, and rollout actors receive the full state with a verified
checksum, in float32 or cast to bfloat16."""

from __future__ import annotations

import pytest
import torch

from actors.records import from_table
from actors.rollout import RolloutWorker
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.config import ConfigError
from learner.trainer import Learner
from policy import POLICY, REF

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow circle at the bottom"]


def _full(make_config, **sections):
    train = {"trainable": "full", "lr": 1e-3, **sections.pop("train", {})}
    return make_config(loss={"kind": "diffusion_dpo", "beta": 50.0}, train=train, **sections)


def _batch(cfg):
    worker = RolloutWorker(cfg.rollout_settings())
    return from_table(worker.generate(PROMPTS, [0, 1, 2, 3], [0, 1, 2, 3], expected_version=0)[0])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> int:
    return sum(not torch.equal(before[k], p) for k, p in module.named_parameters())


def test_a_full_update_trains_the_unet_and_keeps_the_frozen_reference(make_config):
    cfg = _full(make_config)
    learner, batch = Learner(cfg), _batch(cfg)
    pol = learner.policy
    unet, initial = pol.unet, pol.copies()[0]
    assert not any("lora_" in k for k, _ in unet.named_parameters())  # no adapter: the UNet is the policy
    n_params = sum(1 for _ in unet.parameters())
    assert len(learner.params) == n_params and not any(p.requires_grad for p in initial.parameters())
    before, text = _state(unet), _state(pol.c.denoiser.encoders[0][1])
    metrics = learner.update(batch)
    assert _changed(before, unet) > n_params // 2  # the base weights moved
    assert _changed(before, initial) == 0 and _changed(text, pol.c.denoiser.encoders[0][1]) == 0
    # the frozen reference (name None) is the initial model: its ε̂ equals a fresh model's, the policy's does not
    fresh = Learner(cfg).policy
    emb = pol.encode_prompts(PROMPTS[:2])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        assert torch.equal(pol.eps(x, t, emb, adapter=learner.ref_adapter), fresh.eps(x, t, emb, adapter=POLICY))
        assert not torch.allclose(pol.eps(x, t, emb, adapter=POLICY), fresh.eps(x, t, emb, adapter=POLICY))
    # memory of the first update: AdamW keeps two float32 moments of every trainable weight
    weights = sum(p.numel() * 4 for p in unet.parameters())
    assert metrics["memory/trainable_bytes"] == weights
    assert metrics["memory/optimizer_bytes"] >= 2 * weights
    assert metrics["memory/unet_bytes"] == 2 * weights  # the policy and the frozen initial copy


def test_stable_update_replaces_a_reference_copy_and_never_the_initial_model(make_config):
    cfg = _full(make_config, reference={"strategy": "stable_update", "tau": 2, "delta": 1e9})
    learner, batch = Learner(cfg), _batch(cfg)
    initial = _state(learner.policy.copies()[0])
    learner.update(batch)
    assert learner.ref_adapter is None  # until the first replacement the reference is the initial model
    assert learner.update(batch)["ref_replaced"] == 1.0 and learner.ref_adapter == REF
    ref = learner.policy.adapter_parameters(REF)
    assert all(torch.equal(ref[k], p) for k, p in learner.policy.adapter_parameters(POLICY).items())
    learner.update(batch)  # the policy moves on, the replaced reference and the initial model do not
    assert not all(torch.equal(ref[k], p) for k, p in learner.policy.adapter_parameters(POLICY).items())
    assert _changed(initial, learner.policy.copies()[0]) == 0
    with pytest.raises(ConfigError, match=r"reference\.ema"):
        _full(make_config, reference={"strategy": "stable_update", "ema": 0.5})


def test_full_checkpoint_resumes_exactly(make_config, tmp_path):
    cfg = _full(make_config, reference={"strategy": "stable_update", "tau": 1, "delta": 1e9})
    batch = _batch(cfg)
    a = Learner(cfg)
    a.update(batch)
    groups, state = a.checkpoint()
    assert set(groups["policy"]) == set(a.policy.adapter_parameters(None))  # the whole UNet
    tensors, state = load_checkpoint(save_checkpoint(tmp_path / "ck", a.step, groups, state))
    b = Learner(cfg)
    assert b.restore(tensors, state) == 1
    for learner in (a, b):
        learner.update(batch)
    for name in (POLICY, REF):
        pa, pb = a.policy.adapter_parameters(name), b.policy.adapter_parameters(name)
        assert all(torch.equal(pa[k], pb[k]) for k in pa), name


@pytest.mark.parametrize("weight_dtype", [None, "bfloat16"])
def test_rollout_actors_receive_the_full_state_with_a_verified_checksum(make_config, weight_dtype):
    cfg = _full(make_config, train={"weight_dtype": weight_dtype})
    learner, batch = Learner(cfg), _batch(cfg)
    learner.update(batch)
    worker = RolloutWorker(cfg.rollout_settings())
    state = learner.send_weights(1)
    assert state.adapter is None and len(state.tensors()) == sum(1 for _ in learner.policy.unet.parameters())
    report = worker.receive_weights(state)
    assert (report.version, report.checksum) == (1, state.checksum)
    sent = learner.policy.adapter_parameters(POLICY)
    dtype = getattr(torch, weight_dtype) if weight_dtype else torch.float32
    assert all(torch.equal(p, sent[k].detach().to(dtype).float()) for k, p in worker.policy.unet.named_parameters())
    assert dtype != torch.bfloat16 or state.nbytes < sum(p.numel() * 4 for p in sent.values()) * 0.6
