"""The policy on a tiny random model: sampling, recomputation, branching, adapters, weight states, loading errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import chain_logprobs, tolerance

from policy import (
    REF,
    AdapterMismatchError,
    DiffusionPolicy,
    LoraSettings,
    ModelPathError,
    SamplerConfig,
    export_state,
    load_state,
)
from policy.lora import activate, snapshot
from policy.schedule import gaussian_logprob

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle in the center"]


@pytest.fixture(scope="module")
def policy(tiny_model_dir) -> DiffusionPolicy:
    return DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=8, guidance_scale=4.0))


def _perturb_adapter(pol: DiffusionPolicy, name: str, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in pol.unet.named_parameters():
            if f".{name}." in k:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_recomputed_logprobs_match_sampling_with_cfg(tiny_model_dir, reduce):
    sampler = SamplerConfig(num_steps=8, guidance_scale=4.0, eta=1.0, logprob_reduce=reduce)
    pol = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=sampler)
    roll = pol.sample(PROMPTS, [1, 2, 3])
    assert roll.latents.shape == (9, 3, 4, 8, 8) and roll.logprobs.shape == (8, 3)
    assert roll.images.shape == (3, 3, 32, 32) and roll.images.min() >= 0 and roll.images.max() <= 1
    lp = chain_logprobs(pol, roll, PROMPTS)  # every transition of every chain in one batch
    per = 4 * 8 * 8 if reduce == "sum" else 1  # a sum over 256 dims: compare per dimension (float32 resolution)
    # float-order spread: max 1.9e-06 over 24 seeds (bench/tolerances.py); bound 1e-05 = 5x
    assert (lp - roll.logprobs).abs().max() / per < tolerance("recomputed_logprob.per_dim")


def test_seeds_fix_the_chain_independently_of_the_batch(policy):
    both = policy.sample(PROMPTS[:2], [5, 6], decode=False)
    alone = policy.sample(PROMPTS[1:2], [6], decode=False)
    again = policy.sample(PROMPTS[:2], [5, 6], decode=False)
    # equal up to float reassociation: GEMMs of batch 2 and batch 1 block their sums differently
    # float-order spread: max 2.9e-05 over 24 seeds (bench/tolerances.py); bound 2e-04 = 7x
    torch.testing.assert_close(alone.latents, both.latents[:, 1:2], rtol=0, atol=tolerance("policy.batch_vs_alone"))
    assert torch.equal(both.latents, again.latents)
    other = policy.sample(PROMPTS[:2], [5, 7], decode=False)
    assert not torch.allclose(other.latents[-1, 1], both.latents[-1, 1])


def test_branch_children_share_x_t_and_have_exact_logprobs(policy):
    embeds = policy.encode_prompts(PROMPTS[:2])
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = policy.timesteps[3]
    with torch.no_grad():
        out = policy.branch(x_t, t, embeds, 2, policy.generators([10, 11]))
        mu, sigma, _ = policy.mean(x_t, t, embeds)
    assert out.x_prev.shape == (2, 2, 4, 8, 8) and out.logprob.shape == (2, 2)
    assert not torch.allclose(out.x_prev[0], out.x_prev[1])  # independent noise per child
    for k in range(2):
        torch.testing.assert_close(out.logprob[k], gaussian_logprob(out.x_prev[k], mu, sigma, "mean"))



def test_branch_and_x0_prediction_run_the_policy_adapter_and_a_given_eps(tiny_model_dir):
    """``branch`` and ``predict_x0`` evaluate the policy adapter by default (and the one named), not the base;
    ``branch`` builds its children on the ε it is given (the rollout reuses the winner's ε from the ranking pass),
    and its first child is the sample ``step`` draws from the same generators, with the same Gaussian and x̂_0."""
    pol = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    pol.add_lora(settings=LoraSettings(rank=2))
    _perturb_adapter(pol, "policy", 0)
    embeds = pol.encode_prompts(PROMPTS[:2])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), pol.timesteps[1]
    with torch.no_grad():
        mu, _, x0 = pol.mean(x, t, embeds)
        eps = pol.eps(x, t, embeds)
        out = pol.branch(x, t, embeds, 2, pol.generators([3, 4]))
        given = pol.branch(x, t, embeds, 2, pol.generators([3, 4]), eps=eps + 0.5)
        stepped = pol.step(x, t, embeds, pol.generators([3, 4]))
        stepped_given = pol.step(x, t, embeds, pol.generators([3, 4]), eps=eps + 0.5)
        x0_pred, eps_pred = pol.predict_x0(x, t, embeds)
        x0_base = pol.predict_x0(x, t, embeds, adapter=None)[0]
        torch.testing.assert_close(x0_base, pol.mean(x, t, embeds, adapter=None)[2])
        assert not torch.allclose(mu, pol.mean(x, t, embeds, adapter=None)[0])
        torch.testing.assert_close(given.mean, pol.mean(x, t, embeds, eps=eps + 0.5)[0])
    torch.testing.assert_close(out.mean, mu)
    torch.testing.assert_close(out.x0, x0)
    torch.testing.assert_close(out.x_prev[0], stepped.x_prev)
    pairs = (stepped.mean, mu), (stepped.sigma, out.sigma), (stepped.x0, x0), (stepped_given.mean, given.mean)
    for got, want in pairs:
        torch.testing.assert_close(got, want)
    assert not torch.allclose(given.mean, mu)
    torch.testing.assert_close(eps_pred, eps)
    torch.testing.assert_close(x0_pred, x0)

def test_new_lora_starts_at_base_and_adapters_switch(tiny_model_dir):
    pol = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    embeds = pol.encode_prompts(PROMPTS[:1])
    x, t = torch.randn(1, 4, 8, 8), pol.timesteps[1]
    with torch.no_grad():
        base = pol.eps(x, t, embeds)
        pol.add_lora(settings=LoraSettings(rank=2))
        pol.add_lora(REF, LoraSettings(rank=2), trainable=False)
        torch.testing.assert_close(pol.eps(x, t, embeds), base)  # B = 0 at init
        _perturb_adapter(pol, "policy", 0)
        moved = pol.eps(x, t, embeds)
        assert not torch.allclose(moved, base)
        torch.testing.assert_close(pol.eps(x, t, embeds, adapter=None), base)
        torch.testing.assert_close(pol.eps(x, t, embeds, adapter=REF), base)
        torch.testing.assert_close(pol.eps(x, t, embeds), moved)
    trainable = {k for k, p in pol.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in k for k in trainable)  # switching never made "ref" trainable
    with pytest.raises(AdapterMismatchError, match="nope"):
        activate(pol.unet, "nope")


def test_activate_switches_only_on_change_and_keeps_the_trainable_flags(tiny_model_dir, monkeypatch):
    pol = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    pol.add_lora(settings=LoraSettings(rank=2))
    pol.add_lora(REF, LoraSettings(rank=2), trainable=False)
    unet = pol.unet
    flags = {k: p.requires_grad for k, p in unet.named_parameters()}
    for name in ("policy", None, REF, "policy"):
        activate(unet, name)
        assert {k: p.requires_grad for k, p in unet.named_parameters()} == flags
    calls = []
    monkeypatch.setattr(unet, "set_adapter", lambda name: calls.append(name))
    activate(unet, "policy")  # the sampler's case: the same weights again walk nothing
    assert calls == []
    activate(unet, REF)
    assert calls == [REF]


def test_lora_state_round_trip_is_bitwise(tiny_model_dir):
    src = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    src.add_lora(settings=LoraSettings(rank=4))
    _perturb_adapter(src, "policy", 1)
    state = export_state(src.unet, "policy", version=7)
    dst = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    dst.add_lora(settings=LoraSettings(rank=4))
    report = load_state(dst.unet, state)
    assert (report.version, report.checksum) == (7, state.checksum) and report.keys_matched > 0
    embeds = src.encode_prompts(PROMPTS)
    x, t = torch.randn(3, 4, 8, 8), src.timesteps[2]
    with torch.no_grad():
        assert torch.equal(src.eps(x, t, embeds), dst.eps(x, t, embeds))
    # the same state loads into another adapter name ("ref" follows the policy)
    dst.add_lora(REF, LoraSettings(rank=4), trainable=False)
    assert load_state(dst.unet, state, into=REF).checksum == state.checksum


def test_weight_state_dtype_cast_and_full_unet(tiny_model_dir):
    pol = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    pol.add_lora()
    half = export_state(pol.unet, "policy", 1, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.tensors().values())
    assert load_state(pol.unet, half).checksum == half.checksum
    full = export_state(pol.unet, None, 2)
    assert not any("lora" in k for k in full.tensors())
    assert load_state(pol.unet, full).keys_matched == len(full.tensors())



def test_full_training_copies_are_frozen_and_named_loads_report_their_version(tiny_model_dir):
    """Full training: ``copies()`` lists the frozen whole-UNet copies (the initial model, the reference), never the
    trained UNet; a load into a named copy reports the version it was given; ``train_mode`` switches the trained
    UNet only."""
    pol = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    pol.train_full()
    pol.add_copy(REF)
    copies = pol.copies()
    ref = pol.place(REF)[0]
    assert len(copies) == 2 and all(m is not pol.unet for m in copies) and any(m is ref for m in copies)
    assert not any(p.requires_grad for m in copies for p in m.parameters())
    tensors = {k: v.detach().clone() for k, v in pol.adapter_parameters(None).items()}
    report = pol.copy_into(REF, tensors, version=3)
    assert report.version == 3 and report.keys_matched == len(tensors)
    assert pol.copy_into(REF, tensors).version == 0
    x, t = torch.randn(1, 4, 8, 8), pol.timesteps[1]
    embeds = pol.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        for p in pol.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for w in (4.0, 1.0):  # the reference copy, not the trained UNet, with and without CFG
            at_ref, initial = (pol.eps(x, t, embeds, adapter=a, guidance_scale=w) for a in (REF, None))
            torch.testing.assert_close(at_ref, initial)
            assert not torch.allclose(at_ref, pol.eps(x, t, embeds, guidance_scale=w))
    pol.train_mode()
    assert pol.unet.training and not ref.training
    pol.train_mode(False)
    assert not pol.unet.training


def test_mismatched_states_fail_clearly(tiny_model_dir):
    a = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    a.add_lora(settings=LoraSettings(rank=4))
    b = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    b.add_lora(settings=LoraSettings(rank=2))
    with pytest.raises(AdapterMismatchError, match=r"shape .* check lora.rank"):
        load_state(b.unet, export_state(a.unet, "policy", 1))
    c = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    c.add_lora(settings=LoraSettings(rank=4, target_modules=("to_q",)))
    with pytest.raises(AdapterMismatchError, match="unexpected"):
        load_state(c.unet, export_state(a.unet, "policy", 1))
    with pytest.raises(AdapterMismatchError, match="no adapter 'policy'"):
        export_state(DiffusionPolicy.from_pretrained(tiny_model_dir).unet, "policy", 1)


def test_missing_model_dir_and_files(tmp_path, tiny_model_dir):
    with pytest.raises(ModelPathError, match=r"model directory not found: .*nowhere"):
        DiffusionPolicy.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelPathError, match=r"missing unet/diffusion_pytorch_model\.safetensors"):
        DiffusionPolicy.from_pretrained(broken)
    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_model_dir, garbled)
    (garbled / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelPathError, match=r"scheduler/scheduler_config\.json is not JSON"):
        DiffusionPolicy.from_pretrained(garbled)


@pytest.mark.parametrize("kwargs,match", [
    ({"eta": 0.0}, "eta must be > 0"),
    ({"num_steps": 0}, "num_steps"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"logprob_reduce": "max"}, "logprob_reduce"),
])
def test_bad_sampler_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"),
                                          ({"target_modules": ()}, "target_modules")])
def test_bad_lora_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**kwargs)


def test_collective_transport_round_trip_in_buckets(tiny_model_dir, monkeypatch):
    """The receiver cuts the same buckets as the sender, in the sent dtype, and lands the exact state."""
    import ray.util.collective as col

    from policy.transport import Collective, buckets

    assert buckets({"b": 4, "a": 3, "c": 2}, max_bytes=5) == [["a"], ["b"], ["c"]]
    assert buckets({"a": 2, "b": 2, "c": 9}, max_bytes=5) == [["a", "b"], ["c"]]
    wire: list[torch.Tensor] = []

    def broadcast(tensor, src_rank, group_name):  # the sender appends, the receiver takes in order
        if len(wire) and not sending:
            tensor.copy_(wire.pop(0))
        else:
            wire.append(tensor.clone())

    monkeypatch.setattr(col, "broadcast", broadcast)
    monkeypatch.setattr("policy.transport.BUCKET_BYTES", 4096)
    src = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    with torch.no_grad():
        for param in src.unet.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    sent = {k: t.to(torch.bfloat16) for k, t in snapshot(src.unet, None).items()}
    sending = True
    link = Collective("g")
    digest = link.send(sent, 5, None)
    assert len(wire) > 10  # many buckets of at most 4 kB each
    sending = False
    dst = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=4))
    report = link.receive(dst.unet, 5, None, torch.bfloat16)
    assert report.version == 5 and report.checksum == digest and not wire


def test_x0_after_step_predicts_at_the_next_timestep_and_is_the_latent_after_the_last(policy):
    """A child x_{t−1} of step k is scored at timestep k + 1 (the one it will be denoised from); after the last
    step it is the clean sample itself."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *policy.latent_shape, generator=gen)
    embeds = policy.encode_prompts(["a red circle", "a blue square"])
    n = len(policy.timesteps)
    for k in (0, n - 2):
        x0, eps = policy.x0_after_step(x, k, embeds)
        want, want_eps = policy.predict_x0(x, policy.timesteps[k + 1], embeds)
        assert torch.equal(x0, want) and torch.equal(eps, want_eps), k
    x0, eps = policy.x0_after_step(x, n - 1, embeds)
    assert torch.equal(x0, x.float()) and eps is None


def test_decode_maps_the_vae_output_to_images_as_diffusers_does(policy):
    """Latents → images in [0, 1]: the VAE's [-1, 1] output denormalised as diffusers' ``VaeImageProcessor``."""
    from diffusers.image_processor import VaeImageProcessor

    z = 3 * torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images, raw = policy.decode(z), policy.c.to_images(z).float()
    assert raw.min() < -0.1 or raw.max() > 0.1
    torch.testing.assert_close(images, VaeImageProcessor().denormalize(raw))


def test_eps_guides_with_the_scale_it_is_given_and_counts_its_network_rows(policy):
    """Classifier-free guidance f̂ = f_u + w (f_c − f_u) against two separate float64 network outputs, at the
    sampler's w and at a given one; w = 1 is the plain conditional output in one pass. ``net_rows`` counts every
    latent through the network (CFG's two halves twice): the compute the studies equalise."""
    embeds = policy.encode_prompts(PROMPTS[:2])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), policy.timesteps[2]
    model_t = policy.process.model_time(torch.as_tensor(t)).reshape(-1).expand(2)
    with torch.no_grad():
        f_c, f_u = (policy.c.denoiser(x, model_t, text, net=policy.unet).double()
                    for text in (embeds.cond, embeds.uncond))
        rows = policy.net_rows
        at_sampler_w = policy.eps(x, t, embeds)
        at_2 = policy.eps(x, t, embeds, guidance_scale=2.0)
        assert policy.net_rows - rows == 4 + 4
        plain = policy.eps(x, t, embeds, guidance_scale=1.0)
        assert policy.net_rows - rows == 4 + 4 + 2
    close = {"rtol": 1e-4, "atol": 1e-5}
    assert policy.sampler.guidance_scale == 4.0 and not torch.allclose(f_c, f_u)
    torch.testing.assert_close(plain.double(), f_c, **close)
    torch.testing.assert_close(at_sampler_w.double(), f_u + 4.0 * (f_c - f_u), **close)
    torch.testing.assert_close(at_2.double(), f_u + 2.0 * (f_c - f_u), **close)
