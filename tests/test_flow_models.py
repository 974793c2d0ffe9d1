"""SD3 and FLUX behind the policy's one call convention, on tiny random models of the real classes: the chain equals
diffusers' own pipeline, a stored log-prob is reproduced, a branch step is exact, LoRA takes Flow-GRPO's targets,
FLUX.1-dev's guidance is a network input, and an incomplete directory fails in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FLOW_LORA_TARGETS
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from helpers import recomputed_logprob
from safetensors.torch import load_file, save_file

from policy import POLICY, REF, DiffusionPolicy, LoraSettings, ModelPathError, SamplerConfig
from policy.components import REQUIRED_FILES, check_model_dir
from policy.schedule import gaussian_logprob

PROMPTS = ["a red circle on the left", "a blue square on the right"]
KINDS = ["sd3", "flux"]
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


def _policy(request, kind: str, **sampler) -> DiffusionPolicy:
    root = request.getfixturevalue(f"tiny_{kind}_dir")
    return DiffusionPolicy.from_pretrained(root, sampler=SamplerConfig(**{"num_steps": 4, "guidance_scale": 4.5,
                                                                          "resolution": 32, **sampler}))


def _pipeline(pol: DiffusionPolicy, kind: str):
    """diffusers' pipeline on the policy's own components."""
    d = pol.c.denoiser
    parts = {"transformer": d.net, "vae": pol.c.vae, "scheduler": pol.c.scheduler}
    for i, (tokenizer, encoder) in enumerate(d.encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts.update({f"text_encoder{suffix}": encoder, f"tokenizer{suffix}": tokenizer})
    return PIPELINES[kind](**parts)


@pytest.mark.parametrize("kind", KINDS)
def test_the_chain_is_diffusers_pipeline_with_no_noise(kind, request):
    """With the SDE's noise level → 0 the policy's chain of kernel means is the pipeline's Euler sampler: the same
    prompt encoding (CLIPs + T5), CFG (SD3) or embedded guidance (FLUX), model time, latent packing and σ grid."""
    pol = _policy(request, kind, noise_level=1e-9)
    x = pol.initial_latents(pol.generators([0, 1]))
    embeds = pol.encode_prompts(PROMPTS)
    with torch.no_grad():
        ours = x
        for t in pol.timesteps:
            ours = pol.mean(ours, t, embeds).mean
        pipe = _pipeline(pol, kind)
        kw = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=4.5, height=32, width=32,
                  output_type="latent", max_sequence_length=16)
        if kind == "flux":
            b, c, h, w = x.shape
            packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
            theirs = FluxPipeline._unpack_latents(pipe(latents=packed, **kw).images, 32, 32, pipe.vae_scale_factor)
        else:
            theirs = pipe(latents=x, **kw).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_recomputed_logprobs_match_sampling(kind, request):
    """Every step of a guided chain, the σ = 1 step and the last step to σ = 0 included, has a finite log-prob that
    recomputation under the same weights reproduces."""
    pol = _policy(request, kind, logprob_reduce="sum")
    roll = pol.sample(PROMPTS, [3, 4])
    assert roll.latents.shape == (5, 2, 16, 8, 8) and roll.images.shape == (2, 3, 32, 32)
    assert bool(torch.isfinite(roll.logprobs).all())
    steps = torch.arange(4)
    with torch.no_grad():
        lp = recomputed_logprob(pol, roll.latents[steps].flatten(0, 1), roll.latents[steps + 1].flatten(0, 1),
                                pol.timesteps.repeat_interleave(2), pol.encode_prompts(PROMPTS).repeat(4))
    assert (lp.view(4, 2) - roll.logprobs).abs().max() / (16 * 8 * 8) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_a_branch_step_is_exact(kind, request):
    pol = _policy(request, kind)
    embeds = pol.encode_prompts(PROMPTS)
    x_t = pol.initial_latents(pol.generators([7, 8]))
    t = pol.timesteps[1]
    with torch.no_grad():
        out = pol.branch(x_t, t, embeds, 2, pol.generators([10, 11]))
        mu, sigma, x0 = pol.mean(x_t, t, embeds)
    assert out.x_prev.shape == (2, 2, 16, 8, 8) and not torch.allclose(out.x_prev[0], out.x_prev[1])
    for k in range(2):
        torch.testing.assert_close(out.logprob[k], gaussian_logprob(out.x_prev[k], mu, sigma, "mean"))
    v = pol.eps(x_t, t, embeds)
    torch.testing.assert_close(x0, x_t - float(t) * v)  # TailorPO ranks children through x̂_0 = x_t − σ v̂


@pytest.mark.parametrize("kind", KINDS)
def test_lora_takes_flow_grpos_targets(kind, request):
    """Adapters land on the joint attention's image and text projections (not SD3.5's second attention), start
    at the base model and move it once perturbed."""
    pol = _policy(request, kind)
    embeds = pol.encode_prompts(PROMPTS[:1])
    x, t = pol.initial_latents(pol.generators([0])), pol.timesteps[1]
    with torch.no_grad():
        base = pol.eps(x, t, embeds)
        pol.add_lora(settings=LoraSettings(rank=2, alpha=4.0, target_modules=tuple(FLOW_LORA_TARGETS)))
        torch.testing.assert_close(pol.eps(x, t, embeds), base)
        adapted = {k.split(".lora_")[0] for k, p in pol.unet.named_parameters() if p.requires_grad}
        assert {name.rsplit(".attn.", 1)[1] for name in adapted} == {t.removeprefix("attn.") for t in
                                                                      FLOW_LORA_TARGETS}
        assert not any(".attn2." in name for name in adapted)
        for p in pol.trainable_parameters():
            p.add_(0.05)
        assert not torch.allclose(pol.eps(x, t, embeds), base)
    if kind == "sd3":
        assert any(".attn2." in k for k, _ in pol.unet.named_parameters())  # the dual-attention block exists


def test_flux_guidance_is_one_conditional_forward_with_the_scale_as_input(request):
    """FLUX.1-dev is guidance-distilled: one network call per prediction, and the scale changes the prediction;
    SD3 runs classifier-free guidance on a doubled batch."""
    flux, sd3 = _policy(request, "flux"), _policy(request, "sd3")
    embeds = {"flux": flux.encode_prompts(PROMPTS), "sd3": sd3.encode_prompts(PROMPTS)}
    seen: list[int] = []

    def count(_module, _args, kwargs) -> None:
        seen.append(kwargs["hidden_states"].shape[0])

    for pol, kind, batch in ((flux, "flux", 2), (sd3, "sd3", 4)):
        seen.clear()
        hook = pol.unet.register_forward_pre_hook(count, with_kwargs=True)
        x, rows = pol.initial_latents(pol.generators([0, 1])), pol.net_rows
        with torch.no_grad():
            a, b = (pol.eps(x, pol.timesteps[1], embeds[kind], guidance_scale=w) for w in (1.5, 4.5))
        hook.remove()
        assert seen == [batch, batch] and pol.net_rows - rows == 2 * batch and not torch.allclose(a, b)



@pytest.mark.parametrize("kind", KINDS)
def test_a_whole_network_reference_copy_is_the_network_that_runs(kind, request):
    """Full training of a transformer: the frozen copy a name denotes (the reference) runs, not the trained
    network, in FLUX's guidance-as-input call and in SD3's doubled batch alike."""
    pol = _policy(request, kind)
    pol.train_full()
    pol.add_copy(REF)
    embeds = pol.encode_prompts(PROMPTS)
    x, t = pol.initial_latents(pol.generators([0, 1])), pol.timesteps[1]
    with torch.no_grad():
        for p in pol.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        at_ref, initial, trained = (pol.eps(x, t, embeds, adapter=a) for a in (REF, None, POLICY))
    torch.testing.assert_close(at_ref, initial)
    assert not torch.allclose(at_ref, trained)

@pytest.mark.parametrize("kind", KINDS)
def test_missing_or_broken_files_fail_in_one_line(kind, request, tmp_path):
    root = request.getfixturevalue(f"tiny_{kind}_dir")
    check_model_dir(root)
    net = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[kind]
    assert "transformer/diffusion_pytorch_model.safetensors" in REQUIRED_FILES[net]
    t5 = "text_encoder_3" if kind == "sd3" else "text_encoder_2"
    for rel in ("transformer/diffusion_pytorch_model.safetensors", f"{t5}/model.safetensors",
                f"{t5.replace('text_encoder', 'tokenizer')}/tokenizer.json", "model_index.json"):
        broken = tmp_path / rel.replace("/", "_")
        shutil.copytree(root, broken)
        (broken / rel).unlink()
        with pytest.raises(ModelPathError, match=f"^model directory {broken} is missing {rel} ") as info:
            DiffusionPolicy.from_pretrained(broken)
        assert "\n" not in str(info.value)
    # sharded weights (as SD3.5's T5 and FLUX's transformer ship) load; a missing shard is named
    sharded = tmp_path / "sharded"
    shutil.copytree(root, sharded)
    weights = load_file(sharded / t5 / "model.safetensors")
    (sharded / t5 / "model.safetensors").unlink()
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: weights[k] for k in part}, sharded / t5 / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (sharded / t5 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    DiffusionPolicy.from_pretrained(sharded, sampler=SamplerConfig(num_steps=2, resolution=32))
    (sharded / t5 / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelPathError, match=f"is missing {t5}/model-00002-of-00002.safetensors "):
        check_model_dir(sharded)
    # a denoiser class the policy has no adapter for
    index = json.loads((root / "model_index.json").read_text())
    (sharded / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "SanaTransformer"]}))
    with pytest.raises(ModelPathError, match=r"names denoiser \['SanaTransformer'\]; supported: "):
        check_model_dir(sharded)
