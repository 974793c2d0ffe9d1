"""The cost model of the scale simulation (``python -m bench.scale``): seconds per rollout chain and per learner pair
on A100, L4 and H100 GPUs for SD-1.5 (the default), SD3.5-Medium and FLUX.1-dev at 512 px, derived from FLOP counts
and public peak figures.

Every constant says where it comes from. The FLOP counts are ``torch.utils.flop_counter.FlopCounterMode`` totals
(2 FLOPs per multiply-add) of the real diffusers classes built on the ``meta`` device: SD-1.5's architectures in
``policy.components.ARCHITECTURES["sd15"]``, SD3.5-Medium's and FLUX.1-dev's at their published configs (SD3_35M,
FLUX_DEV, VAE16 below); ``count_flops(model)`` recounts them (tests/test_scale.py checks that it agrees with the
constants). Seconds = FLOPs / (peak × MFU): one stated MFU for every kernel is the model's main simplification
(small-batch sampling runs below it, large-batch training near it), so the absolute seconds are estimates and the
ratios between rollout and learner work are what the simulation's sizing rests on. ``python -m bench.costs`` prints
every model's seconds and pair rates per GPU kind (docs/operations.md's sizing table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ---- FLOPs (counted with FlopCounterMode on the meta device; count_flops(model) reproduces them) ----------------
REWARD_FLOPS = 0.16203e12  # CLIP ViT-L/14 image tower at 224 px, batch 1 (every preset's aesthetic reward backbone;
#                            its linear head is negligible). Config: hidden 1024, 24 layers, 16 heads, patch 14.
# Text encoding (once per prompt) is left out: SD-1.5's CLIP is tiny, and T5-XXL's encoder (4.8 B parameters) at
# 256-512 tokens is 2.4-4.9 TFLOP, about 1-2 % of an SD3.5/FLUX chain.


@dataclass(frozen=True)
class Model:
    """One model's work at 512 px. ``net_flops`` is one sampler call of the denoiser: its classifier-free guidance
    pair (batch 2), or one call of a guidance-distilled model (batch 1); ``vae_flops`` one decode (batch 1)."""

    name: str
    preset: str  # the TailorPO preset that num_steps and branches come from (tests/test_scale.py checks them)
    net_flops: float
    vae_flops: float
    num_steps: int
    branches: int
    latent_shape: tuple[int, int, int]  # the latent the records carry (float32)
    lora_rank: int
    lora_widths: tuple[tuple[int, int], ...]  # (modules, width) of the preset's LoRA: the simulated weight state
    lora_params: int  # counted on the real model with the preset's rank and target modules
    net_params: int  # the denoiser's parameters (bf16 weights: 2 bytes each)

    # The work per chain and per pair (read from actors/rollout.py and learner/trainer.py), the same for every model:
    # step_branch: every step is one sampler call; each branch adds the two children's x̂_0 at the next timestep
    # (2 calls, the winner's prediction is reused by the next step: net +1), 2 VAE decodes and 2 reward calls.
    # One step pair per branch.
    @property
    def chain_flops(self) -> float:
        return (self.num_steps + self.branches) * self.net_flops + 2 * self.branches * (self.vae_flops + REWARD_FLOPS)

    def pair_flops(self, trainable: str = "lora") -> float:
        """Learner, per step pair: the log-ratio needs the policy's prediction at x_t (one sampler call, both
        children share it) and the reference's (one more, forward only). Backward ≈ 2× forward when every weight
        gets a gradient (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1: C ≈ 6N per token =
        2N forward + 4N backward); with a frozen base (LoRA) the weight-gradient half is skipped: ≈ 1× forward."""
        return (1 + TRAINABLE[trainable]) * self.net_flops + self.net_flops

    @property
    def eval_flops(self) -> float:
        """Held-out evaluation: one plain chain, one decode, one reward call per prompt."""
        return self.num_steps * self.net_flops + self.vae_flops + REWARD_FLOPS


TRAINABLE = {"lora": 1, "full": 2}  # backward passes per forward (Model.pair_flops)

MODELS = {
    # SD-1.5 (policy.components.ARCHITECTURES["sd15"]): UNet on a 4×64×64 latent with 77×768 text, CFG batch 2;
    # configs/tailorpo_sd15.yaml: 20 steps, branches at 0,4,8,12,16; rank-4 LoRA on to_q/to_k/to_v/to_out.0.
    "sd15": Model("SD-1.5", "configs/tailorpo_sd15.yaml", net_flops=1.6065e12, vae_flops=2.5145e12, num_steps=20,
                  branches=5, latent_shape=(4, 64, 64), lora_rank=4,
                  # the 128 attention projections by block width; cross-attention keys and values read 768-wide
                  # text, so this is 0.2 % above the count
                  lora_widths=((40, 320), (40, 640), (48, 1280)), lora_params=797_184, net_params=859_520_964),
    # SD3.5-Medium (SD3_35M below): a 1024-token image (16×64×64 latent, patch 2) beside 333 text tokens, CFG
    # batch 2; configs/sd35m_tailorpo.yaml: 10 steps, branches at 0,2,4,6,8; rank-32 LoRA on the joint
    # attention's 8 projections (1536 wide; the last block has no to_add_out: 24 × 8 - 1 modules).
    "sd35m": Model("SD3.5-Medium", "configs/sd35m_tailorpo.yaml", net_flops=4.8853e12, vae_flops=2.5150e12,
                   num_steps=10, branches=5, latent_shape=(16, 64, 64), lora_rank=32, lora_widths=((191, 1536),),
                   lora_params=18_776_064, net_params=2_243_171_520),
    # FLUX.1-dev (FLUX_DEV below): 1024 packed image tokens (2×2 patches of the 16×64×64 latent) beside 512 T5
    # tokens, guidance-distilled: batch 1, no CFG; configs/flux_tailorpo.yaml: as SD3.5-M's; the same LoRA
    # targets hit 19 double blocks × 8 and 38 single blocks × 3 (to_q/to_k/to_v; no to_out), 3072 wide.
    "flux": Model("FLUX.1-dev", "configs/flux_tailorpo.yaml", net_flops=21.503e12, vae_flops=2.5150e12,
                  num_steps=10, branches=5, latent_shape=(16, 64, 64), lora_rank=32, lora_widths=((266, 3072),),
                  lora_params=52_297_728, net_params=11_901_408_320),
}
BRANCHES = MODELS["sd15"].branches  # the default model's (tests/test_weight_piggyback.py)

# ---- hardware: dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheets) ---------------------------------------------
PEAK_BF16 = {
    "A100": 312e12,  # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS dense (624 with sparsity)
    "L4": 121e12,  # NVIDIA L4 datasheet (2023): BF16 242 TFLOPS with sparsity -> 121 dense
    "H100": 989e12,  # NVIDIA H100 datasheet, SXM5: BF16 1,979 TFLOPS with sparsity -> 989 dense
}
MFU = 0.35  # model FLOPs utilisation assumed for every kernel (stated, not measured: no GPU here)
JITTER_SIGMA = 0.10  # lognormal sigma of every simulated duration (±10 %)

# ---- the pool: cluster/gpu.yaml's rollout GPUs, 7 A100 (learner node) + up to 16 L4 (4 nodes × 4) ---------------
A100_SHARE = 7 / 23


@dataclass(frozen=True)
class Costs:
    """Seconds of each simulated call on one GPU kind."""

    gpu: str
    chain_s: float  # one rollout chain with its branches, decodes and rewards
    pair_s: float  # one learner step pair (forward + backward + reference)
    eval_chain_s: float
    pairs_per_chain: int

    @staticmethod
    def of(gpu: str, trainable: str = "lora", model: str = "sd15") -> Costs:
        m, rate = MODELS[model], PEAK_BF16[gpu] * MFU
        return Costs(gpu, m.chain_flops / rate, m.pair_flops(trainable) / rate, m.eval_flops / rate, m.branches)

    @property
    def pairs_per_s(self) -> float:
        """Rollout pairs per second of one actor on this GPU."""
        return self.pairs_per_chain / self.chain_s


def pool(n: int) -> list[str]:
    """GPU kinds of ``n`` rollout actors in cluster/gpu.yaml's proportions, at least one A100; every prefix
    ``pool(n)[:m]`` is ``pool(m)``, so one set of actors serves every pool size of a sweep."""
    kinds: list[str] = []
    for i in range(1, n + 1):
        kinds.append("A100" if max(1, round(i * A100_SHARE)) > kinds.count("A100") else "L4")
    return kinds


# ---- what count_flops builds: diffusers' classes at the published configs, one sampler call's inputs -------------
# SD3.5-Medium's MMDiT-X. diffusers scripts/convert_sd3_to_diffusers.py (the official conversion) builds it with
# sample_size 128, patch_size 2, in_channels 16, joint_attention_dim 4096, num_attention_heads = num_layers, and
# notes "sd3.5 2b use pos_embed_max_size=384", dual attention (attn2) in layers 0-12 and qk norm "rms_norm" for
# SD3.5; attention_head_dim 64, pooled_projection_dim 2048 and out_channels 16 are SD3Transformer2DModel's defaults.
# num_layers 24 and caption_projection_dim 1536 (= 24 heads × 64) the script reads from the checkpoint: taken from
# public mirrors of stabilityai/stable-diffusion-3.5-medium's transformer/config.json (e.g. Tenstorrent's SD3.5
# loader); the gated Hugging Face file itself was not read here. A check: the counted 2.243 B weights plus the
# 384² × 1536 position table (a buffer in diffusers) make 2.47 B, Stability's "2.5 billion parameters".
SD3_35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
               pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
               qk_norm="rms_norm")
# FLUX.1-dev: black-forest-labs/flux src/flux/util.py configs["flux-dev"] (hidden 3072 = 24 heads × 128, depth 19,
# depth_single_blocks 38, in_channels 64, vec_in_dim 768, context_in_dim 4096, axes_dim [16, 56, 56],
# guidance_embed True); diffusers scripts/convert_flux_to_diffusers.py (19 + 38 layers, inner dim 3072, patch 1).
# The count, 11.9 B parameters, is BFL's "12 billion".
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# The 16-channel VAE of both: convert_sd3_to_diffusers.py takes SDXL's VAE config (block_out_channels 128, 256,
# 512, 512; 2 layers per block; 32 norm groups) with latent_channels 16 and no quant convs; flux util.py's
# ae_params are the same network (ch 128, ch_mult 1, 2, 4, 4, 2 res blocks, z 16). Scale and shift (SD3 1.5305,
# 0.0609; FLUX 0.3611, 0.1159) cost no FLOPs.
VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
# One sampler call's inputs (shapes) at 512 px. SD3: StableDiffusion3Pipeline.encode_prompt concatenates the two
# CLIPs' 77 tokens (features padded to 4096) with T5's max_sequence_length 256 along the sequence: 333 tokens;
# pooled 768 + 1280. FLUX: FluxPipeline's max_sequence_length 512 T5 tokens, pooled CLIP-L 768, and the latent
# packed in 2×2 patches (policy.denoisers.FluxDenoiser): 32 × 32 tokens of 64 channels, batch 1 (no CFG).
CALLS = {
    "sd15": ("UNet2DConditionModel", {"sample": (2, 4, 64, 64), "timestep": (2,),
                                      "encoder_hidden_states": (2, 77, 768)}),
    "sd35m": ("SD3Transformer2DModel", {"hidden_states": (2, 16, 64, 64), "timestep": (2,),
                                        "encoder_hidden_states": (2, 77 + 256, 4096), "pooled_projections": (2, 2048)}),
    "flux": ("FluxTransformer2DModel", {"hidden_states": (1, 32 * 32, 64), "timestep": (1,), "guidance": (1,),
                                        "encoder_hidden_states": (1, 512, 4096), "pooled_projections": (1, 768),
                                        "txt_ids": (512, 3), "img_ids": (32 * 32, 3)}),
}
ROOT = Path(__file__).resolve().parent.parent


def count_flops(model: str = "sd15") -> dict[str, float]:
    """Recount ``MODELS[model]``'s constants and REWARD_FLOPS on the meta device (needs diffusers and transformers;
    a few seconds): FLOPs of one sampler call, one VAE decode and one reward call, the preset's LoRA parameters
    (PEFT's rule: a Linear whose name is a target or ends in "." + target) and the denoiser's parameters."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from learner.config import load_yaml
    from policy.components import ARCHITECTURES
    from policy.lora import LoraSettings

    net_class, inputs = CALLS[model]
    net_config, vae_config = {"sd15": (ARCHITECTURES["sd15"]["net"], ARCHITECTURES["sd15"]["vae"]),
                              "sd35m": (SD3_35M, VAE16), "flux": (FLUX_DEV, VAE16)}[model]
    with torch.device("meta"):
        net = getattr(diffusers, net_class)(**net_config)
        vae = diffusers.AutoencoderKL(**vae_config)
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, image_size=224, patch_size=14))

    def flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    lora = LoraSettings(**load_yaml(ROOT / MODELS[model].preset).get("lora", {}))
    return {"net": flops(lambda: net(**{name: meta(*shape) for name, shape in inputs.items()})),
            "vae_decode": flops(lambda: vae.decode(meta(1, *MODELS[model].latent_shape))),
            "reward": flops(lambda: clip(pixel_values=meta(1, 3, 224, 224))),
            "lora_params": sum(lora.rank * (m.in_features + m.out_features) for name, m in net.named_modules()
                               if isinstance(m, torch.nn.Linear)
                               and any(name == t or name.endswith("." + t) for t in lora.target_modules)),
            "net_params": sum(p.numel() for p in net.parameters())}


def sizing_table(trainable: str = "lora") -> str:
    """The Markdown table of docs/operations.md's sizing section: each model's work and its seconds and pair rates
    per GPU kind, straight from the cost model (``python -m bench.costs`` prints it)."""
    lines = ["| model | denoiser bf16 | TFLOP chain / pair | GPU | s / chain | rollout pairs/s | s / pair | "
             "learner pairs/s |", "|---|---|---|---|---|---|---|---|"]
    for key, m in MODELS.items():
        for gpu in PEAK_BF16:
            c = Costs.of(gpu, trainable, key)
            lines.append(f"| {m.name} (`{key}`) | {m.net_params * 2 / 1e9:.1f} GB | {m.chain_flops / 1e12:.0f} / "
                         f"{m.pair_flops(trainable) / 1e12:.1f} | {gpu} | {c.chain_s:.2f} | {c.pairs_per_s:.1f} | "
                         f"{c.pair_s:.3f} | {1 / c.pair_s:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"bench/costs.py at {MFU:.0%} MFU of the dense bf16 peak; 512 px; LoRA learner (backward ≈ 1× forward):")
    print(sizing_table())
